"""CTranslate2 batched generation settings for evaluation: workers x threads x batch size, same prompts.

    .venv/bin/python bench/ct2_settings.py                       # 2 single-thread workers (batch 16, 32) vs 1 worker (2 threads or 1) at batch 64
    .venv/bin/python bench/ct2_settings.py --settings 2x1x16 2x1x32 1x1x64 1x2x64 --limit 64

Each setting `WxTxB` (W batch workers = CTranslate2 `inter_threads`, T threads each, batches of B prompts)
answers the same IFEval prompts (the eval's item order) greedily through `eval.generate.generate_greedy_batched`,
the eval's own path, up to `--max-new-tokens`. Printed per setting, all in this run: generated tokens, wall
seconds, tok/s, CPU seconds and the tok/s ratio against the first setting. Settings run one after another,
so run it on a quiet machine (or repeat it): it backs the choice of `engine_workers` and `batch_size` for
`engine = "ctranslate2"` (docs/evaluation.md), not a speed claim against another engine (bench/eval_engine.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base name, run dir or merged export")
    ap.add_argument("--limit", type=int, default=64, help="IFEval prompts (the eval's item order)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--settings", nargs="+", default=["2x1x16", "2x1x32", "1x2x64", "1x1x64"],
                    help="WORKERSxTHREADSxBATCH; the first is the reference of the ratios")
    args = ap.parse_args()

    from eval.generate import generate_greedy_batched
    from eval.sets import load_ifeval, stable_subset
    from tomelab.engines.choice import load_engine

    prompts = [(it.id, it.messages) for it in stable_subset(load_ifeval().items, None)[: args.limit]]
    rows = []
    for setting in args.settings:
        workers, threads, batch = (int(x) for x in setting.split("x"))
        engine = load_engine(args.model, engine="ctranslate2", ct2_quantization=args.compute_type, threads=threads,
                             context_length=4096, replicas=workers)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = generate_greedy_batched(engine, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch,
                                       desc=setting)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(engine.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs.values())
        rows.append((setting, tokens, wall, tokens / wall, cpu))
    print(f"\n{args.model}: {len(prompts)} IFEval prompts, greedy, max {args.max_new_tokens} new tokens, "
          f"CTranslate2 {args.compute_type}")
    print("| workers x threads x batch | generated tokens | s | tok/s | CPU s | tok/s vs first |")
    print("|---|---|---|---|---|---|")
    for setting, tokens, wall, rate, cpu in rows:
        print(f"| {setting} | {tokens} | {wall:.1f} | {rate:.1f} | {cpu:.0f} | {rate / rows[0][3]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
