"""Eval sets and scoring: parsing, quarantine, the real IFEval checkers with offline Punkt,
assistant-token masks on the real tokenizer, and one real end-to-end `evaluate` of the base model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from eval.config import EvalConfig, GenSetConfig, HeldoutEvalConfig
from eval.generate import read_partial
from eval.sets import (
    EvalItem,
    gsm8k_gold,
    gsm8k_pred,
    ifeval_paired,
    load_gsm8k,
    load_ifeval,
    score_gsm8k,
    score_ifeval,
    stable_subset,
)
from tomelab.errors import DataError


@pytest.mark.parametrize(("output", "pred"), [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("The answer is 1,250.", "1250"),
    ("so 4.50 + 0.50 = 5.00", "5"),
    ("I think -3 degrees", "-3"),
    ("no number here", None),
])
def test_gsm8k_prediction(output: str, pred: str | None):
    assert gsm8k_pred(output) == pred


def test_gsm8k_gold_and_exact_match():
    assert gsm8k_gold("work...\n#### 1,024") == "1024"
    assert gsm8k_gold("no marker") is None
    item = EvalItem("g1", [{"role": "user", "content": "q"}], "18")
    assert score_gsm8k(item, "#### 18")["em"] == 1.0
    assert score_gsm8k(item, "#### 19")["em"] == 0.0


def test_stable_subset_does_not_depend_on_input_order():
    items = [EvalItem(str(i), [], "") for i in range(50)]
    a = [it.id for it in stable_subset(items, 10)]
    b = [it.id for it in stable_subset(list(reversed(items)), 10)]
    assert a == b and len(a) == 10 and a != [str(i) for i in range(10)]


def test_malformed_lines_are_quarantined_with_their_line_number(tmp_path: Path):
    p = tmp_path / "ifeval.jsonl"
    good = {"key": 1, "prompt": "Say hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    p.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"key": 2, "prompt": "x"}) + "\n")
    s = load_ifeval(p)
    assert [it.id for it in s.items] == ["1"] and s.rows_in == 3
    assert [(q["line"], q["reason"].split(":")[0]) for q in s.quarantine] == [(2, "bad_json"), (3, "missing_field")]
    assert s.quarantine[1]["field"] == "instruction_id_list"

    g = tmp_path / "gsm8k.jsonl"
    g.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n"
                 + json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
    gs = load_gsm8k(g)
    assert len(gs.items) == 1 and gs.quarantine[0]["line"] == 2 and "####" in gs.quarantine[0]["reason"]


def test_missing_eval_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_ifeval(tmp_path / "nope.jsonl")


def test_real_ifeval_set_loads_whole(shared_data: Path):
    s = load_ifeval()
    assert len(s.items) == 540 and not s.quarantine


def test_ifeval_checkers_strict_and_loose(tmp_home: Path, shared_data: Path):
    item = EvalItem("7", [{"role": "user", "content": "Answer without commas. End with 'Is there anything else I can help with?'"}],
                    "", {"instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
                         "kwargs": [{}, {"end_phrase": "Is there anything else I can help with?"}]})
    ok = score_ifeval(item, "Sure thing. Is there anything else I can help with?")
    assert ok["prompt_strict"] == 1.0 and ok["inst_strict"] == 1.0 and ok["n_inst"] == 2
    half = score_ifeval(item, "Sure, thing. Is there anything else I can help with?")
    assert half["prompt_strict"] == 0.0 and half["inst_strict"] == 0.5
    # loose removes markdown emphasis before checking (official IFEval behaviour)
    emph = score_ifeval(item, "Sure thing. **Is there anything else I can help with?**")
    assert emph["prompt_strict"] == 0.0 and emph["prompt_loose"] == 1.0


def test_a_checker_that_draws_a_random_value_scores_the_same_answer_the_same_way(tmp_home: Path, shared_data: Path):
    """Prompt 1122 asks for 4+ "#": IFEval's letter checker then counts a random letter. An answer of only "a"s
    passes when that letter is "a"; the verdict must not depend on the global random state, which stays put."""
    import random

    item = next(it for it in load_ifeval().items if it.id == "1122")
    verdicts = set()
    for seed in range(30):
        random.seed(seed)
        expected_next = random.Random(seed).random()
        verdicts.add(score_ifeval(item, "a" * 40)["inst_strict"])
        assert random.random() == expected_next  # the caller's random state is left as it was
    assert len(verdicts) == 1


def test_the_language_checker_gives_one_verdict_per_answer(tmp_home: Path, shared_data: Path):
    """langdetect samples with a fresh seed per call unless seeded: this mixed answer to prompt 3195 ("respond
    in Italian") was judged Italian about 1 time in 10 before scoring fixed the seed; 100 scorings then differ
    with probability 1 - 0.9^100 - 0.1^100 > 0.9999. The seed setting of the caller is left as it was."""
    import langdetect

    item = next(it for it in load_ifeval().items if it.id == "3195")
    answer = "L'avventura\ufffd la nova, no other language is allowed."
    before = langdetect.DetectorFactory.seed
    verdicts = {score_ifeval(item, answer)["instructions"][2]["strict"] for _ in range(100)}
    assert len(verdicts) == 1
    assert langdetect.DetectorFactory.seed == before


def test_sentence_count_checks_run_offline_with_our_punkt(tmp_home: Path, shared_data: Path):
    """The checks that need NLTK punkt_tab (not downloadable here) work with the locally built model."""
    item = EvalItem("9", [{"role": "user", "content": "Answer in fewer than 3 sentences."}], "",
                    {"instruction_id_list": ["length_constraints:number_sentences"],
                     "kwargs": [{"relation": "less than", "num_sentences": 3}]})
    assert score_ifeval(item, "Dr. Smith arrived at 5 p.m. yesterday. He left.")["prompt_strict"] == 1.0
    assert score_ifeval(item, "One. Two. Three. Four.")["prompt_strict"] == 0.0


def test_partial_generations_survive_a_torn_last_line(tmp_path: Path):
    p = tmp_path / ".ifeval.partial-x.jsonl"
    p.write_text(json.dumps({"id": "a", "output": "hi"}) + "\n" + '{"id": "b", "outp')
    assert read_partial(p) == {"a": "hi"}


def test_assistant_mask_covers_exactly_the_answers(smollm2_dir: Path):
    from eval.generate import assistant_token_mask
    from training.load import load_base_tokenizer

    tok = load_base_tokenizer("smollm2-135m-instruct")
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ids, mask = assistant_token_mask(tok, msgs, max_length=512)
    answer = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "Blue." in answer and "Green." in answer
    assert "colour" not in answer and "Another" not in answer and "user" not in answer


@pytest.mark.e2e
def test_evaluate_base_model_end_to_end_then_cached(tmp_home: Path, shared_data: Path, smollm2_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """Real SmolLM2, real IFEval/GSM8K lines, a tiny held-out set: every metric, outputs saved, then cached."""
    import polars as pl

    from eval import evaluate as ev

    hd = tmp_home / "heldout" / "t"
    hd.mkdir(parents=True)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Say hello.", "Hello!"),
        ("What colour is the sky?", "The sky is blue on a clear day."),
    ]]
    pl.DataFrame({"id": ["a", "b", "c"], "messages": convs}).write_parquet(hd / "test.parquet")
    cfg = EvalConfig(batch_size=4, threads=1,
                     heldout=HeldoutEvalConfig(limit=3, generate_limit=2, max_new_tokens=8, max_length=128),
                     ifeval=GenSetConfig(limit=2, max_new_tokens=12), gsm8k=GenSetConfig(limit=2, max_new_tokens=12))
    res = ev.evaluate("smollm2-135m-instruct", cfg, heldout_dir=hd)
    m = res["metrics"]
    assert 0.0 < m["heldout_nll"] < 5.0 and m["heldout_ppl"] > 1.0
    assert 0.0 <= m["heldout_rougeL"] <= 1.0 and m["heldout_cosine"] is not None
    assert set(res["sets"]) == {"heldout", "ifeval", "gsm8k"}
    out_dir = ev.evals_dir() / "base" / "smollm2-135m-instruct"
    ifeval = [json.loads(x) for x in (out_dir / "ifeval.jsonl").read_text().splitlines()]
    assert len(ifeval) == 2 and all(r["output"] for r in ifeval)  # readable generations are kept
    held = [json.loads(x) for x in (out_dir / "heldout.jsonl").read_text().splitlines()]
    assert sum(r["output"] is not None for r in held) == 2
    assert res["sets"]["ifeval"]["stats"]["dropped"] == {"over_limit": 538}
    # another IFEval config for the same model replaces the current outputs but stashes the old ones
    cfg_one = dataclasses.replace(cfg, ifeval=GenSetConfig(limit=1, max_new_tokens=12))
    one = ev.evaluate("smollm2-135m-instruct", cfg_one, heldout_dir=hd)
    assert one["sets"]["ifeval"]["n_items"] == 1 and len((out_dir / "ifeval.jsonl").read_text().splitlines()) == 1

    def no_model(*a, **k):
        raise AssertionError("a cached evaluation must not load the model")

    monkeypatch.setattr(ev, "load_model_for_eval", no_model)
    again = ev.evaluate("smollm2-135m-instruct", cfg, heldout_dir=hd)  # restored from the stash, no model
    assert again["metrics"] == m
    assert [json.loads(x) for x in (out_dir / "ifeval.jsonl").read_text().splitlines()] == ifeval
    assert ev.evaluate("smollm2-135m-instruct", cfg_one, heldout_dir=hd)["sets"]["ifeval"]["n_items"] == 1


@pytest.mark.e2e
def test_assistant_nll_matches_the_full_logits_computation(smollm2_dir: Path):
    """The output layer runs only at assistant positions; the NLL equals the plain full-logits one."""
    import torch
    import torch.nn.functional as F

    from eval.generate import assistant_nll, assistant_token_mask
    from tomelab.models import load_model, load_tokenizer

    tok, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct").eval()
    convs = [("a", [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."}]),
             ("b", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "An apple, a pear or a plum."}])]
    got = assistant_nll(model, tok, convs, max_length=128, tokens_per_batch=64)  # both rows in one batch
    for cid, msgs in convs:
        ids, mask = assistant_token_mask(tok, msgs, 128)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        m = torch.tensor(mask[1:], dtype=torch.bool)
        assert got[cid][1] == int(m.sum()) > 0
        assert got[cid][0] == pytest.approx(float(nll[m].mean()), abs=1e-4)


@pytest.mark.e2e
def test_serving_engine_generation_equals_batched_generation_and_resumes(smollm2_dir: Path, shared_data: Path,
                                                                          tmp_path: Path):
    """`engine = "llama.cpp"` generates through the app's ChatEngine: same template, greedy, stop tokens.
    With the transformers backend behind that ChatEngine the outputs must equal batched `generate_greedy`."""
    from eval.generate import generate_greedy, generate_greedy_engine
    from tomelab.engines.choice import load_engine

    items = stable_subset(load_ifeval(shared_data / "ifeval" / "input_data.jsonl").items, 3)
    prompts = [(it.id, it.messages) for it in items]
    chat = load_engine("smollm2-135m-instruct", engine="transformers", threads=2)
    batched = generate_greedy(chat.backend.model, chat.tokenizer, prompts, max_new_tokens=16, batch_size=3)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"id": prompts[0][0], "output": "kept from a killed run"}) + "\n")
    served = generate_greedy_engine(chat, prompts, max_new_tokens=16, partial_path=partial)
    assert served[prompts[0][0]] == "kept from a killed run"  # resumed, not regenerated
    assert all(served[pid] == batched[pid] and served[pid] for pid, _ in prompts[1:])
    assert set(read_partial(partial)) == {pid for pid, _ in prompts}


def test_engine_choice_is_part_of_the_config():
    assert EvalConfig().engine == "transformers"  # the default keeps every cached output's config hash
    from tomelab.config import from_dict
    from tomelab.errors import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        from_dict(EvalConfig, {"engine": "vllm"}, file="t.toml")
    from eval.evaluate import assist_generation
    from tomelab.errors import TomelabError

    with pytest.raises(TomelabError, match="--assist needs"):
        assist_generation("smollm2-135m-instruct", EvalConfig())


def test_two_engine_workers_share_one_partial_file(tmp_path: Path):
    """The main worker skips an item the other one (`--assist`, walking backwards) wrote meanwhile."""
    from types import SimpleNamespace

    from eval.generate import generate_greedy_engine

    partial = tmp_path / "p.jsonl"
    prompts = [(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    asked: list[str] = []

    class OtherWorkerMeanwhile:
        engine_name = "fake"

        def generate(self, msgs, settings):
            asked.append(msgs[-1]["content"])
            if len(asked) == 1:  # while the main worker answers q0, the assistant finishes q3 and q2
                with partial.open("a") as f:
                    f.write(json.dumps({"id": "3", "output": "by assist"}) + "\n")
                    f.write(json.dumps({"id": "2", "output": "by assist"}) + "\n")
            return SimpleNamespace(text=f" a{msgs[-1]['content']} ")

    done = generate_greedy_engine(OtherWorkerMeanwhile(), prompts, max_new_tokens=4, partial_path=partial)
    assert asked == ["q0", "q1"]
    assert done == {"0": "aq0", "1": "aq1", "2": "by assist", "3": "by assist"}
    assert read_partial(partial) == done
    asked.clear()
    assert generate_greedy_engine(OtherWorkerMeanwhile(), prompts, max_new_tokens=4, partial_path=partial,
                                  reverse=True) == done and asked == []  # nothing left to do


def test_several_engines_share_one_queue_each_with_its_slots(tmp_path: Path):
    """`engine_workers` servers: every prompt is answered once, and each engine is driven by exactly its
    own `slots` worker threads (so both cores' servers stay busy, and no engine gets more than it batches)."""
    import threading
    from types import SimpleNamespace

    from eval.generate import generate_greedy_engine

    class Fake:
        engine_name = "fake"

        def __init__(self, name: str, slots: int) -> None:
            self.name, self.backend, self.threads, self.answered = name, SimpleNamespace(slots=slots), set(), []

        def generate(self, msgs, settings):
            self.threads.add(threading.get_ident())
            if int(msgs[-1]["content"][1:]) < 5:
                first_five.wait()  # the first 5 prompts are in flight together: 5 worker threads exist
            self.answered.append(msgs[-1]["content"])
            return SimpleNamespace(text=f"{self.name}:{msgs[-1]['content']}")

    first_five = threading.Barrier(5, timeout=60)
    a, b = Fake("a", 2), Fake("b", 3)
    prompts = [(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(40)]
    done = generate_greedy_engine([a, b], prompts, max_new_tokens=4, partial_path=tmp_path / "p.jsonl")
    assert set(done) == {pid for pid, _ in prompts}
    assert sorted(a.answered + b.answered) == sorted(f"q{i}" for i in range(40))  # each prompt exactly once
    assert len(a.threads) == 2 and len(b.threads) == 3 and not (a.threads & b.threads)
    assert read_partial(tmp_path / "p.jsonl") == done
    from eval.config import EvalConfig
    from tomelab.config import from_dict
    from tomelab.errors import ConfigError

    with pytest.raises(ConfigError, match="engine_workers"):
        from_dict(EvalConfig, {"engine_workers": 0}, file="t.toml")


def test_ifeval_paired_weights_instruction_metrics_by_instruction_count_and_pairs_items():
    """Prompt A has 3 instructions, B has 1. System a passes all of A's and none of B's, system b the reverse:
    prompt-level both 50 points (difference 0), instruction-level a = 3/4 and b = 1/4 of the instructions."""
    from eval.stats import paired_bootstrap_diff

    def sc(prompt: float, inst: float, n: int) -> dict:
        return {"prompt_strict": prompt, "inst_strict": inst, "prompt_loose": prompt, "inst_loose": inst, "n_inst": n}

    a = [sc(1, 1, 3), sc(0, 0, 1)] * 20
    b = [sc(0, 0, 3), sc(1, 1, 1)] * 20
    out = ifeval_paired(a, b, names=("a", "b"))
    assert set(out) == {"prompt_strict", "inst_strict", "prompt_loose", "inst_loose"}
    assert out["prompt_strict"].mean_a == out["prompt_strict"].mean_b == 50.0
    assert out["prompt_strict"].diff.estimate == 0.0
    assert out["inst_strict"].mean_a == 75.0 and out["inst_strict"].mean_b == 25.0
    assert out["inst_strict"].diff.estimate == pytest.approx(50.0)
    direct = paired_bootstrap_diff([100 * s["inst_strict"] for s in a], [100 * s["inst_strict"] for s in b],
                                   [s["n_inst"] for s in b], min_seeds_a=1, min_seeds_b=1)
    assert (out["inst_strict"].diff.lo, out["inst_strict"].diff.hi) == (direct.lo, direct.hi)
    assert out["inst_strict"].diff.mde == pytest.approx(2.8 * (direct.hi - direct.lo) / 3.92)
    with pytest.raises(ValueError, match="same prompts"):
        ifeval_paired(a, b[:-1])
