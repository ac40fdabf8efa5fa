"""`tomelab export RUN`: the run's LoRA adapter merged into the base, saved as plain safetensors.

The merged folder is an ordinary transformers model (no peft needed to load it) with the exact
tokenizer and chat template the run trained with, plus `tomelab_export.json` recording its lineage
so `training.load.describe` and the app can tell which run it came from. GGUF is optional: the HF ->
GGUF converter is not in any wheel, so it is taken from llama.cpp as vendored in the
llama-cpp-python sdist (see `tomelab.engines.convert.ensure_converter`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from tomelab.artifacts import ADAPTER_DIR, EXPORT_INFO, Run
from tomelab.errors import TomelabError
from tomelab.io import atomic_path, current_umask, read_json, write_json
from training.load import load_base_tokenizer

log = logging.getLogger(__name__)

MERGED_DIR = "merged"


def adapter_digest(run_dir: Path) -> str:
    """Hash of the adapter weights: an export made from other weights is stale."""
    h = hashlib.sha256()
    for f in sorted((run_dir / ADAPTER_DIR).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def export_run(ref: str | Path, *, out: str | Path | None = None, dtype: str = "float32", gguf: str | None = None,
               force: bool = False) -> Path:
    """Merge the adapter of run `ref` into its base; returns the merged folder (skipped if up to date)."""
    run = Run.find(ref)
    if run is None:
        raise TomelabError(
            f"{ref} is not a training run (no {ADAPTER_DIR}/adapter_config.json). "
            f"Pass artifacts/runs/<variant>/<base>/<seed>, e.g. one listed by `ls artifacts/runs/*/*/`."
        )
    run_dir = run.dir
    if not run.is_finished:
        raise TomelabError(f"{run_dir} is not finished (no metrics.json). Finish it with `tomelab train` first.")
    info = run.config()
    out_dir = Path(out).expanduser().resolve() if out else run_dir / MERGED_DIR
    _check_out_dir(out_dir)
    digest = adapter_digest(run_dir)
    marker = out_dir / EXPORT_INFO
    if marker.is_file() and not force:
        old = read_json(marker)
        if old.get("adapter_digest") == digest and old.get("dtype") == dtype:
            log.info("%s is already an export of this adapter: skipped", out_dir)
            return _maybe_gguf(out_dir, gguf)
        raise TomelabError(f"{out_dir} holds an export of other weights or dtype. Re-run with --force to overwrite it.")

    import torch  # heavy imports only once the arguments are known to be good
    from peft import PeftModel

    from tomelab.models import load_model

    t0 = time.perf_counter()
    base = info["base"]
    model = load_model(base, dtype="float32")  # merge in fp32, then cast: no double rounding
    model = PeftModel.from_pretrained(model, str(run_dir / ADAPTER_DIR)).merge_and_unload()
    model = model.to(getattr(torch, dtype))
    tok = load_base_tokenizer(base)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a fresh hidden temp folder beside the target: never a name a user folder could already have
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / EXPORT_INFO, {
            "variant": info.get("variant"), "base": base, "seed": info.get("seed"), "run_dir": str(run_dir),
            "adapter_digest": digest, "dtype": dtype, "config_hash": info.get("config_hash"),
        })
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        _check_out_dir(out_dir)  # still only ever an earlier export (or nothing) that gets replaced
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)  # whole folder or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s into %s (%s) in %.1fs", run_dir, out_dir, dtype, time.perf_counter() - t0)
    return _maybe_gguf(out_dir, gguf)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse any --out that already exists and is not an earlier export: an export replaces its folder whole.

    Only a folder holding `tomelab_export.json` (an earlier export) is ever replaced, and only with
    --force (or when it is an up-to-date export of the same weights, which is skipped untouched).
    """
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and (out_dir / EXPORT_INFO).is_file():
        return  # an earlier export: replaced only with --force, checked by the caller
    raise TomelabError(
        f"--out {out_dir} already exists and is not an earlier export (no {EXPORT_INFO} in it); "
        f"refusing to replace it. Pass a folder that does not exist yet."
    )


def _maybe_gguf(out_dir: Path, outtype: str | None) -> Path:
    """Also place model-<outtype>.gguf in the export folder, converted by llama.cpp's own script."""
    if not outtype:
        return out_dir
    target = out_dir / f"model-{outtype}.gguf"
    if target.is_file():
        return out_dir
    from tomelab.engines.convert import export_gguf

    src = export_gguf(out_dir, outtype)  # cached conversion; raises TomelabError if no converter
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
    log.info("wrote %s", target)
    return out_dir
