"""`evaluate(ref, cfg, heldout_dir=...)`: every configured eval set, same items for every model.

Outputs per (model, set) go to `artifacts/evals/<run-key>/<set>.jsonl` (one line per item: id, prompt,
output, reference, scores) plus `metrics.json`. A set whose config, items and model are unchanged is
read back instead of recomputed, so the base model is evaluated once and an ablation resumes.
Outputs of another config for the same (model, set) are stashed as `.<set>.<config hash>.jsonl/.json`
rather than overwritten, so switching between eval configs (a quick subset, then the full set) never
throws away finished generations: asking for an earlier config again restores its outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from eval.config import METRICS, EvalConfig
from eval.sets import (
    EvalItem,
    LoadedSet,
    load_gsm8k,
    load_heldout,
    load_ifeval,
    load_nll_extras,
    score_gsm8k,
    score_ifeval,
    stable_subset,
)
from tomelab.artifacts import Run, evals_dir
from tomelab.config import config_hash, to_dict
from tomelab.errors import TomelabError
from tomelab.io import exclusive, read_json, write_json, write_jsonl
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)


def run_key(ref: str | Path) -> str:
    """`base/<name>` for a base model, `<variant>/<base>/<seed>` for a run dir under artifacts/runs."""
    p = Path(ref)
    if p.is_dir():
        return Run(p).key
    if any(ch in str(ref) for ch in "/\\") and not str(ref).count("/") == 1:
        raise TomelabError(f"run {ref} does not exist. Give a run dir (artifacts/runs/<variant>/<base>/<seed>) or a base model name.")
    return "base/" + str(ref).replace("/", "__")


def _model_fingerprint(ref: str | Path) -> str:
    """Changes when a run is retrained, so stale cached outputs are not reused."""
    p = Path(ref)
    if p.is_dir():
        run = Run(p)
        if not run.is_finished:
            raise TomelabError(f"run {p} has no metrics.json: training did not finish. Re-run `tomelab train` for it.")
        return hashlib.sha256(run.metrics_path.read_bytes()).hexdigest()[:12]
    return str(ref)


def load_model_for_eval(ref: str | Path, dtype: str) -> tuple[Any, Any]:
    """The training area's loader: a base model name, a run dir (adapter merged) or a merged export."""
    from training.load import load_for_inference

    return load_for_inference(str(ref), dtype=dtype)


def _load_set(name: str, cfg: EvalConfig, heldout_dir: Path | None) -> LoadedSet:
    if name == "heldout":
        if heldout_dir is None:
            raise TomelabError("the heldout eval set needs heldout_dir (from a variant's stats.json); pass --heldout-dir.")
        return load_heldout(heldout_dir)
    if name == "ifeval":
        return load_ifeval(cfg.ifeval.path or None)
    return load_gsm8k(cfg.gsm8k.path or None)


def _rouge_l(refs: list[str], outs: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outs)]


def _cosines(refs: list[str], outs: list[str], model: str) -> list[float] | None:
    import numpy as np

    from tomelab.embed import Embedder

    emb = Embedder(model=model)
    key = lambda t: "evaltext-" + hashlib.sha256(t.encode()).hexdigest()[:16]  # noqa: E731
    a = np.asarray(emb.encode([key(t) for t in refs], refs))
    b = np.asarray(emb.encode([key(t) for t in outs], outs))
    return [float(x) for x in (a * b).sum(axis=1)]


def _weighted(records: list[dict], key: str, weight: str | None) -> float | None:
    vals = [(r["scores"][key], r["scores"][weight] if weight else 1.0) for r in records
            if r["scores"].get(key) is not None and not (isinstance(r["scores"][key], float) and math.isnan(r["scores"][key]))]
    den = sum(w for _, w in vals)
    return sum(v * w for v, w in vals) / den if den else None


def summarise(set_name: str, records: list[dict]) -> dict[str, float | None]:
    """Set-level metrics from per-item scores (the ablation recomputes the same from the JSONL)."""
    def in_split(r: dict, subset: str | None) -> bool:
        return subset is None or r["scores"].get("split", "test") == subset

    # clean/rejected subsets need the held-out labels, which the ablation joins (eval/labels.py)
    out = {m: _weighted([r for r in records if in_split(r, sub)], key, w)
           for m, (s, key, w, _, sub) in METRICS.items() if s == set_name and not (sub and ":" in sub)}
    out = {m: v for m, v in out.items() if v is not None or not m.endswith("nll") or m == "heldout_nll"}
    if set_name == "heldout" and out.get("heldout_nll") is not None:
        out["heldout_ppl"] = math.exp(out["heldout_nll"])
    if set_name == "ifeval" and out.get("ifeval_prompt_strict") is not None:
        # lighteval's headline IFEval number: the mean of prompt- and instruction-level strict accuracy
        out["ifeval_avg_strict"] = (out["ifeval_prompt_strict"] + out["ifeval_inst_strict"]) / 2
    return out


def _heldout_generation_items(pool: list[EvalItem], sc: Any, tok: Any) -> list[EvalItem]:
    """The first `generate_limit` items (hash order, whole set) whose prompt fits `max_prompt_tokens`.

    Chosen from the whole held-out set rather than the NLL subset: most ShareGPT threads are long, and
    a fixed tokenizer makes the choice identical for every run of one base model.
    """
    from eval.generate import render_prompt

    if not sc.generate:
        return []
    chosen = []
    for it in pool:
        if sc.generate_limit is not None and len(chosen) >= sc.generate_limit:
            break
        if len(tok(render_prompt(tok, it.messages), add_special_tokens=False)["input_ids"]) <= sc.max_prompt_tokens:
            chosen.append(it)
    return chosen


def _evaluate_set(name: str, items: list[EvalItem], cfg: EvalConfig, model: Any, tok: Any, out_dir: Path, tag: str,
                  pool: list[EvalItem] | None = None, engine: Any = None) -> list[dict]:
    from eval.generate import assistant_nll, generate_greedy, generate_greedy_batched, generate_greedy_engine

    sc = getattr(cfg, name)
    if name == "heldout":
        gen_items = _heldout_generation_items(pool or items, sc, tok)
        nll_ids = {it.id for it in items}
        items = items + [it for it in gen_items if it.id not in nll_ids]
    else:
        gen_items = items
    records = [{"id": it.id, "prompt": it.messages, "output": None, "reference": it.reference, "scores": {}} for it in items]
    by_id = {r["id"]: r for r in records}
    if name == "heldout":
        window = (sc.answer_tokens, sc.context_tokens) if sc.answer_tokens else None
        nll = assistant_nll(model, tok, [(it.id, it.extra["conversation"]) for it in items if it.id in nll_ids],
                            max_length=sc.max_length, desc="heldout nll", window=window)
        split = {it.id: it.extra.get("split", "test") for it in items}
        for cid, (v, k) in nll.items():
            by_id[cid]["scores"].update(nll=None if math.isnan(v) else v, n_tokens=k, split=split[cid])
    if gen_items:
        prompts = [(it.id, it.messages) for it in gen_items]
        partial = out_dir / f".{name}.partial-{tag}.jsonl"
        if engine is not None and not isinstance(engine, list) and hasattr(engine.backend, "generate_batch"):
            outs = generate_greedy_batched(engine, prompts, max_new_tokens=sc.max_new_tokens, batch_size=cfg.batch_size,
                                           partial_path=partial, desc=f"{name} generate", loop_rule=cfg.loop_rule())
        elif engine is not None:
            outs = generate_greedy_engine(engine, prompts, max_new_tokens=sc.max_new_tokens, partial_path=partial,
                                          desc=f"{name} generate", loop_rule=cfg.loop_rule())
        else:
            outs = generate_greedy(model, tok, prompts, max_new_tokens=sc.max_new_tokens, batch_size=cfg.batch_size,
                                   partial_path=partial, desc=f"{name} generate")
        for it in gen_items:
            by_id[it.id]["output"] = outs[it.id]
    if name == "heldout" and gen_items:
        refs = [it.reference for it in gen_items]
        outs_l = [by_id[it.id]["output"] for it in gen_items]
        # the reference cut to the output window: an answer that stops at max_new_tokens is not scored
        # against text it was never allowed to write (F1 would be capped by length)
        refs = [tok.decode(tok(r, add_special_tokens=False)["input_ids"][: sc.max_new_tokens]) for r in refs]
        rouge = _rouge_l(refs, outs_l)
        cos = _cosines(refs, outs_l, sc.embed_model)
        for j, it in enumerate(gen_items):
            by_id[it.id]["scores"]["rougeL"] = rouge[j]
            by_id[it.id]["scores"]["cosine"] = cos[j] if cos is not None else None
    elif name == "ifeval":
        for it in items:
            by_id[it.id]["scores"] = score_ifeval(it, by_id[it.id]["output"])
    elif name == "gsm8k":
        for it in items:
            by_id[it.id]["scores"] = score_gsm8k(it, by_id[it.id]["output"])
    return records


def evaluate(ref: str | Path, cfg: EvalConfig, *, heldout_dir: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate one model (base name or run dir) on every enabled set; cached per (model, set).

    One process at a time evaluates a model: another one waits, then reads the cached outputs."""
    with exclusive(evals_dir() / run_key(ref), "evaluate"):
        return _evaluate(ref, cfg, heldout_dir=heldout_dir, force=force)


def _evaluate(ref: str | Path, cfg: EvalConfig, *, heldout_dir: Path | None, force: bool) -> dict[str, Any]:
    key = run_key(ref)
    out_dir = evals_dir() / key
    metrics_path = out_dir / "metrics.json"
    state: dict[str, Any] = read_json(metrics_path) if metrics_path.is_file() else {}
    state.update(ref=str(ref), run_key=key)
    state.setdefault("sets", {})
    fingerprint = _model_fingerprint(ref)
    model = tok = engine = None
    for name in cfg.enabled_sets():
        with Timer() as t:
            loaded = _load_set(name, cfg, Path(heldout_dir) if heldout_dir else None)
            pool = stable_subset(loaded.items, None)
            items = pool[: getattr(cfg, name).limit]
            if name == "heldout" and heldout_dir:
                items = items + load_nll_extras(heldout_dir, cfg.heldout)
            tag = _set_tag(name, cfg, items, pool, fingerprint)
            cached = state["sets"].get(name, {})
            if not force and cached.get("config_hash") == tag and (out_dir / f"{name}.jsonl").is_file():
                log.info("%s/%s: cached (%d items)", key, name, cached.get("n_items", 0))
                continue
            _stash_set(out_dir, name, cached)
            if not force and _restore_set(out_dir, name, tag, state):
                log.info("%s/%s: restored from an earlier run of this config (%d items)", key, name,
                         state["sets"][name].get("n_items", 0))
                write_json(metrics_path, state)
                continue
            if model is None:
                log.info("loading %s", ref)
                if cfg.threads:
                    import torch

                    torch.set_num_threads(cfg.threads)
                model, tok = load_model_for_eval(ref, cfg.dtype)
                engine = _generation_engine(ref, cfg)
            records = _evaluate_set(name, items, cfg, model, tok, out_dir, tag, pool, engine)
            write_jsonl(out_dir / f"{name}.jsonl", records)
            if loaded.quarantine:
                write_jsonl(out_dir / f"{name}.quarantine.jsonl", loaded.quarantine)
        n_extra = sum(1 for r in records if r["scores"].get("split", "test") != "test")  # val / reference items
        n_kept = len(records)
        n_main = n_kept - n_extra
        stats = StageStats(stage=f"eval:{name}", rows_in=loaded.rows_in + n_extra, kept=n_kept,
                           dropped={**({"malformed": len(loaded.quarantine)} if loaded.quarantine else {}),
                                    **({"over_limit": len(loaded.items) - n_main} if len(loaded.items) > n_main else {})},
                           seconds=round(t.seconds, 2)).check()
        state["sets"][name] = {"config_hash": tag, "n_items": n_kept, "metrics": summarise(name, records),
                               "stats": stats.to_dict(), "quarantined": loaded.quarantine[:20]}
        partial = out_dir / f".{name}.partial-{tag}.jsonl"
        if partial.exists():
            partial.unlink()
        state["metrics"] = {m: v for s in state["sets"].values() for m, v in s["metrics"].items()}
        write_json(metrics_path, state)  # after every set: a killed run keeps finished sets
    state["metrics"] = {m: v for n, s in state["sets"].items() if n in cfg.enabled_sets() for m, v in s["metrics"].items()}
    write_json(metrics_path, state)
    return state


def _set_tag(name: str, cfg: EvalConfig, items: list[EvalItem], pool: list[EvalItem], fingerprint: str) -> str:
    """What a set's cached outputs depend on: its config, its items, the model and the decoding path."""
    return config_hash({"set": to_dict(getattr(cfg, name)), "items": [it.id for it in items],
                        "pool": [it.id for it in pool] if name == "heldout" else None,
                        "model": fingerprint, "dtype": cfg.dtype,
                        # only when not the default, so outputs cached before this option stay valid
                        **_engine_tag(cfg)})


def _engine_tag(cfg: EvalConfig) -> dict[str, Any]:
    """What of the generation engine changes its outputs (nothing for the default, so outputs cached before
    these options existed stay valid). CTranslate2: the compute type, version and batch composition."""
    if cfg.engine == "transformers":
        return {}
    loops = {"loops": [cfg.loop_repeats, cfg.loop_min_tokens]} if cfg.loop_repeats else {}
    if cfg.engine == "ctranslate2":
        import ctranslate2

        return {"engine": f"ctranslate2-{cfg.ct2_compute_type}", "runtime": f"ctranslate2-{ctranslate2.__version__}",
                "batch": cfg.batch_size, "threads": cfg.threads or 1, **loops}
    return {"engine": f"{cfg.engine}-{cfg.gguf_type}", "runtime": _llama_runtime(), "slots": cfg.slots,
            **({"workers": cfg.engine_workers} if cfg.engine_workers != 1 else {}), **loops}


def _llama_runtime() -> str:
    """Which llama.cpp runtime generates (batched xllamacpp slots and one-at-a-time llama-cpp-python can
    differ in late tokens), so their cached outputs are never mixed."""
    import os

    from tomelab.engines.backend_llamacpp import xllamacpp_available

    return "xllamacpp" if xllamacpp_available() and os.environ.get("TOMELAB_LLAMACPP") != "llama-cpp-python" \
        else "llama-cpp-python"


def assist_generation(ref: str | Path, cfg: EvalConfig) -> int:
    """A second worker for a running `tomelab eval` of the same model and config: generates the pending
    IFEval/GSM8K items from the last one backwards into the evaluation's partial file, and returns how
    many of them are answered (by either worker). Scoring stays with the main process, which skips what
    this one wrote.
    Only for a serving engine (`engine = "llama.cpp"`), whose generation is one prompt at a time."""
    from eval.generate import generate_greedy_engine

    if cfg.engine != "llama.cpp":
        raise TomelabError(f"--assist needs `engine = \"llama.cpp\"` in the eval config: batched {cfg.engine} "
                           "generation cannot share its work item by item (it already uses `engine_workers` cores).")
    key, fingerprint = run_key(ref), _model_fingerprint(ref)
    out_dir = evals_dir() / key
    engine, answered = None, 0
    for name in cfg.enabled_sets():
        if name == "heldout":
            continue  # NLL and held-out generation stay with the main process
        loaded = _load_set(name, cfg, None)
        pool = stable_subset(loaded.items, None)
        items = pool[: getattr(cfg, name).limit]
        tag = _set_tag(name, cfg, items, pool, fingerprint)
        metrics = out_dir / "metrics.json"
        finished = read_json(metrics).get("sets", {}).get(name, {}) if metrics.is_file() else {}
        if finished.get("config_hash") == tag and (out_dir / f"{name}.jsonl").is_file():
            continue  # already finished
        partial = out_dir / f".{name}.partial-{tag}.jsonl"
        engine = engine or _generation_engine(ref, cfg)
        done = generate_greedy_engine(engine, [(it.id, it.messages) for it in items], max_new_tokens=getattr(cfg, name).max_new_tokens,
                                      partial_path=partial, desc=f"{name} assist", reverse=True)
        answered += sum(it.id in done for it in items)
    return answered


def _generation_engine(ref: str | Path, cfg: EvalConfig) -> Any:
    """The serving engines that generate answers when the config asks for them (None: transformers):
    `engine_workers` llama.cpp servers of one thread each (one per core; two spinning threads in one
    server ran slower here, ../shared/NOTES.md), each decoding `slots` prompts together."""
    if cfg.engine == "transformers":
        return None
    from tomelab.engines.backend_llamacpp import XLlamaBackend
    from tomelab.engines.chat import ChatEngine
    from tomelab.engines.choice import load_engine

    if cfg.engine == "ctranslate2":  # one engine: `engine_workers` batches decode in parallel inside it
        return load_engine(str(ref), engine="ctranslate2", ct2_quantization=cfg.ct2_compute_type, threads=cfg.threads or 1,
                           dtype=cfg.dtype, context_length=4096, replicas=cfg.engine_workers)

    first = load_engine(str(ref), engine=cfg.engine, gguf_type=cfg.gguf_type, threads=cfg.threads or 1,
                        dtype=cfg.dtype, context_length=4096, slots=cfg.slots)
    if not isinstance(first.backend, XLlamaBackend):  # llama-cpp-python: one prompt at a time, one server
        return [first]
    # more servers on the same GGUF file: the model is loaded and converted once, by `load_engine`
    b = first.backend
    return [first] + [ChatEngine(XLlamaBackend(b.gguf, threads=b.threads, context_length=b.context_length, slots=b.slots,
                                                       lora=b.lora),
                                 first.tokenizer, label=first.label, stop_ids=first.stop_ids, info=dict(first.info))
                      for _ in range(cfg.engine_workers - 1)]


def _stash_set(out_dir: Path, name: str, cached: dict[str, Any]) -> None:
    """Keep the current outputs of `name` under their config hash before another config replaces them."""
    current = out_dir / f"{name}.jsonl"
    old_tag = cached.get("config_hash")
    if old_tag and current.is_file() and not (out_dir / f".{name}.{old_tag}.json").is_file():
        shutil.copyfile(current, out_dir / f".{name}.{old_tag}.jsonl")
        write_json(out_dir / f".{name}.{old_tag}.json", cached)  # written last: marks the stash complete


def _restore_set(out_dir: Path, name: str, tag: str, state: dict[str, Any]) -> bool:
    """Bring back stashed outputs of config `tag`, if a complete stash exists."""
    stash, stash_state = out_dir / f".{name}.{tag}.jsonl", out_dir / f".{name}.{tag}.json"
    if not (stash.is_file() and stash_state.is_file()):
        return False
    tmp = out_dir / f".{name}.jsonl.restoring"
    shutil.copyfile(stash, tmp)
    tmp.replace(out_dir / f"{name}.jsonl")
    state["sets"][name] = read_json(stash_state)
    state["metrics"] = {m: v for s in state["sets"].values() for m, v in s["metrics"].items()}
    return True


def read_item_scores(ref: str | Path, set_name: str) -> dict[str, dict[str, Any]]:
    """Per-item scores of a finished evaluation, by item id (for the paired bootstrap)."""
    path = evals_dir() / run_key(ref) / f"{set_name}.jsonl"
    if not path.is_file():
        raise TomelabError(f"no {set_name} outputs for {ref} at {path}: run `tomelab eval {ref}` first.")
    return {r["id"]: r["scores"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
