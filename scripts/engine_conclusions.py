"""Does a fast eval engine reach the same conclusion as transformers about two models?

    .venv/bin/python scripts/engine_conclusions.py artifacts/bench/eval_engine_base.json \
        artifacts/bench/eval_engine_finetuned.json

Reads two `bench/eval_engine.py --json` outputs (model A, model B; the same IFEval prompts), re-scores every
saved answer with the official checkers, and prints, for each engine the two runs share, the paired difference
B - A in prompt- and instruction-strict accuracy with its 95% bootstrap CI (items paired). An engine agrees in
conclusion with transformers fp32 when its difference lies inside transformers' interval and its interval
overlaps transformers' estimate; the printed "gap" is the difference of the two differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_a", help="bench/eval_engine.py JSON of the first model (e.g. the base)")
    ap.add_argument("model_b", help="bench/eval_engine.py JSON of the second model (e.g. a fine-tune)")
    args = ap.parse_args()

    from eval.sets import ifeval_paired, load_ifeval, score_ifeval

    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (args.model_a, args.model_b))
    items = {it.id: it for it in load_ifeval().items}
    shared = [e for e in a["results"] if e in b["results"]]
    ids = [i for i in a["results"][shared[0]]["outputs"] if i in b["results"][shared[0]]["outputs"]]
    print(f"B = {b['args']['model']} vs A = {a['args']['model']}: {len(ids)} IFEval prompts in both runs")
    print("| engine | metric | A | B | B - A (95% CI) | gap to transformers |")
    print("|---|---|---|---|---|---|")
    ref: dict[str, float] = {}
    for engine in shared:
        sa, sb = ([score_ifeval(items[i], run["results"][engine]["outputs"][i]) for i in ids] for run in (a, b))
        for metric, m in ifeval_paired(sb, sa, ("prompt_strict", "inst_strict"), names=("B", "A")).items():
            ci = m.diff
            gap = "reference" if engine.startswith("transformers") else f"{ci.estimate - ref[metric]:+.1f}"
            if engine.startswith("transformers"):
                ref[metric] = ci.estimate
            print(f"| {engine} | {metric} | {m.mean_b:.1f} | {m.mean_a:.1f} | {ci.estimate:+.1f} [{ci.lo:+.1f}, "
                  f"{ci.hi:+.1f}] | {gap} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
