"""Training: the recipe config, the assistant-only mask, the token budget, and tiny real runs on SmolLM2-135M.

The end-to-end tests train the real model for a few steps on real Alpaca rows and check the contracts eval and the app rely on: run folder layout, PEFT-loadable
adapter, same seed -> same loss curve, resume after an interruption, skip when finished, export.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tomelab.errors import ConfigError, TomelabError
from training.config import TrainConfig, load_train_config
from training.data import Example, plan_batches, plan_digest

REPO = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m-instruct"


def tiny_config(**over) -> TrainConfig:
    """The default recipe shrunk to a few steps: short rows, small batches, frequent eval/checkpoints.

    Precision stays "auto" (bf16 on CPUs with native bf16, else fp32; TOMELAB_PRECISION forces it),
    so tests whose numbers hold in only one precision pass `precision=` explicitly."""
    cfg = load_train_config(REPO / "configs" / "train" / "default.toml")
    base = dict(token_budget=600, max_length=96, batch_size=2, eval_every=2, save_every=2, val_rows=4,
                learning_rate=1e-3, warmup_ratio=0.0)
    base.update(over)
    return replace(cfg, **base)


# ------------------------------------------------------------------------------- config and planning


@pytest.mark.parametrize("name", ["default", "demo"])
def test_shipped_train_configs_load(name: str) -> None:
    cfg = load_train_config(REPO / "configs" / "train" / f"{name}.toml")
    assert cfg.target_modules == ["all-linear"] and cfg.token_budget > 0


def test_train_config_rejects_unknown_key_and_bad_value(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text("token_budgte = 100\n")
    with pytest.raises(ConfigError, match="token_budgte"):
        load_train_config(p)
    p.write_text("lora_dropout = 1.5\n")
    with pytest.raises(TomelabError, match="lora_dropout"):
        load_train_config(p)


def _examples(lengths: list[int]) -> list[Example]:
    return [Example(str(i), list(range(n)), [False] * (n // 2) + [True] * (n - n // 2)) for i, n in enumerate(lengths)]


def test_plan_reaches_token_budget_and_is_seeded() -> None:
    ex = _examples([50 + (i * 37) % 200 for i in range(100)])
    kw = dict(batch_size=4, grad_accum=2, token_budget=20_000, epochs_cap=3.0, packing="bucket")
    a = plan_batches(ex, seed=1, **kw)
    seen = sum(ex[j].n_tokens for step in a for mb in step for j in mb)
    last_mb = a[-1][-1]
    assert seen >= 20_000 and seen - sum(ex[j].n_tokens for j in last_mb) < 20_000  # stops right at the budget
    assert all(len(step) == 2 for step in a[:-1])  # grad_accum micro-batches per optimiser step
    assert plan_digest(a) == plan_digest(plan_batches(ex, seed=1, **kw))
    assert plan_digest(a) != plan_digest(plan_batches(ex, seed=2, **kw))


def test_bucketing_reduces_padding() -> None:
    ex = _examples([20 + (i * 53) % 400 for i in range(400)])

    def padding(packing: str) -> int:
        plan = plan_batches(ex, seed=0, batch_size=8, grad_accum=1, token_budget=50_000, epochs_cap=1.0, packing=packing)
        return sum(max(ex[j].n_tokens for j in mb) * len(mb) - sum(ex[j].n_tokens for j in mb) for s in plan for mb in s)

    assert padding("bucket") * 5 < padding("none")


def test_micro_batch_cap_splits_wide_batches_but_keeps_each_steps_rows() -> None:
    from training.data import cap_micro_batch

    ex = _examples([20 + (i * 7) % 40 for i in range(100)] + [200 + (i * 53) % 300 for i in range(100)])
    kw = dict(seed=3, batch_size=8, grad_accum=1, token_budget=30_000, epochs_cap=1.0, packing="bucket")
    plain, capped = plan_batches(ex, **kw), plan_batches(ex, micro_batch_tokens=512, **kw)
    assert len(plain) == len(capped)
    for a, b in zip(plain, capped):
        assert sorted(j for mb in a for j in mb) == sorted(j for mb in b for j in mb)  # same rows, same step
        for mb in b:
            assert len(mb) == 1 or len(mb) * max(ex[j].n_tokens for j in mb) <= 512
    assert sum(len(s) for s in capped) > len(capped)  # some steps were split
    assert any(len(mb) == 8 for s in capped for mb in s)  # short rows still go through in wide batches
    lengths = [10, 300, 600, 40]
    assert cap_micro_batch([0, 1, 2, 3], lengths, 512) == [[2], [1], [3, 0]]  # a row over the cap goes alone


def test_new_recipe_knob_at_default_keeps_earlier_config_hashes() -> None:
    from training.train import _recipe_for_hash

    assert "micro_batch_tokens" not in _recipe_for_hash(TrainConfig())  # runs made before the knob stay valid
    assert _recipe_for_hash(TrainConfig(micro_batch_tokens=512))["micro_batch_tokens"] == 512
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        TrainConfig(micro_batch_tokens=-1)


def test_budget_larger_than_data_names_the_fix() -> None:
    ex = _examples([100] * 10)  # 1,000 tokens per epoch
    with pytest.raises(TomelabError, match=r"Lower token_budget to at most 3,000 or raise epochs_cap to 5\.0"):
        plan_batches(ex, seed=0, batch_size=2, grad_accum=1, token_budget=5000, epochs_cap=3.0, packing="none")


# ------------------------------------------------------------------------------- assistant-only mask


@pytest.mark.e2e
def test_loss_mask_covers_exactly_the_assistant_turns(smollm2_dir: Path) -> None:
    from training.data import tokenize_conversation
    from training.load import load_base_tokenizer

    tok = load_base_tokenizer(BASE)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = tokenize_conversation(tok, "x", msgs)
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "Blue, like the sky.<|im_end|>Green.<|im_end|>"
    untrained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m])
    assert "Name a colour." in untrained and "Be brief." in untrained and "Blue" not in untrained


# ------------------------------------------------------------------------------- bad input


def test_unknown_variant_and_unknown_base_give_the_fix(tmp_home: Path, shared_data: Path) -> None:
    from training.fixtures import alpaca_variant
    from training.train import train_run

    with pytest.raises(TomelabError, match=r"never curated.*tomelab curate"):
        train_run("nope", BASE, 0, tiny_config())
    alpaca_variant("tiny", 8)
    with pytest.raises(TomelabError, match="unknown base model 'no-such-model'"):
        train_run("tiny", "no-such-model", 0, tiny_config())


@pytest.mark.e2e
def test_budget_too_large_for_variant(tmp_home: Path, smollm2_dir: Path) -> None:
    from training.fixtures import alpaca_variant
    from training.train import train_run

    alpaca_variant("tiny", 8)
    with pytest.raises(TomelabError, match="token_budget 10,000,000 is larger than variant 'tiny'"):
        train_run("tiny", BASE, 0, tiny_config(token_budget=10_000_000))


class _RunsCode:
    """Unpickling this calls open(marker, "w"): the file appearing means the loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant_malicious_checkpoint(path: Path) -> Path:
    import torch

    marker = path.parent.parent / "PWNED"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config_hash": "x", "plan": "y", "state": _RunsCode(marker)}, path)
    return marker


def _pickle_calls(ckpt: Path) -> set[str]:
    """The globals a torch checkpoint's pickle would import, read from its opcodes without unpickling."""
    import pickletools
    import zipfile

    calls: set[str] = set()
    with zipfile.ZipFile(ckpt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            calls.add(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            calls.add(f"{strings[-2]} {strings[-1]}")
    return calls


def test_malicious_checkpoint_never_runs_code(tmp_path: Path, caplog) -> None:
    """weights_only=True: a pickle that would create a file is refused, with a warning, and run nothing."""
    import torch

    from training.train import load_checkpoint

    ckpt = tmp_path / "run" / "checkpoint.pt"
    marker = _plant_malicious_checkpoint(ckpt)
    with caplog.at_level("WARNING", logger="training.train"):
        assert load_checkpoint(ckpt) is None
    assert not marker.exists()
    assert any("cannot be loaded safely" in r.getMessage() for r in caplog.records)
    assert _pickle_calls(ckpt) & {"io open", "builtins open"}  # the plant is real: it would call open() (read, not run)
    # a genuine checkpoint (tensors, optimiser and scheduler state, plain containers) still loads
    good = tmp_path / "good.pt"
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(2)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"step": 1, "log": [{"loss": 1.0, "val_loss": None}], "stopped_early": False, "best_val": None}
    torch.save({"config_hash": "h", "plan": "p", "lora": {"w": p.detach()}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "state": state}, good)
    back = load_checkpoint(good)
    assert back is not None and back["state"] == state and back["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert load_checkpoint(tmp_path / "missing.pt") is None
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:100])
    assert load_checkpoint(tmp_path / "trunc.pt") is None


def test_bad_seed_variant_and_precision_override_are_one_line_errors(tmp_home: Path, monkeypatch) -> None:
    from training.train import resolve_hardware, train_run

    with pytest.raises(TomelabError, match="--seed must be an integer >= 0"):
        train_run("tiny", BASE, -1, tiny_config())
    for bad in ("../../x", "/tmp/abs", ".hidden", "a..b", "sp ace", ""):
        with pytest.raises(TomelabError, match="--variant"):
            train_run(bad, BASE, 0, tiny_config())
    assert not (tmp_home / "runs").exists()  # no lock folder anywhere
    monkeypatch.setenv("TOMELAB_PRECISION", "fp32")
    assert resolve_hardware(tiny_config(quantization="none"))[2] == "float32"
    monkeypatch.setenv("TOMELAB_PRECISION", "bf16")
    assert resolve_hardware(tiny_config(quantization="none"))[2] == "bfloat16"
    assert resolve_hardware(tiny_config(quantization="none", precision="fp32"))[2] == "float32"  # explicit wins
    monkeypatch.setenv("TOMELAB_PRECISION", "fp16")
    with pytest.raises(TomelabError, match="TOMELAB_PRECISION"):
        resolve_hardware(tiny_config(quantization="none"))


@pytest.mark.e2e
def test_unknown_target_module_lists_the_real_ones(smollm2_dir: Path) -> None:
    from tomelab.models import load_model
    from training.train import check_target_modules

    model = load_model(BASE, dtype="float32")
    check_target_modules(model, ["q_proj", "v_proj"], BASE)
    with pytest.raises(TomelabError, match=r"'nope' is not a module of .*q_proj.*all-linear|'nope' is not a module.*q_proj"):
        check_target_modules(model, ["q_proj", "nope"], BASE)


# ------------------------------------------------------------------------------- real tiny runs


def _curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())]


@pytest.mark.e2e
def test_train_run_end_to_end_and_skip(tmp_home: Path, smollm2_dir: Path) -> None:
    from peft import PeftModel

    from tomelab.models import load_model
    from training.data import read_conversations, tokenize_rows, variant_paths
    from training.fixtures import alpaca_variant
    from training.load import load_base_tokenizer
    from training.loss import AssistantLoss, evaluate_loss
    from training.train import cpu_has_native_bf16, train_run

    alpaca_variant("tiny", 12, n_val=4)
    cfg = tiny_config()
    # a planted checkpoint that would run code if unpickled: ignored, never executed (issue 16)
    planted = tmp_home / "runs" / "tiny" / BASE / "0" / "checkpoint.pt"
    marker = _plant_malicious_checkpoint(planted)
    rd = train_run("tiny", BASE, 0, cfg)
    assert not marker.exists()
    assert rd == tmp_home / "runs" / "tiny" / BASE / "0"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json", "train_log.jsonl",
                 "loss.png", "metrics.json"):
        assert (rd / name).is_file(), name
    assert not (rd / "checkpoint.pt").exists()
    m = json.loads((rd / "metrics.json").read_text())
    assert m["tokens_seen"] >= cfg.token_budget and m["steps"] == m["planned_steps"] >= 3
    assert m["tok_s"] > 0 and m["peak_rss_mb"] > 0 and m["wall_seconds"] >= m["train_seconds"]
    assert m["warmup_steps"] == 0  # tiny_config trains without warm-up
    forced = os.environ.get("TOMELAB_PRECISION")
    assert m["precision"] == (forced or ("bf16" if cpu_has_native_bf16() else "fp32"))  # recorded, as resolved
    resolved = json.loads((rd / "config.json").read_text())
    assert resolved["recipe"]["token_budget"] == cfg.token_budget and resolved["seed"] == 0

    # the adapter loads with plain PEFT, and training lowered the held-out loss against the untouched base
    tok = load_base_tokenizer(BASE)
    _, val_path = variant_paths("tiny")
    val_ex, _ = tokenize_rows(tok, read_conversations(val_path, limit=cfg.val_rows), cfg.max_length, "val")
    dtype, bf16 = m["base_dtype"], m["base_dtype"] == "bfloat16"  # evaluate as the run did
    base = load_model(BASE, dtype=dtype)
    base_val = evaluate_loss(AssistantLoss(base), base, val_ex, batch_size=4, pad_id=tok.pad_token_id, device="cpu", bf16=bf16)
    tuned = PeftModel.from_pretrained(load_model(BASE, dtype=dtype), str(rd / "adapter"))
    assert any("lora_" in n for n, _ in tuned.named_parameters())
    # the run's own batches: under bf16 (CPUs with AMX / avx512_bf16) padding moves the loss by ~0.006
    tuned_val = evaluate_loss(AssistantLoss(tuned.get_base_model()), tuned, val_ex, batch_size=cfg.batch_size,
                              pad_id=tok.pad_token_id, device="cpu", bf16=bf16)
    assert tuned_val == pytest.approx(m["final_val_loss"], abs=2e-3)
    assert tuned_val < base_val
    del base, tuned

    # asked again: skipped (metrics untouched); a changed recipe is refused rather than overwritten
    stamp = (rd / "metrics.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert train_run("tiny", BASE, 0, cfg) == rd
    assert (rd / "metrics.json").stat().st_mtime_ns == stamp and time.perf_counter() - t0 < 30
    with pytest.raises(TomelabError, match="--force"):
        train_run("tiny", BASE, 0, replace(cfg, learning_rate=5e-4))


@pytest.mark.e2e
def test_warmup_over_every_step_is_flagged_and_trains_nothing(tmp_home: Path, smollm2_dir: Path, caplog) -> None:
    """Linear warm-up starts at lr 0, so a run whose steps are all warm-up leaves LoRA B at its zero init.

    The token-budget sweep's 1k arm hit this silently (one step, 5% warm-up rounded up to one step)."""
    from safetensors.torch import load_file

    from training.fixtures import alpaca_variant
    from training.train import train_run

    alpaca_variant("tiny", 12, n_val=4)
    cfg = tiny_config(token_budget=100, warmup_ratio=0.05)
    with caplog.at_level("WARNING", logger="training.train"):
        rd = train_run("tiny", BASE, 0, cfg)
    m = json.loads((rd / "metrics.json").read_text())
    assert m["planned_steps"] == m["warmup_steps"] == 1
    assert any("warm-up covers all 1 optimiser step" in r.getMessage() for r in caplog.records)
    lora_b = [t for n, t in load_file(str(rd / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in n]
    assert lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b)


@pytest.mark.e2e
def test_capped_micro_batches_train_the_same_model(tmp_home: Path, smollm2_dir: Path) -> None:
    """Splitting a step into more micro-batches changes only the summation order (no dropout here)."""
    from training.fixtures import alpaca_variant
    from training.train import train_run

    alpaca_variant("tiny", 12, n_val=4)
    # fp32: only the summation order changes, ~1e-5. In bf16 a different split moves the loss by ~0.5%
    # (1.5826 vs 1.5903 measured on an avx512_bf16 CPU), so this claim is only testable in fp32.
    cfg = tiny_config(lora_dropout=0.0, batch_size=4, micro_batch_tokens=0, precision="fp32")
    whole = _curve(train_run("tiny", BASE, 0, cfg))
    split = _curve(train_run("tiny", BASE, 0, replace(cfg, micro_batch_tokens=96), force=True))  # a row per micro-batch
    assert len(whole) == len(split) >= 3
    for a, b in zip(whole, split):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):  # train loss, validation loss (None where the record has none)
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, abs=1e-4))


@pytest.mark.slow  # five tiny runs: minutes on a shared 2-core machine
@pytest.mark.e2e
def test_same_seed_same_curve_and_resume_matches(tmp_home: Path, smollm2_dir: Path) -> None:
    from conftest import Killed, kill_after
    from training.fixtures import alpaca_variant
    from training.train import train_run

    alpaca_variant("tiny", 12, n_val=4)
    cfg = tiny_config()
    a = _curve(train_run("tiny", BASE, 7, cfg))
    b = _curve(train_run("tiny", BASE, 7, cfg, force=True))
    assert a == b and len(a) >= 3
    c = _curve(train_run("tiny", BASE, 8, cfg))
    assert [r[1] for r in c if r[1] is not None] != [r[1] for r in a if r[1] is not None]

    # stop after step 3 (checkpoint at step 2, step 3 lost), then resume: the same curve as uninterrupted
    with pytest.raises(Killed):
        train_run("tiny", BASE, 7, cfg, force=True, on_step=kill_after(3))
    rd = tmp_home / "runs" / "tiny" / BASE / "7"
    assert (rd / "checkpoint.pt").is_file() and not (rd / "metrics.json").exists()
    assert _curve(train_run("tiny", BASE, 7, cfg)) == a


@pytest.mark.slow  # three CLI runs, a kill -9 and an export
@pytest.mark.e2e
def test_cli_train_survives_kill_9_and_export_merges(tmp_home: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    """`tomelab train` killed with SIGKILL mid-run resumes to the same curve; `tomelab export` merges."""
    import torch

    from training.fixtures import alpaca_variant
    from training.load import describe, load_for_inference

    alpaca_variant("tiny", 40)
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text("token_budget = 3000\nmax_length = 128\nbatch_size = 4\neval_every = 3\nsave_every = 1\n"
                        "val_rows = 8\nlearning_rate = 1e-3\nwarmup_ratio = 0.0\n")
    cmd = [sys.executable, "-m", "tomelab.cli", "train", "--variant", "tiny", "--base", BASE, "--seed", "3",
           "--config", str(cfg_path)]
    env = dict(os.environ, TOMELAB_HOME=str(tmp_home), HF_HUB_OFFLINE="1")
    rd = tmp_home / "runs" / "tiny" / BASE / "3"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (rd / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # let it get past the checkpoint into the next step
    assert proc.poll() is None, "run finished before it could be killed: raise token_budget"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (rd / "metrics.json").exists()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr
    resumed = _curve(rd)
    r = subprocess.run(cmd + ["--force"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _curve(rd) == resumed

    r = subprocess.run([sys.executable, "-m", "tomelab.cli", "export", str(rd)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = Path(r.stdout.strip().splitlines()[-1])
    assert (merged / "model.safetensors").is_file() and describe(merged)["kind"] == "merged"
    assert describe(merged)["run_dir"] == str(rd.resolve())
    m1, tok = load_for_inference(str(merged))
    m2, _ = load_for_inference(str(rd))
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(m1(ids).logits, m2(ids).logits, atol=1e-4)
