"""The one training recipe every variant gets, as a typed config loaded from TOML.

Only the data may change between variants in an ablation, so everything that shapes training
(budget in tokens, schedule, LoRA shape, max length, batching, precision) lives here and is
written, resolved, into each run's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tomelab.config import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "default.toml"


@dataclass
class TrainConfig:
    # compute budget: the same number of trained tokens for every variant (not epochs)
    token_budget: int = 200_000  # tokens per run, counted in `budget_unit`
    # "tokens": every non-padding token fed through the model (prompt + answer); "answer_tokens": only the
    # trained (loss) tokens, so a variant with longer prompts does not train on fewer answer tokens
    budget_unit: Literal["tokens", "answer_tokens"] = "tokens"
    epochs_cap: float = 3.0  # refuse budgets that would need more passes over the data than this
    # optimiser and schedule
    learning_rate: float = 2e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05  # fraction of optimiser steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # LoRA shape
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # batches
    max_length: int = 512  # longer conversations are truncated (rows left with no answer token are dropped)
    packing: Literal["bucket", "none"] = "bucket"  # bucket: batches of similar length, near padding-free
    batch_size: int = 8
    grad_accum: int = 1
    # split a micro-batch whose padded size (rows x longest row) exceeds this many tokens (0: never).
    # Bounds peak memory (activations grow with it) without changing the rows of an optimiser step.
    micro_batch_tokens: int = 0
    # recompute activations in the backward pass (transformers' gradient checkpointing): ~1/3 more compute,
    # but a 2,560-token row trains in ~2 GB instead of ~10 GB, so two runs fit beside each other
    gradient_checkpointing: bool = False
    # validation, checkpoints, early stopping
    eval_every: int = 50  # optimiser steps between validation-loss evaluations (0: only at the end)
    save_every: int = 25  # optimiser steps between resumable checkpoints (0: never)
    val_rows: int = 64  # size of the fixed validation slice (first rows of val.parquet by id)
    early_stopping: bool = False
    patience: int = 3  # evaluations without improvement before stopping (only if early_stopping)
    # hardware
    quantization: Literal["auto", "4bit", "none"] = "auto"  # auto: 4-bit nf4 on CUDA, plain LoRA on CPU
    # base weights + autocast for plain LoRA; LoRA weights and optimiser stay fp32 either way.
    # auto: bf16 on CUDA and on CPUs with native bf16 (avx512_bf16/AMX), else fp32: on an AVX2-only
    # CPU bf16 matmuls fall back to slow kernels (measured ~15x slower than fp32, see README)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        positive = ("token_budget", "lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum", "val_rows", "patience")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if self.epochs_cap <= 0:
            raise ValueError(f"`epochs_cap` must be > 0, got {self.epochs_cap}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}")
        if self.eval_every < 0 or self.save_every < 0 or self.threads < 0 or self.micro_batch_tokens < 0:
            raise ValueError("`eval_every`, `save_every`, `threads` and `micro_batch_tokens` must be >= 0")
        if not self.target_modules:
            raise ValueError("`target_modules` must name at least one module (or \"all-linear\")")


def load_train_config(path: str | Path | None = None) -> TrainConfig:
    """Load a training TOML (default: configs/train/default.toml)."""
    return load_config(path or DEFAULT_CONFIG, TrainConfig)
