#!/usr/bin/env bash
# gpu-check: the real QLoRA recipe on one CUDA GPU, run by hand (CI has no GPU).
#   bash scripts/gpu-check.sh            # 300 optimiser steps of configs/train/default.toml
#   STEPS=500 BASE=smollm2-135m-instruct PY=.venv/bin/python KEEP=1 bash scripts/gpu-check.sh
# It trains `tomelab train`'s recipe with quantization = "4bit" (bitsandbytes nf4 + double quantisation,
# bf16 compute) on Alpaca rows from ../shared for about STEPS optimiser steps, then runs one batched
# evaluation of the adapter (validation loss and greedy generation, 16 prompts a batch), and prints
# tokens/s and peak GPU memory (torch.cuda.max_memory_allocated) for each. Everything is written to a
# temporary artefact home (base models are linked from artifacts/models), deleted at the end unless KEEP=1.
# Needs a CUDA build of torch (`make setup` installs the CPU build): pip install torch==2.13.0 from the
# CUDA index for your driver, then the base model: tomelab models pull smollm2-135m-instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export STEPS=${STEPS:-300} BASE=${BASE:-smollm2-135m-instruct} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# one clear line, exit 2, when there is nothing to run on
if ! msg=$("$PY" -c '
import torch
if torch.version.cuda is None:
    print(f"gpu-check: torch {torch.__version__} is a CPU build: install a CUDA build of torch on a machine with an NVIDIA GPU.")
    raise SystemExit(1)
if not torch.cuda.is_available():
    print(f"gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda}): check nvidia-smi and CUDA_VISIBLE_DEVICES.")
    raise SystemExit(1)
' 2>/dev/null); then
  echo "${msg:-gpu-check: $PY cannot import torch: run make setup, or set PY to a python with a CUDA build of torch.}" >&2
  exit 2
fi

MODELS=$("$PY" -c 'from tomelab import paths; print(paths.models_dir())')
HOME_DIR=$(mktemp -d -t tomelab-gpu-check.XXXXXX)
if [[ "${KEEP:-0}" == 1 ]]; then echo "gpu-check: artefact home kept at $HOME_DIR"; else trap 'rm -rf "$HOME_DIR"' EXIT; fi
ln -s "$MODELS" "$HOME_DIR/models"
export TOMELAB_HOME=$HOME_DIR

"$PY" - <<'EOF'
import json
import os
import time
from dataclasses import replace

import torch
from peft import PeftModel

from eval.generate import render_prompt
from tomelab.models import load_model
from training.config import load_train_config
from training.data import read_conversations, tokenize_rows, variant_paths
from training.fixtures import alpaca_variant
from training.load import load_base_tokenizer
from training.loss import AssistantLoss, evaluate_loss
from training.train import train_run

steps, base, mib = int(os.environ["STEPS"]), os.environ["BASE"], 2**20
print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), base {base}")

# the shipped recipe, forced to QLoRA, with a token budget of about STEPS optimiser steps
alpaca_variant("gpu-check", 3000, n_val=64)
cfg = replace(load_train_config(), quantization="4bit", eval_every=0, save_every=100)
tok = load_base_tokenizer(base)
train_path, val_path = variant_paths("gpu-check")
rows, _ = tokenize_rows(tok, read_conversations(train_path), cfg.max_length, "probe")
counted = [e.n_loss if cfg.budget_unit == "answer_tokens" else e.n_tokens for e in rows]
cfg = replace(cfg, token_budget=int(steps * cfg.batch_size * cfg.grad_accum * sum(counted) / len(counted)))

torch.cuda.reset_peak_memory_stats()
run = train_run("gpu-check", base, 0, cfg, force=True)
train_peak = torch.cuda.max_memory_allocated()
m = json.loads((run / "metrics.json").read_text())
assert m["device"] == "cuda" and m["quantization"] == "4bit", m
print(f"train: {m['steps']} steps, {m['tokens_seen']:,} tokens, {m['tok_s']:,.0f} tok/s over {m['train_seconds']} s "
      f"({m['quantization']} {m['base_dtype']}, batch {cfg.batch_size} x {cfg.grad_accum}, max_length {cfg.max_length}); "
      f"loss {m['final_train_loss']}, val loss {m['final_val_loss']}; peak GPU memory {train_peak / mib:,.0f} MiB")

# one batched evaluation of the adapter on its nf4 base, as it trained
torch.cuda.empty_cache()
torch.cuda.reset_peak_memory_stats()
model = PeftModel.from_pretrained(load_model(base, quantize_4bit=True, device="cuda"), str(run / "adapter"))
model.eval()
val = read_conversations(val_path, limit=64)
val_ex, _ = tokenize_rows(tok, val, cfg.max_length, "val")
t0 = time.perf_counter()
val_loss = evaluate_loss(AssistantLoss(model.get_base_model()), model, val_ex, batch_size=16, pad_id=tok.pad_token_id,
                         device="cuda", bf16=True)
torch.cuda.synchronize()
loss_s = time.perf_counter() - t0
tok.padding_side = "left"
prompts = [render_prompt(tok, msgs[:-1]) for _, msgs in val]  # each conversation up to its last answer
new_tokens, t0 = 0, time.perf_counter()
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    for i in range(0, len(prompts), 16):
        enc = tok(prompts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        out = model.generate(**enc, max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id)
        new_tokens += int((out[:, enc["input_ids"].shape[1] :] != tok.pad_token_id).sum())
torch.cuda.synchronize()
gen_s = time.perf_counter() - t0
print(f"eval: val loss {val_loss:.4f} on {len(val_ex)} rows in {loss_s:.1f} s ({sum(e.n_tokens for e in val_ex) / loss_s:,.0f} tok/s); "
      f"greedy generation {new_tokens:,} new tokens for {len(prompts)} prompts in {gen_s:.1f} s "
      f"({new_tokens / gen_s:,.0f} tok/s, batch 16); peak GPU memory {torch.cuda.max_memory_allocated() / mib:,.0f} MiB")
EOF
