"""The pieces of the powered ablation design (issue 15): block draws, "long" selection, held-out labels,
the fixed answer window for NLL, and budgets in trained answer tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.frame import prepare
from curation.mixing import draw_block, select_longest
from tomelab.schema import make_row, rows_to_table


def _conv(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _frame(n: int, source: str = "s") -> pl.DataFrame:
    rows = [make_row(source, _conv(f"question number {i} about topic {i % 7}?", " ".join(["word"] * (5 + 3 * i))), {})
            for i in range(n)]
    return prepare(rows_to_table(rows))


def test_block_draws_are_seeded_per_source_and_independent() -> None:
    df = pl.concat([_frame(50, "a"), _frame(30, "b")]).with_columns(pl.int_range(pl.len()).alias("_row"))
    one, again, other = draw_block(df, 20, 0), draw_block(df, 20, 0), draw_block(df, 20, 1)
    assert one.kept["id"].to_list() == again.kept["id"].to_list()  # same block: the same draw for every variant
    assert set(one.kept["id"]) != set(other.kept["id"])  # another block: another draw
    assert one.kept.group_by("source").len().sort("source")["len"].to_list() == [20, 20]
    assert set(one.dropped["reason"]) == {"not_drawn"} and one.stats.check()


def test_longest_keeps_the_longest_answers_that_fit() -> None:
    df = _frame(20)
    tokens = (df["prompt_tokens"] + df["response_tokens"]).to_list()
    fit = sorted(tokens)[15]  # the 4 longest rows do not fit
    res = select_longest(df, {"s": 5}, fit)
    kept = res.kept["response_tokens"].to_list()
    fitting = sorted((r for r, t in zip(df["response_tokens"], tokens) if t <= fit), reverse=True)
    assert sorted(kept, reverse=True) == fitting[:5]
    assert set(res.dropped["reason"]) == {"too_long_to_fit", "shorter_answer"} and res.stats.check()


def test_heldout_labels_name_the_stage_and_reason(tmp_path: Path) -> None:
    from curation.labels import label_heldout, read_labels
    from tomelab.io import write_parquet

    good = [make_row("s", _conv(f"Explain item {i} of the list in detail please.",
                                f"Item {i} is explained here in several plain English sentences. It is fine."), {})
            for i in range(6)]
    refusal = make_row("s", _conv("Tell me the weather now.", "As an AI language model, I cannot browse the internet."), {})
    test = rows_to_table(good + [good[0], refusal])  # an exact duplicate and a refusal
    write_parquet(tmp_path / "test.parquet", test)
    write_parquet(tmp_path / "val.parquet", rows_to_table(good[:2]))
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\nbudget_rows = 5\n[[sources]]\nname = "s"\nkind = "alpaca"\n'
                      '[exact_dedup]\nenabled = true\n[filters]\nenabled = ["refusal"]\n')
    path = label_heldout(tmp_path, recipe)
    labels = pl.read_parquet(path)
    test_rows = labels.filter(pl.col("split") == "test")
    assert test_rows.height == 8 and test_rows["clean"].sum() == 6
    assert set(test_rows.filter(~pl.col("clean"))["reason"].to_list()) >= {"refusal"}
    clean = read_labels(path)
    assert clean[refusal["id"]] is False and all(clean[f"val:{r['id']}"] for r in good[:2])
    assert label_heldout(tmp_path, recipe) == path  # cached by the filters' config


def test_answer_window_scores_the_same_tokens_for_every_item(smollm2_dir: Path) -> None:
    from eval.generate import answer_window
    from tomelab.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    long_prompt = "context " * 600
    msgs = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "first answer " * 5},
            {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "The final answer is forty-two. " * 20}]
    ids, mask = answer_window(tok, msgs, answer_tokens=16, context_tokens=32)
    assert len(ids) == 48 and sum(mask) == 16 and mask == [0] * 32 + [1] * 16  # left-truncated context, no drop
    scored = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "The final answer is forty-two." in scored  # the window is the start of the LAST answer
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    ids, mask = answer_window(tok, short, answer_tokens=64, context_tokens=32)
    assert 1 <= sum(mask) < 64 and tok.decode([i for i, m in zip(ids, mask) if m]).startswith("Hello!")


def test_budget_in_answer_tokens_counts_only_trained_tokens() -> None:
    from training.data import Example, plan_batches

    # long prompts (90 context tokens) and short answers (10 trained tokens) per row
    ex = [Example(str(i), list(range(100)), [False] * 90 + [True] * 10) for i in range(40)]
    by_answer = plan_batches(ex, seed=0, batch_size=2, grad_accum=1, token_budget=100, epochs_cap=1.0,
                             packing="none", budget_unit="answer_tokens")
    by_tokens = plan_batches(ex, seed=0, batch_size=2, grad_accum=1, token_budget=100, epochs_cap=1.0, packing="none")
    rows = lambda steps: sum(len(mb) for s in steps for mb in s)  # noqa: E731
    assert rows(by_answer) == 10  # 10 trained tokens per row: 10 rows (5 micro-batches) reach 100 answer tokens
    assert rows(by_tokens) == 2  # counting prompt tokens too, one micro-batch of 2 x 100 tokens is the budget
    with pytest.raises(Exception, match="answer tokens"):
        plan_batches(ex, seed=0, batch_size=2, grad_accum=1, token_budget=10_000, epochs_cap=1.0, packing="none",
                     budget_unit="answer_tokens")


def test_ablation_config_checks_blocks_and_controls(tmp_path: Path) -> None:
    from eval.config import AblationConfig
    from tomelab.config import load_config
    from tomelab.errors import ConfigError

    cfg = load_config("configs/ablation.toml", AblationConfig)
    assert cfg.draw_rows > 0 and cfg.negative_control and cfg.positive_control and len(cfg.seeds) >= 5
    assert cfg.primary == "heldout_clean_nll" and cfg.winner.on_validation
    p = tmp_path / "a.toml"
    p.write_text('variants = ["random"]\ntrain_config = "t.toml"\neval_config = "e.toml"\nseeds = [0, 1]\n'
                 'negative_control = true\n')
    with pytest.raises(ConfigError, match="need blocks"):
        load_config(p, AblationConfig)
    p.write_text('variants = ["random", "random"]\ntrain_config = "t.toml"\neval_config = "e.toml"\nseeds = [0, 1]\n')
    with pytest.raises(ConfigError, match="twice"):
        load_config(p, AblationConfig)
    assert np.isfinite(cfg.draw_rows)


def test_gradient_checkpointing_changes_memory_not_maths(smollm2_dir: Path) -> None:
    """The option that lets 2,560-token rows train beside each other must give the same loss and gradients."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tomelab.models import load_model
    from training.data import Example, collate
    from training.loss import AssistantLoss

    batch = collate([Example("x", list(range(1000, 1160)), [False] * 60 + [True] * 100)], 0)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_model("smollm2-135m-instruct", dtype="float32"),
                               LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss, n = AssistantLoss(model.get_base_model())(batch, "cpu")
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((float(loss.detach()) / n, grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_two_recipes_with_one_name_are_refused(curation_home: Path, tmp_path: Path) -> None:
    from curation.pipeline import curate
    from tomelab.errors import TomelabError

    body = 'name = "same"\nbudget_rows = 20\n[[sources]]\nname = "alpaca"\nkind = "alpaca"\n[decontam]\nenabled = false\n'
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(body)
    second.write_text(body.replace("budget_rows = 20", "budget_rows = 30"))
    curate(first, progress=False)
    curate(first, progress=False)  # the same file again: a rebuild, not a clash
    with pytest.raises(TomelabError, match="already built from .*a.toml.*Rename one"):
        curate(second, progress=False)
