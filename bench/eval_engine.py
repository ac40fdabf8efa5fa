"""Evaluation generation: transformers batched `generate` vs CTranslate2 batches and llama.cpp slots, same prompts.

    .venv/bin/python bench/eval_engine.py                                  # 24 IFEval prompts, 192 new tokens
    .venv/bin/python bench/eval_engine.py --limit 64 --max-new-tokens 512 --batch-size 32 --ct2 int8 --gguf-type f16

Every side answers the same IFEval prompts (the eval's own item order, `stable_subset`) greedily with the
same chat template, through the eval's own functions: `eval.generate.generate_greedy` (transformers fp32,
left-padded batches sorted by length, KV cache), `eval.generate.generate_greedy_batched` (`--ct2`:
CTranslate2 on the converted weights, length-sorted batches of `--ct2-batch`, `--workers` single-thread
batch workers) and `eval.generate.generate_greedy_engine` (`--gguf-type`: llama.cpp on a GGUF of the same
weights, `--workers` single-thread servers with `--slots` prompts each decoded together by continuous
batching). All stop at end of turn. The sides take turns chunk by chunk (`--chunk` prompts), so load from
other processes hits them alike. Printed, all measured in this run:

* generated tokens per wall second of each side and their ratio (the speed-up of evaluation);
* the greedy-match rate (identical answers) and the mean common-prefix fraction;
* IFEval prompt-/instruction-strict of each side and the paired difference (fast - transformers) with a
  95% bootstrap CI (`eval.stats.paired_bootstrap_diff`, items paired) and its MDE (2.8 x SE): the fast
  engine "does not change conclusions" when the CI contains 0;
* the projected time of a full IFEval (540 prompts, 512 new tokens) from each side's measured tok/s.

`--loops R M` adds, for each `--ct2` and `--gguf-type` type, a side with loop extrapolation (`loop_repeats = R`,
`loop_min_tokens = M`): its answers caught in a token cycle are written out, not decoded, so its tokens
per second count tokens it never decoded; its speed-up is the wall-time ratio, and its greedy match
against the same engine without the rule says whether the written-out answers are the decoded ones, and the
paired IFEval difference (all four metrics) what the rule costs.

`--from-json PATH` generates nothing: it re-scores the answers of a saved run (its `--json`) with today's
checkers and prints the same report, its timings those of the saved run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL_PROMPTS, FULL_NEW_TOKENS = 540, 512


def _n_tokens(tok, outputs: dict[str, str]) -> dict[str, int]:
    return {k: len(tok(o, add_special_tokens=False)["input_ids"]) for k, o in outputs.items()}


def _prefix(a: str, b: str) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(1, len(a), len(b))


def _loops_tag(rule) -> str:
    return f" +loops {rule.min_repeats}x{rule.min_tokens}" if rule else ""


def _chunk(args: argparse.Namespace) -> int:
    """Prompts per turn of the interleaving: `--chunk`, or the largest batch of any side."""
    return args.chunk or max(args.batch_size, args.workers * args.slots, args.workers * args.ct2_batch if args.ct2 else 0)


def _generate(args: argparse.Namespace, prompts: list) -> tuple[dict, Any]:
    """Every side's answers and seconds; the sides take turns chunk by chunk, so load from other processes on
    the shared CPU hits them alike."""
    import torch

    from eval.generate import generate_greedy, generate_greedy_batched, generate_greedy_engine
    from tomelab.engines.choice import load_engine, load_for_inference
    from tomelab.engines.loops import LoopRule

    torch.set_num_threads(args.hf_threads)
    model, tok = load_for_inference(args.model, dtype="float32")
    runs = {"transformers fp32": lambda ps: generate_greedy(model, tok, ps, max_new_tokens=args.max_new_tokens,
                                                            batch_size=args.batch_size, desc="transformers")}
    for gt in args.gguf_type:  # the eval's own engine set-up: `workers` single-thread servers x `slots`
        engines = [load_engine(args.model, engine="llama.cpp", gguf_type=gt, threads=1, context_length=4096,
                               slots=args.slots, guard=False) for _ in range(args.workers)]
        for rule in [None] + ([LoopRule(*args.loops)] if args.loops else []):
            runs[f"llama.cpp {gt} {args.workers}x{args.slots} slots" + _loops_tag(rule)] = (
                lambda e, r: lambda ps: generate_greedy_engine(e, ps, max_new_tokens=args.max_new_tokens,
                                                               desc="llama.cpp", loop_rule=r))(engines, rule)
    for ct in args.ct2:  # the eval's `engine = "ctranslate2"`: `workers` batches of `ct2_batch` at once
        ct2 = load_engine(args.model, engine="ctranslate2", ct2_quantization=ct, threads=1, context_length=4096,
                          replicas=args.workers)
        name = f"ctranslate2 {ct} {args.workers}x{args.ct2_batch} batch"
        for rule in [None] + ([LoopRule(*args.loops)] if args.loops else []):
            runs[name + _loops_tag(rule)] = (
                lambda e, r: lambda ps: generate_greedy_batched(e, ps, max_new_tokens=args.max_new_tokens,
                                                                batch_size=args.ct2_batch, desc="generate", loop_rule=r))(ct2, rule)
    acc = {name: {"outputs": {}, "seconds": 0.0} for name in runs}
    chunk = _chunk(args)
    for i in range(0, len(prompts), chunk):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            acc[name]["outputs"].update(fn(prompts[i : i + chunk]))
            acc[name]["seconds"] += time.perf_counter() - t0
    return acc, tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base name, run dir or merged export")
    ap.add_argument("--limit", type=int, default=24, help="IFEval prompts (the eval's item order)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16, help="transformers side")
    ap.add_argument("--hf-threads", type=int, default=2, help="torch threads of the transformers side (2: both cores)")
    ap.add_argument("--workers", type=int, default=2, help="llama.cpp servers / CTranslate2 batch workers of 1 thread each (2: both cores)")
    ap.add_argument("--slots", type=int, default=8, help="llama.cpp parallel sequences per server")
    ap.add_argument("--gguf-type", nargs="*", default=["f16"], help="GGUF types served by llama.cpp (none: skip llama.cpp)")
    ap.add_argument("--ct2", nargs="*", default=[], help="CTranslate2 compute types to add (int8, int16, float32, ...)")
    ap.add_argument("--ct2-batch", type=int, default=16, help="CTranslate2 prompts per batch (`--workers` batches at once)")
    ap.add_argument("--loops", type=int, nargs=2, metavar=("REPEATS", "MIN_TOKENS"), default=None,
                    help="also run each --ct2 and --gguf-type type with loop extrapolation (eval's loop_repeats, loop_min_tokens)")
    ap.add_argument("--chunk", type=int, default=0, help="prompts per turn of the interleaving (0: the largest batch of any side)")
    ap.add_argument("--json", default="artifacts/bench/eval_engine.json")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="generate nothing: re-score and print a saved run (the --json of an earlier run, its settings)")
    args = ap.parse_args()

    import numpy as np

    from eval.sets import IFEVAL_METRICS, ifeval_paired, load_ifeval, score_ifeval, stable_subset

    if args.from_json:
        try:
            saved = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            vars(args).update({k: v for k, v in saved["args"].items() if k not in ("json", "from_json")})
            acc = {n: {"outputs": r["outputs"], "seconds": r["seconds"]} for n, r in saved["results"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"{args.from_json}: not a saved run of this bench ({e}); pass the --json file of an earlier run",
                  file=sys.stderr)
            return 2
    items = stable_subset(load_ifeval().items, None)[: args.limit]
    prompts = [(it.id, it.messages) for it in items]
    if args.from_json:
        from training.load import describe, load_base_tokenizer

        tok = load_base_tokenizer(describe(args.model)["base"] or args.model)
    else:
        acc, tok = _generate(args, prompts)
    chunk = _chunk(args)
    results = {}
    for name, a in acc.items():
        outs, sec = a["outputs"], a["seconds"]
        n = _n_tokens(tok, outs)
        scores = [score_ifeval(it, outs[it.id]) for it in items]
        results[name] = {"outputs": outs, "seconds": round(sec, 1), "tokens": sum(n.values()),
                         "tok_s": round(sum(n.values()) / sec, 1), "scores": scores,
                         "prompt_strict": 100 * float(np.mean([s["prompt_strict"] for s in scores])),
                         "inst_strict": 100 * sum(s["inst_strict"] * s["n_inst"] for s in scores) / sum(s["n_inst"] for s in scores)}
    ref = results["transformers fp32"]
    compare = {}
    for name, fast in results.items():
        if name == "transformers fp32":
            continue
        same = sum(ref["outputs"][i] == fast["outputs"][i] for i, _ in prompts)
        prefix = float(np.mean([_prefix(ref["outputs"][i], fast["outputs"][i]) for i, _ in prompts]))
        diffs = {metric: {**m.diff.to_dict(), "mde": m.diff.mde, "agree": not m.diff.excludes_zero()}
                 for metric, m in ifeval_paired(fast["scores"], ref["scores"], ("prompt_strict", "inst_strict"),
                                                names=("fast", "transformers")).items()}
        compare[name] = {"identical": same, "mean_prefix": prefix, "diffs": diffs}

    print(f"\n{args.model}: {len(items)} IFEval prompts, greedy, max {args.max_new_tokens} new tokens, {chunk} prompts per "
          f"turn; transformers batch {args.batch_size} on {args.hf_threads} thread(s); llama.cpp {args.workers} server(s) "
          f"x 1 thread x {args.slots} slots; CTranslate2 {args.workers} worker(s) x 1 thread x batch {args.ct2_batch}")
    print("| engine | generated tokens | seconds | tok/s | vs transformers | projected full IFEval (min) | prompt-strict | inst-strict |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mean_len = r["tokens"] / len(items)
        proj = FULL_PROMPTS * min(FULL_NEW_TOKENS, mean_len * FULL_NEW_TOKENS / args.max_new_tokens) / r["tok_s"] / 60
        if " +loops " in name:  # its tokens include written-out ones: scale its sibling's projection by wall time
            plain = results[name.split(" +loops ")[0]]
            proj = plain["projected_full_ifeval_min"] * r["seconds"] / plain["seconds"]
        r["projected_full_ifeval_min"] = round(proj, 1)
        print(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tok_s']} | {r['tok_s'] / ref['tok_s']:.2f}x | "
              f"{proj:.1f} | {r['prompt_strict']:.1f} | {r['inst_strict']:.1f} |")
    for name, c in compare.items():
        fast = results[name]
        print(f"\n{name}: speed ratio vs transformers (same run, interleaved) {fast['tok_s'] / ref['tok_s']:.2f}x tok/s, "
              f"{ref['seconds'] / fast['seconds']:.2f}x wall time")
        print(f"  greedy match: {c['identical']}/{len(items)} identical answers ({100 * c['identical'] / len(items):.0f}%), "
              f"mean common prefix {c['mean_prefix']:.2f}")
        for metric, d in c["diffs"].items():
            print(f"  paired diff {metric} (fast - transformers): {d['estimate']:+.1f} points, 95% CI [{d['lo']:+.1f}, "
                  f"{d['hi']:+.1f}], MDE {d['mde']:.1f} -> {'agree (CI contains 0: no difference larger than the MDE)' if d['agree'] else 'DIFFER'}")
    for name in compare:
        r = results[name]
        if " +loops " in name:  # tokens it wrote out were never decoded: wall time is its speed
            plain = results[name.split(" +loops ")[0]]
            same = sum(plain["outputs"][i] == r["outputs"][i] for i, _ in prompts)
            speed = ref["seconds"] / r["seconds"]
            compare[name]["identical_to_full_decoding"] = same
            print(f"{name}: {same}/{len(items)} answers identical to the same engine decoding every token; "
                  f"{plain['seconds'] / r['seconds']:.2f}x its wall time")
            for metric, m in ifeval_paired(r["scores"], plain["scores"], IFEVAL_METRICS, names=("loops", "full")).items():
                print(f"  paired diff {metric} (loops - decoding every token): {m.diff.estimate:+.2f} points, 95% CI "
                      f"[{m.diff.lo:+.2f}, {m.diff.hi:+.2f}]")
        else:
            speed = r["tok_s"] / ref["tok_s"]
        print(f"goal (issue 19): evaluation generation >= 6x faster than transformers on the same cores: "
              f"{name} {speed:.2f}x {'wall time' if ' +loops ' in name else 'tok/s'} -> "
              f"{'met' if speed >= 6 else 'NOT met'}; full IFEval <= 15 min: projected "
              f"{r['projected_full_ifeval_min']:.1f} min -> {'met' if r['projected_full_ifeval_min'] <= 15 else 'NOT met'}")
    print("projection: full IFEval = 540 prompts x (mean answer length scaled to 512 new tokens, capped) / tok/s; "
          "an upper bound, since answers that stop early do not grow")
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "n": len(items), "compare": compare,
                                               "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                                                           for k, v in results.items()}}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
