"""Print the quality guard's verdict for GGUFs of one model: each `--gguf-type` against the f16 file.

    .venv/bin/python scripts/quality_guard.py artifacts/runs/demo-random/smollm2-135m-instruct/0 q8_0 lora q4_1

The same call `load_engine` makes before serving a quantised file (`tomelab.engines.guard.quality_guard`:
held-out NLL on 32 conversations, then, if that passes, 32 IFEval prompts answered by both files through
llama.cpp), uncached, so each line is a fresh measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", help="base model name or run dir")
    ap.add_argument("types", nargs="+", help="GGUF types: q8_0, q4_1, q5_1, lora (a run: base source file + adapter), ...")
    args = ap.parse_args()

    from tomelab.engines.choice import load_for_inference
    from tomelab.engines.convert import pick_gguf, served_gguf
    from tomelab.engines.guard import quality_guard

    model, tok = load_for_inference(args.ref)
    f16 = pick_gguf(args.ref, model, tok, "f16")
    for t in args.types:
        t0 = time.perf_counter()
        gguf, lora = served_gguf(args.ref, model, tok, t)
        report = quality_guard(gguf, f16, model, tok, lora=lora)
        print(f"{t} ({time.perf_counter() - t0:.0f} s): {report.summary()}", flush=True)
        print(json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
