"""Engine choice: `load_engine` turns a model reference into a ready `ChatEngine`.

`engine="auto"` tries `AUTO_CANDIDATES` in speed order and serves the first that is installed and
passes its check: a quantised GGUF the held-out-NLL quality guard (`tomelab.engines.guard`), any
other the greedy match against transformers fp32 (`tomelab.engines.match`); otherwise transformers.
Naming an engine serves it without the greedy check and fails loudly when it cannot load.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from tomelab.engines.backend_ctranslate2 import CTranslate2Backend, ctranslate2_available
from tomelab.engines.backend_llamacpp import llama_cpp_available, llama_cpp_backend, xllamacpp_available
from tomelab.engines.backend_transformers import TransformersBackend
from tomelab.engines.chat import ChatEngine, stop_token_ids
from tomelab.engines.convert import export_ct2, gguf_is_quantised, hf_weights_dir, pick_gguf, served_gguf
from tomelab.engines.match import match_report
from tomelab.engines.replicas import ReplicaBackend
from tomelab.errors import TomelabError

log = logging.getLogger(__name__)


def load_for_inference(ref: str, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) for a base name, a run dir or a merged export: training's loader when present."""
    try:
        from training.load import load_for_inference as training_load  # type: ignore[import-not-found]
    except ImportError:
        training_load = None
    if training_load is not None:
        return training_load(ref, dtype=dtype)
    p = Path(ref)
    if p.is_dir() and (p / "adapter").is_dir():
        raise TomelabError(f"{ref} is a run dir with an adapter, but training.load is not available to load it.")
    from tomelab.models import load_model, load_tokenizer

    return load_model(ref, dtype=dtype), load_tokenizer(ref)


# `auto` tries these (engine, weights) in speed order as measured by bench/inference.py
# (SmolLM2-135M, 1 thread: llama.cpp Q4_1 57.7 tok/s > ct2 int8 > llama.cpp f16 35.4 > llama.cpp f32 23.3
# > ct2 float32 18.5 > transformers fp32 12.1) and serves the first whose greedy output matches
# transformers fp32 (`MATCH_CRITERION`); transformers is the fallback. The quantised ones fail the match
# (Q4_1 3/8, q8_0 1/8, ct2 int8 1/8 prompts, first differences 0.01-0.44 nats apart); f16 and f32 pass
# (8/8 on the base model; 7/8 + one 0.0014-nat tie on the README ablation's winner).
# Quantised GGUFs are gated by the quality guard instead (`tomelab.engines.guard`: held-out NLL and IFEval
# vs the f16 file, paired CIs), which asks whether they are measurably worse, not whether greedy text is equal.
# `auto` is a base model's source file (or q8_0 for a fine-tune: 0.88x the source file's tok/s, guard
# passed at +0.0003 nats); `lora` serves a fine-tune as its base's source file + adapter (exact weights,
# 0.78x). A q4_1 export of a fine-tune is no option: it snaps back to the base's grid (guard: +0.016 nats).
AUTO_ORDER = ("llama.cpp", "ctranslate2")
AUTO_CANDIDATES = (("llama.cpp", "auto"), ("llama.cpp", "q8_0"), ("llama.cpp", "lora"), ("ctranslate2", "int8"), ("llama.cpp", "f16"), ("llama.cpp", "f32"),
                   ("ctranslate2", "float32"))


def _fast_engine(kind: str, ref: str, model: Any, tok: Any, stop: set[int], *, threads: int | None,
                 context_length: int, gguf_type: str, ct2_quantization: str, label: str, info: dict,
                 slots: int = 4, replicas: int = 1) -> ChatEngine:
    if kind == "llama.cpp":
        if not llama_cpp_available():
            raise TomelabError("no llama.cpp runtime: `pip install xllamacpp` (prebuilt wheel; `make setup` installs it)")
        gguf, lora = served_gguf(ref, model, tok, gguf_type)
        n = max(1, replicas if xllamacpp_available() else 1)
        backends = [llama_cpp_backend(gguf, threads=threads if n == 1 else 1, context_length=context_length,
                                      slots=-(-slots // n), lora=lora) for _ in range(n)]
        backend: Any = backends[0] if n == 1 else ReplicaBackend(backends)
        info = dict(info, weights=str(gguf), runtime=getattr(backend, "runtime", "llama-cpp-python"),
                    slots=getattr(backend, "slots", 1), replicas=n, **({"lora": str(lora)} if lora else {}))
    elif kind == "ctranslate2":
        if not ctranslate2_available():
            raise TomelabError("ctranslate2 is not installed: pip install 'ctranslate2>=4.8,<5'")
        ct2 = export_ct2(hf_weights_dir(ref, model, tok), ct2_quantization)
        backend = CTranslate2Backend(ct2, tok, compute_type=ct2_quantization, threads=threads, context_length=context_length,
                                     workers=replicas)
        info = dict(info, weights=str(ct2), workers=backend.workers)
    else:
        raise TomelabError(f"unknown engine {kind!r}; use auto, transformers, llama.cpp or ctranslate2")
    return ChatEngine(backend, tok, label=label, stop_ids=stop, info=info)


def _guard_report(ref: str, model: Any, tok: Any, quant: Path, lora: str | None = None) -> dict:
    """The quality guard of `quant` (+ `lora`) against the f16 GGUF of the same weights (cached per file)."""
    from tomelab.engines.guard import cached_guard, ifeval_summary

    report = cached_guard(quant, pick_gguf(ref, model, tok, "f16"), model, tok, **({"lora": lora} if lora else {}))
    leg = report.get("ifeval")
    report.setdefault("summary", (f"{'PASS' if report['passed'] else 'REFUSED'}: held-out NLL diff {report['diff']:+.4f} nats "
                                  f"(95% CI [{report['lo']:+.4f}, {report['hi']:+.4f}], MDE {report['mde']:.4f}, "
                                  f"margin {report['margin']}, {report['n_items']} conversations)"
                                  + (f"; {ifeval_summary(leg)}" if leg else "")))
    return report


def load_engine(
    ref: str,
    *,
    engine: str = "auto",
    label: str | None = None,
    threads: int | None = None,
    dtype: str = "float32",
    gguf_type: str = "auto",
    ct2_quantization: str = "int8",
    context_length: int = 2048,
    info: dict | None = None,
    slots: int = 4,
    guard: bool = True,
    replicas: int = 1,
) -> ChatEngine:
    """A ready `ChatEngine` for `ref` (base name, run dir or merged export).

    `auto` serves the first of `AUTO_CANDIDATES` that is installed and whose greedy outputs match the
    transformers fp32 reference (`compare_greedy`, checked once per weights and cached under
    `artifacts/cache/engine_choice/`); otherwise transformers `generate`. Naming an engine
    serves it without the check (and fails loudly when it cannot load). `slots`: concurrent requests
    llama.cpp (xllamacpp) decodes together; others queue. `replicas` > 1: that many single-thread llama.cpp
    servers of the file share the `slots` and the requests (`tomelab.engines.replicas`: one per core); for
    CTranslate2, that many batches decode in parallel (`inter_threads`, used by batched evaluation).
    A quantised GGUF (Q4_1, q8_0, ...) is served only when it passes the quality guard
    (`tomelab.engines.guard`: held-out NLL vs the f16 file, paired CI; verdict in `info["quality_guard"]`),
    in `auto` and when named (`guard=False` skips it, for benchmarks of speed only).
    """
    if engine not in ("auto", "transformers", *AUTO_ORDER):
        raise TomelabError(f"unknown engine {engine!r}; use auto, transformers, {' or '.join(AUTO_ORDER)}")
    model, tok = load_for_inference(ref, dtype=dtype)
    stop = stop_token_ids(tok, getattr(model.generation_config, "eos_token_id", None))
    label = label or ref
    hf = ChatEngine(TransformersBackend(model, threads=threads, context_length=context_length), tok,
                    label=label, stop_ids=stop, info=dict(info or {}))
    if engine == "transformers":
        hf.info["engine_reason"] = "requested"
        return hf
    reasons: list[str] = []
    reference_ids: dict[str, list[int]] = {}
    if engine == "auto":
        candidates = list(AUTO_CANDIDATES)
    else:
        candidates = [(engine, gguf_type if engine == "llama.cpp" else ct2_quantization)]
    for kind, weights in candidates:
        try:
            fast = _fast_engine(kind, ref, model, tok, stop, threads=threads, context_length=context_length,
                                gguf_type=weights, ct2_quantization=weights, label=label, info=dict(info or {}),
                                slots=slots, replicas=replicas)
        except (TomelabError, subprocess.CalledProcessError, OSError, RuntimeError, ValueError) as e:
            if engine != "auto":
                raise TomelabError(f"cannot serve {ref} with {kind}: {e}") from e
            log.warning("%s (%s) unavailable for %s: %s", kind, weights, ref, e)
            reasons.append(f"{kind} {weights}: {str(e)[:120]}")
            continue
        if kind == "llama.cpp" and guard and gguf_is_quantised(fast.info["weights"]):
            try:
                g = _guard_report(ref, model, tok, Path(fast.info["weights"]), fast.info.get("lora"))
            except (TomelabError, OSError, RuntimeError, ValueError) as e:
                if engine != "auto":
                    raise TomelabError(f"quality guard of {fast.info['weights']} could not run: {e}") from e
                reasons.append(f"{kind} {weights}: quality guard could not run ({str(e)[:120]})")
                continue
            fast.info["quality_guard"] = g
            served = Path(fast.info["weights"]).name + (" + LoRA adapter" if fast.info.get("lora") else "")
            verdict = f"{served}: quality guard {g['summary']}"
            if g["passed"]:
                fast.info["engine_reason"] = verdict
                return fast
            if engine != "auto":
                raise TomelabError(f"refusing to serve {ref} from {verdict}. Use a less quantised --gguf-type (f16).")
            log.warning("%s (%s) on %s: %s", kind, weights, ref, verdict)
            reasons.append(f"{kind} {weights} refused by the {verdict}")
            continue
        if engine != "auto":
            fast.info["engine_reason"] = f"requested ({Path(fast.info['weights']).name}, greedy match not checked)"
            return fast
        report = match_report(hf, fast, reference_ids)
        match = (f"greedy match {report['exact']}/{report['prompts']} prompts"
                 + (f" + {report['ties']} at a numerical tie" if report.get("ties") else "") + f", mean prefix {report['mean_prefix']}")
        if report["passed"]:
            fast.info["engine_reason"] = f"{Path(fast.info['weights']).name}: {match}"
            return fast
        log.warning("%s (%s) on %s failed the greedy match (%s)", kind, weights, ref, match)
        reasons.append(f"{kind} {weights} failed the {match}")
    hf.info["engine_reason"] = "fallback; " + "; ".join(reasons) if reasons else "fallback"
    return hf
