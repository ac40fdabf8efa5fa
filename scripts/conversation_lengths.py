"""How long the pool's conversations are in the base model's tokens, to choose `max_length`.

`python scripts/conversation_lengths.py [--rows 600] [--seed 0]`: tokenises a seeded sample of the ShareGPT pool
exactly as training does and prints length percentiles and the share that fits each candidate max_length.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import numpy as np

    from curation.sources import SourceConfig, load_source
    from tomelab.models import load_tokenizer
    from training.data import tokenize_conversation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    args = ap.parse_args()
    table = load_source(SourceConfig(name="sharegpt", kind="sharegpt"), progress=False).table
    msgs = table.column("messages").to_pylist()
    idx = np.random.default_rng(args.seed).choice(len(msgs), min(args.rows, len(msgs)), replace=False)
    tok = load_tokenizer(args.base)
    lengths = np.array([tokenize_conversation(tok, "x", msgs[int(i)]).n_tokens for i in idx])
    print(f"{len(lengths)} of {len(msgs)} conversations; tokens p50/p75/p90/p95:",
          np.percentile(lengths, [50, 75, 90, 95]).round().astype(int).tolist())
    for ml in (512, 1024, 2048, 2560, 3072, 4096):
        print(f"max_length {ml}: {100 * (lengths <= ml).mean():.1f}% whole")


if __name__ == "__main__":
    main()
