"""Evaluation generation: transformers batched `generate` vs the llama.cpp serving engine, same prompts.

    .venv/bin/python bench/eval_engine.py                          # 24 IFEval prompts, 256 new tokens
    .venv/bin/python bench/eval_engine.py --limit 32 --max-new-tokens 96 --threads 1

Both sides answer the same IFEval prompts (the eval's own item order, `stable_subset`) greedily with the
same chat template, through the eval's own functions: `eval.generate.generate_greedy` (transformers,
left-padded batches sorted by length, KV cache) and `eval.generate.generate_greedy_engine` (llama.cpp on
a GGUF of the same weights, one prompt at a time). Printed: generated tokens per second of wall time
for each (ratio against transformers), how many outputs are identical, and the IFEval scores from
each side's outputs, so a faster engine that changes the numbers is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _n_tokens(tok, outputs: dict[str, str]) -> int:
    return sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs.values())


def _scores(items, outputs: dict[str, str]) -> dict[str, float]:
    from eval.sets import score_ifeval

    s = [score_ifeval(it, outputs[it.id]) for it in items]
    n_inst = sum(x["n_inst"] for x in s)
    return {"prompt_strict": 100 * sum(x["prompt_strict"] for x in s) / len(s),
            "inst_strict": 100 * sum(x["inst_strict"] * x["n_inst"] for x in s) / n_inst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=24, help="IFEval prompts (the eval's item order)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="transformers side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gguf-type", default="f16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from eval.generate import generate_greedy, generate_greedy_engine
    from eval.sets import load_ifeval, stable_subset
    from tomelab.inference import load_engine
    from training.load import load_for_inference

    torch.set_num_threads(args.threads)
    items = stable_subset(load_ifeval().items, None)[: args.limit]
    prompts = [(it.id, it.messages) for it in items]
    model, tok = load_for_inference(args.model, dtype="float32")
    engine = load_engine(args.model, engine="llama.cpp", gguf_type=args.gguf_type, threads=args.threads,
                         context_length=4096)

    results = {}
    for name, fn in (("transformers", lambda: generate_greedy(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                                             batch_size=args.batch_size, desc="transformers")),
                     (f"llama.cpp {args.gguf_type}", lambda: generate_greedy_engine(engine, prompts,
                                                                                   max_new_tokens=args.max_new_tokens,
                                                                                   desc="llama.cpp"))):
        t0 = time.perf_counter()
        outs = fn()
        sec = time.perf_counter() - t0
        n = _n_tokens(tok, outs)
        results[name] = {"outputs": outs, "seconds": round(sec, 1), "tokens": n, "tok_s": round(n / sec, 1),
                         **{k: round(v, 1) for k, v in _scores(items, outs).items()}}

    ref, fast = results["transformers"], results[f"llama.cpp {args.gguf_type}"]
    same = sum(ref["outputs"][i] == fast["outputs"][i] for i, _ in prompts)
    print(f"\n{args.model}: {len(items)} IFEval prompts, greedy, max {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s), transformers batch {args.batch_size}")
    print("| engine | generated tokens | seconds | tok/s | vs transformers | IFEval prompt-strict | inst-strict |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tok_s']} | {r['tok_s'] / ref['tok_s']:.2f}x | "
              f"{r['prompt_strict']} | {r['inst_strict']} |")
    print(f"identical outputs: {same}/{len(items)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "identical": same, "n": len(items),
                                               "results": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
