"""Batched evaluation generation (`engine = "ctranslate2"`): fixed length-sorted batches, `workers` of them
in flight, resume without changing any batch, no new batch after an error, and the real CTranslate2 path
through `evaluate`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval.config import EvalConfig, GenSetConfig, HeldoutEvalConfig
from eval.generate import generate_greedy_batched, read_partial


class CharTokenizer:
    """One token per character: prompt length = content length, so the batch order is known."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class FakeBatchBackend:
    """Answers each prompt with itself reversed; records every batch it is given."""

    def __init__(self, workers: int, fail_on: str | None = None, barrier: threading.Barrier | None = None) -> None:
        self.workers, self.fail_on, self.barrier = workers, fail_on, barrier
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def generate_batch(self, prompts_ids, *, max_new_tokens, stop_ids):
        texts = ["".join(map(chr, p)) for p in prompts_ids]
        with self.lock:
            self.batches.append(texts)
        if self.barrier is not None:
            self.barrier.wait()  # both workers' first batches are in flight together
        if self.fail_on in texts:
            raise RuntimeError("engine died")
        return [[ord(c) for c in reversed(t)][:max_new_tokens] for t in texts]


def engine(backend: FakeBatchBackend) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=CharTokenizer(), backend=backend, stop_ids={0}, engine_name="fake")


PROMPTS = [(f"p{i}", [{"role": "user", "content": "x" * (i % 5 + 1) + f"#{i}"}]) for i in range(10)]


def _longest_first() -> list[str]:
    text = {pid: msgs[0]["content"] for pid, msgs in PROMPTS}
    return [text[p] for p in sorted(text, key=lambda p: (-len(text[p]), int(p[1:])))]


def test_prompts_go_in_fixed_length_sorted_batches_two_at_a_time(tmp_path: Path):
    backend = FakeBatchBackend(workers=2, barrier=threading.Barrier(2, timeout=60))
    done = generate_greedy_batched(engine(backend), PROMPTS, max_new_tokens=64, batch_size=3,
                                   partial_path=tmp_path / "p.jsonl")
    assert done == {pid: msgs[0]["content"][::-1] for pid, msgs in PROMPTS}
    order = _longest_first()
    assert sorted(backend.batches) == sorted(order[i:i + 3] for i in range(0, 10, 3))
    assert backend.batches[:2] in ([order[0:3], order[3:6]], [order[3:6], order[0:3]])  # longest first
    assert read_partial(tmp_path / "p.jsonl") == done


def test_resume_skips_finished_batches_and_keeps_the_others_unchanged(tmp_path: Path):
    partial = tmp_path / "p.jsonl"
    backend = FakeBatchBackend(workers=1, fail_on=_longest_first()[6])  # the third batch dies
    with pytest.raises(RuntimeError, match="engine died"):
        generate_greedy_batched(engine(backend), PROMPTS, max_new_tokens=64, batch_size=3, partial_path=partial)
    order = _longest_first()
    assert backend.batches == [order[0:3], order[3:6], order[6:9]]  # nothing started after the failure
    assert len(read_partial(partial)) == 6  # the two finished batches are kept
    again = FakeBatchBackend(workers=1)
    done = generate_greedy_batched(engine(again), PROMPTS, max_new_tokens=64, batch_size=3, partial_path=partial)
    assert again.batches == [order[6:9], order[9:10]]  # the same batches as an uninterrupted run
    assert len(done) == 10 and read_partial(partial) == done
    assert generate_greedy_batched(engine(FakeBatchBackend(workers=1)), PROMPTS, max_new_tokens=64, batch_size=3,
                                   partial_path=partial) == done


def test_ctranslate2_is_a_config_choice_with_its_own_cache_key():
    from eval.evaluate import _engine_tag, assist_generation
    from tomelab.config import from_dict
    from tomelab.errors import ConfigError, TomelabError

    cfg = from_dict(EvalConfig, {"engine": "ctranslate2", "ct2_compute_type": "int8"}, file="t.toml")
    tag = _engine_tag(cfg)
    assert tag["engine"] == "ctranslate2-int8" and tag["batch"] == 16
    assert _engine_tag(from_dict(EvalConfig, {"engine": "ctranslate2", "batch_size": 8}, file="t.toml")) != tag
    assert _engine_tag(EvalConfig()) == {}  # the default keeps cached transformers outputs valid
    with pytest.raises(ConfigError, match="ct2_compute_type"):
        from_dict(EvalConfig, {"engine": "ctranslate2", "ct2_compute_type": "int4"}, file="t.toml")
    with pytest.raises(TomelabError, match="--assist needs"):
        assist_generation("smollm2-135m-instruct", cfg)
    loops = from_dict(EvalConfig, {"engine": "ctranslate2", "loop_repeats": 4, "loop_min_tokens": 64}, file="t.toml")
    assert _engine_tag(loops) == {**tag, "loops": [4, 64]} and loops.loop_rule().min_repeats == 4
    assert cfg.loop_rule() is None
    with pytest.raises(ConfigError, match="loop_repeats needs engine"):
        from_dict(EvalConfig, {"loop_repeats": 4}, file="t.toml")
    with pytest.raises(ConfigError, match="loop_repeats must be 0"):
        from_dict(EvalConfig, {"engine": "ctranslate2", "loop_repeats": 1}, file="t.toml")


@pytest.mark.e2e
def test_real_ctranslate2_batched_evaluation(tmp_home: Path, shared_data: Path, smollm2_dir: Path):
    """Real SmolLM2 converted to CTranslate2 int8, two workers: answers stop at end of turn or at
    max_new_tokens (generated tokens only), and a resumed run reproduces the uninterrupted one."""
    pytest.importorskip("ctranslate2")
    from eval import evaluate as ev
    from eval.sets import load_ifeval, stable_subset
    from tomelab.engines.choice import load_engine

    items = stable_subset(load_ifeval(shared_data / "ifeval" / "input_data.jsonl").items, 4)
    prompts = [(it.id, it.messages) for it in items]
    ct2 = load_engine("smollm2-135m-instruct", engine="ctranslate2", ct2_quantization="int8", threads=1, replicas=2)
    assert ct2.backend.workers == 2
    full = generate_greedy_batched(ct2, prompts, max_new_tokens=20, batch_size=2)
    n = {pid: len(ct2.tokenizer(o, add_special_tokens=False)["input_ids"]) for pid, o in full.items()}
    assert all(o for o in full.values()) and max(n.values()) <= 21 and "<|im_end|>" not in "".join(full.values())
    partial = tmp_home / "p.jsonl"
    first = sorted(prompts, key=lambda p: -len(ct2.tokenizer(
        ct2.tokenizer.apply_chat_template(p[1], tokenize=False, add_generation_prompt=True))["input_ids"]))[:2]
    partial.write_text("".join(json.dumps({"id": pid, "output": full[pid]}) + "\n" for pid, _ in first))
    assert generate_greedy_batched(ct2, prompts, max_new_tokens=20, batch_size=2, partial_path=partial) == full

    # loop extrapolation: an answer caught in a cycle (a lax rule) leaves its batch early, and the written-out
    # answer is the one full decoding writes
    from tomelab.engines.loops import LoopRule

    ids_full: dict = {}
    decoded = generate_greedy_batched(ct2, prompts, max_new_tokens=48, batch_size=2, answer_ids=ids_full)
    ids_loops: dict = {}
    looped = generate_greedy_batched(ct2, prompts, max_new_tokens=48, batch_size=2, answer_ids=ids_loops,
                                     loop_rule=LoopRule(min_repeats=2, min_tokens=8))
    assert ct2.backend.loop_stats["answers"] >= 1 and ct2.backend.loop_stats["extrapolated_tokens"] >= 1
    assert ids_loops == ids_full and looped == decoded

    cfg = EvalConfig(batch_size=2, threads=1, engine="ctranslate2", engine_workers=2,
                     heldout=HeldoutEvalConfig(enabled=False), gsm8k=GenSetConfig(enabled=False),
                     ifeval=GenSetConfig(limit=4, max_new_tokens=20))
    res = ev.evaluate("smollm2-135m-instruct", cfg)
    out = [json.loads(x) for x in (ev.evals_dir() / "base" / "smollm2-135m-instruct" / "ifeval.jsonl").read_text().splitlines()]
    assert {r["id"]: r["output"] for r in out} == full  # the eval's path is this batched path
    assert res["sets"]["ifeval"]["n_items"] == 4


@pytest.mark.e2e
def test_real_llamacpp_servers_through_evaluate_with_and_without_a_loop_rule(tmp_home: Path, shared_data: Path,
                                                                             smollm2_dir: Path):
    """`engine = "llama.cpp"` with two servers (a list of engines) through `evaluate`, then the same prompts with
    a lax loop rule: its own cache entry, and every answer it did not stop is the decoded one."""
    from eval import evaluate as ev

    base = dict(batch_size=2, threads=1, engine="llama.cpp", gguf_type="f16", engine_workers=2, slots=2,
                heldout=HeldoutEvalConfig(enabled=False), gsm8k=GenSetConfig(enabled=False),
                ifeval=GenSetConfig(limit=3, max_new_tokens=48))
    path = ev.evals_dir() / "base" / "smollm2-135m-instruct" / "ifeval.jsonl"
    full = ev.evaluate("smollm2-135m-instruct", EvalConfig(**base))
    decoded = {r["id"]: r["output"] for r in map(json.loads, path.read_text().splitlines())}
    assert full["sets"]["ifeval"]["n_items"] == 3 and all(decoded.values())
    looped = ev.evaluate("smollm2-135m-instruct", EvalConfig(**base, loop_repeats=2, loop_min_tokens=8))
    assert looped["sets"]["ifeval"]["config_hash"] != full["sets"]["ifeval"]["config_hash"]
    out = {r["id"]: r["output"] for r in map(json.loads, path.read_text().splitlines())}
    assert out.keys() == decoded.keys() and sum(out[i] == decoded[i] for i in out) >= 2


def test_eval_engine_bench_rescores_a_saved_run_without_generating(tmp_home: Path, smollm2_dir: Path, shared_data: Path):
    """`bench/eval_engine.py --from-json` reads a saved run's answers and timings, re-scores them and prints the
    report (a loop side against its engine decoding every token included), writes nothing; a file that is not a
    saved run is one line and exit 2."""
    import subprocess
    import sys

    from eval.sets import load_ifeval, stable_subset

    root = Path(__file__).resolve().parent.parent
    ids = [it.id for it in stable_subset(load_ifeval().items, None)[:2]]
    answers = {"transformers fp32": (["Sure.", "No."], 1.0), "ctranslate2 int8 2x16 batch": (["Sure.", "No."], 0.2),
               "ctranslate2 int8 2x16 batch +loops 3x128": (["Sure.", "Yes, yes, yes."], 0.1)}
    saved = {"args": {"model": "smollm2-135m-instruct", "limit": 2, "max_new_tokens": 16, "batch_size": 16,
                      "hf_threads": 2, "workers": 2, "slots": 8, "gguf_type": [], "ct2": ["int8"], "ct2_batch": 16,
                      "loops": [3, 128], "chunk": 0, "json": "x.json"},
             "results": {name: {"outputs": dict(zip(ids, outs)), "seconds": sec} for name, (outs, sec) in answers.items()}}
    run_json = tmp_home / "saved.json"
    run_json.write_text(json.dumps(saved), encoding="utf-8")
    bench = [sys.executable, str(root / "bench" / "eval_engine.py"), "--from-json"]
    p = subprocess.run([*bench, str(run_json)], cwd=tmp_home, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ctranslate2 int8 2x16 batch +loops 3x128: 1/2 answers identical to the same engine decoding every token; " \
           "2.00x its wall time" in p.stdout
    assert p.stdout.count("(loops - decoding every token)") == 4
    assert "ctranslate2 int8 2x16 batch +loops 3x128 10.00x wall time -> met" in p.stdout
    assert {x.name for x in tmp_home.iterdir()} - {"models", "cache"} == {"saved.json"}  # no report written (cache: Punkt)

    bad = subprocess.run([*bench, str(tmp_home / "missing.json")], cwd=tmp_home, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "missing.json: not a saved run of this bench" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
