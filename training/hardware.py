"""Where and how a run trains: device, quantisation and precision, safe checkpoint loading, module checks.

Kept apart from the training loop (training/train.py) because these depend on the machine, not the recipe:
`precision = "auto"` resolves differently on CPUs with and without native bf16 (TOMELAB_PRECISION forces it).
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path
from typing import Any

from tomelab.errors import TomelabError
from training.config import TrainConfig

log = logging.getLogger("training.train")  # the loop's logger: its messages read as the run's own


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (avx512_bf16 or AMX); without them bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def auto_precision_override() -> str | None:
    """TOMELAB_PRECISION (bf16 or fp32): what `precision = "auto"` resolves to, if set."""
    value = os.environ.get("TOMELAB_PRECISION", "").strip().lower()
    if not value:
        return None
    if value not in ("bf16", "fp32"):
        raise TomelabError(f"TOMELAB_PRECISION={value!r} is not valid: set it to bf16 or fp32, or unset it.")
    return value


def precision_of(dtype: str) -> str:
    """The short precision name recorded with a run: bf16, fp32 or nf4."""
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def resolve_hardware(cfg: TrainConfig) -> tuple[str, str, str]:
    """(device, quantization, base dtype) for this machine.

    CUDA: 4-bit nf4 + double quant (QLoRA). CPU: plain LoRA, on bf16 weights only where the CPU
    has native bf16, else fp32 (see the README's measurements for both choices).

    `precision = "auto"` thus differs between machines (and bf16 changes losses by ~0.5%, fp32 by
    ~1e-5). The environment variable TOMELAB_PRECISION=bf16|fp32 forces what "auto" resolves to
    (tests and cross-machine comparisons); an explicit `precision` in the config always wins.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant = cfg.quantization
    if quant == "auto":
        quant = "4bit" if device == "cuda" else "none"
    if quant == "4bit":
        return device, quant, "nf4"
    precision = cfg.precision
    if precision == "auto":
        precision = auto_precision_override() or ("bf16" if device == "cuda" or cpu_has_native_bf16() else "fp32")
    return device, quant, "bfloat16" if precision == "bf16" else "float32"


def load_training_base(base: str, quant: str, dtype: str, device: str) -> Any:
    """The frozen base the run trains LoRA on: nf4 + double quant (QLoRA) when `quant` is 4bit, else `dtype`."""
    import torch

    from tomelab.models import load_model

    if device == "cuda":  # this rank's GPU (accelerate sets the current device of each DDP rank; 0 alone)
        device = f"cuda:{torch.cuda.current_device()}"
    if quant == "4bit":
        from peft import prepare_model_for_kbit_training

        model = load_model(base, quantize_4bit=True, device=device)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return load_model(base, dtype=dtype, device=device)


def oom_error(e: BaseException, cfg: TrainConfig, step: int) -> TomelabError:
    """The one-line fix for running out of (GPU or host) memory: smaller batches, or shorter rows."""
    return TomelabError(
        f"out of memory at step {step} ({type(e).__name__}) with batch_size={cfg.batch_size}, "
        f"max_length={cfg.max_length}. Lower batch_size (raise grad_accum to keep the effective batch) "
        f"or lower max_length in the train config; a re-run resumes from the last checkpoint."
    )


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The resumable state in `path`, or None (start over) when it is missing or not a plain checkpoint.

    Loaded with weights_only=True: tensors and plain containers only, so a planted pickle can never
    run code. A file that fails that (tampered, truncated, foreign) is only lost progress, so it is
    set aside with a warning rather than trusted.
    """
    import pickle

    import torch

    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("%s cannot be loaded safely (%s); ignoring it and starting over", path, first[:200])
        return None
    if not isinstance(ckpt, dict):
        log.warning("%s is not a tomelab checkpoint; ignoring it and starting over", path)
        return None
    return ckpt


def check_target_modules(model: Any, targets: list[str], base: str) -> None:
    """Every `target_modules` entry must name a module of the base (as PEFT matches it: a dotted suffix)."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            import torch

            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and n})
            raise TomelabError(
                f"target_modules: {t!r} is not a module of {base}. Use \"all-linear\" or names from: "
                f"{', '.join(linear)}. Fix `target_modules` in the train config."
            )


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
