"""Conversions the fast runtimes need, each written once and cached under the artefact home's cache/:

* a merged HF folder of the weights a run serves (base + LoRA adapter), `merged_model_dir`;
* CTranslate2 models, `export_ct2`;
* GGUF files, `export_gguf`: Llama-architecture folders written directly (`tomelab.engines.gguf_writer`,
  no converter, no compiler), others with llama.cpp's `convert_hf_to_gguf.py` (`ensure_converter`);
* which GGUF llama.cpp serves for a model (`pick_gguf`: a registry base model's own source file, else
  a conversion) and whether it is quantised (then the quality guard decides, `tomelab.engines.guard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from tomelab import paths
from tomelab.engines.backend_ctranslate2 import passive_openmp
from tomelab.errors import TomelabError
from tomelab.io import atomic_path, read_json

log = logging.getLogger(__name__)


def _weights_key(model_dir: Path) -> str:
    """A cache key of a HF folder: its path and its safetensors' sizes and mtimes."""
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(model_dir.glob("*.safetensors")))
    return hashlib.sha256(f"{model_dir}|{stamp}".encode()).hexdigest()[:10]


def merged_model_dir(model: Any, tokenizer: Any, ref: str) -> Path:
    """A plain HF folder of the loaded (already merged) weights and the working tokenizer, for GGUF.

    Saved once per reference: the base folders' own tokenizer config names a class that
    transformers rebuilds wrongly, and llama.cpp's converter reads the tokenizer from the folder.
    """
    peft_cls = None
    with contextlib.suppress(ImportError):
        from peft import PeftModel as peft_cls  # noqa: N813
    if peft_cls is not None and isinstance(model, peft_cls):
        model = model.merge_and_unload()
    weights = sorted(Path(ref).glob("**/*.safetensors")) if Path(ref).is_dir() else []
    stamp = "|".join(f"{w}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights)
    key = hashlib.sha256(f"{Path(ref).resolve()}|{stamp}".encode()).hexdigest()[:10]
    out = paths.cache_dir() / "merged" / f"{Path(ref).name}-{key}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def hf_weights_dir(ref: str, model: Any, tokenizer: Any) -> Path:
    """A HF folder holding exactly the weights `ref` serves: the model folder itself for a base
    model or merged export, a saved merge for a run (base + adapter)."""
    with contextlib.suppress(ImportError):
        from training.load import find_run_dir

        if find_run_dir(ref) is not None:
            return merged_model_dir(model, tokenizer, ref)
    from tomelab.models import resolve_model

    return resolve_model(ref)


def ct2_model_dir(model_dir: Path, quantization: str) -> Path:
    """Where the CTranslate2 conversion of a HF folder lives (keyed like the GGUF cache)."""
    model_dir = Path(model_dir).resolve()
    key = _weights_key(model_dir)
    return paths.cache_dir() / "ct2" / f"{model_dir.name}-{key}-{quantization}"


def export_ct2(model_dir: str | Path, quantization: str = "int8") -> Path:
    """Convert a HF model folder to CTranslate2 once (weights stored as `quantization`); cached."""
    passive_openmp()
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:
        raise TomelabError("the ctranslate2 engine needs `pip install 'ctranslate2>=4.8,<5'`.") from e
    out = ct2_model_dir(Path(model_dir), quantization)
    if (out / "model.bin").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    TransformersConverter(str(model_dir)).convert(str(tmp), quantization=quantization, force=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return out


# llama-cpp-python release whose sdist provides convert_hf_to_gguf.py when llama-cpp-python is not installed.
CONVERTER_SDIST_VERSION = "0.3.36"


def _converter_dir() -> Path:
    return paths.home() / "tools" / "llama.cpp"


def ensure_converter() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` (not in the wheel): taken from the installed version's sdist.

    Uses `$TOMELAB_LLAMACPP_SRC` (a llama.cpp checkout) when set; otherwise `pip download`s the
    llama-cpp-python sdist once and keeps only the converter and its `gguf-py`.
    """
    env = os.environ.get("TOMELAB_LLAMACPP_SRC")
    if env:
        p = Path(env)
        if not (p / "convert_hf_to_gguf.py").is_file():
            raise TomelabError(f"TOMELAB_LLAMACPP_SRC={p} has no convert_hf_to_gguf.py; point it at a llama.cpp checkout.")
        return p
    dest = _converter_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("llama_cpp_python")
    except PackageNotFoundError:
        ver = CONVERTER_SDIST_VERSION  # only its source archive is fetched (pure Python converter, no build)
    dl = dest.parent / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob(f"llama_cpp_python-{ver}.tar.gz")):
        log.info("fetching the llama-cpp-python %s sdist for its GGUF converter (one-off, ~77 MB)", ver)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={ver}", "-d", str(dl)], check=True,
        )
    sdist = next(dl.glob(f"llama_cpp_python-{ver}.tar.gz"))
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/", "models/ggml-vocab")
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(keep)]
        for m in members:
            m.name = m.name[len(prefix):]
        tf.extractall(tmp, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def gguf_path_for(model_dir: Path, outtype: str) -> Path:
    """Where the GGUF of a HF model folder lives, keyed by the folder and its weights' mtime."""
    model_dir = Path(model_dir).resolve()
    key = _weights_key(model_dir)
    return paths.cache_dir() / "gguf" / f"{model_dir.name}-{key}" / f"model-{outtype}.gguf"


def export_gguf(model_dir: str | Path, outtype: str = "f16") -> Path:
    """Convert a HF model folder (a base model or merged fine-tune) to GGUF once; cached.

    Llama-architecture folders are written directly (`tomelab.engines.gguf_writer`, no converter or compiler);
    others use llama.cpp's `convert_hf_to_gguf.py` (`ensure_converter`)."""
    model_dir = Path(model_dir)
    out = gguf_path_for(model_dir, outtype)
    if out.is_file():
        return out
    from tomelab.engines.gguf_writer import OUTTYPES, can_write, write_gguf

    if can_write(model_dir) and outtype in OUTTYPES and not os.environ.get("TOMELAB_LLAMACPP_SRC"):
        return write_gguf(model_dir, out, outtype)  # pure Python (gguf package): no converter, no compiler
    conv = ensure_converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(conv / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with atomic_path(out) as tmp:
        r = subprocess.run(
            [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
            env=env, capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise TomelabError(f"GGUF conversion of {model_dir} failed:\n{r.stderr[-2000:]}")
    log.info("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return out


def source_gguf(ref: str) -> Path | None:
    """The GGUF a registry base model was converted from (its HF weights are that file dequantised).

    Serving it with llama.cpp uses the very same weights, already quantised, with no conversion.
    None for fine-tunes, merged exports and unknown folders.
    """
    from tomelab.models import find_spec, resolve_model

    if find_spec(ref) is None:
        return None
    with contextlib.suppress(TomelabError, OSError, ValueError):
        meta = resolve_model(ref, pull=False) / "tomelab_model.json"
        src = Path(read_json(meta).get("from_gguf", "")) if meta.is_file() else None
        if src is not None and src.is_file():
            return src
    return None


def pick_gguf(ref: str, model: Any, tokenizer: Any, gguf_type: str) -> Path:
    """The GGUF llama.cpp serves for `ref`: the source file of a registry base model for `auto`,
    else one converted (and cached) from the loaded HF weights as `gguf_type` (`auto` -> q8_0).
    A fine-tune of such a base is better served as that source file plus its adapter: `served_gguf`."""
    if gguf_type in ("auto", "source"):
        src = source_gguf(ref)
        if src is not None:
            return src
        if gguf_type == "source":
            raise TomelabError(f"{ref} has no source GGUF (only registry base models do); use --gguf-type q4_1, q8_0 or f16.")
        gguf_type = "q8_0"
    return export_gguf(merged_model_dir(model, tokenizer, ref), gguf_type)


def lora_route(ref: str) -> tuple[Path, Path] | str:
    """(base source GGUF, LoRA adapter GGUF) that serve run `ref` as llama.cpp base + adapter, or why not."""
    from tomelab.artifacts import Run
    from tomelab.engines.lora_gguf import adapter_problem, lora_gguf_for
    from tomelab.models import resolve_model

    run = Run.find(ref)
    if run is None:
        return f"{ref} is not a training run (no adapter)"
    base = run.config().get("base")
    src = source_gguf(str(base)) if base else None
    if src is None:
        return f"its base {base!r} has no source GGUF (only registry base models do)"
    base_cfg = read_json(resolve_model(str(base), pull=False) / "config.json")
    problem = adapter_problem(run.adapter, base_cfg)
    if problem:
        return problem
    return src, lora_gguf_for(run.adapter, base_cfg)


def served_gguf(ref: str, model: Any, tokenizer: Any, gguf_type: str) -> tuple[Path, Path | None]:
    """(GGUF, LoRA adapter GGUF or None) that llama.cpp serves for `ref` as `gguf_type`.

    `lora`: a run served as its base's source file + its adapter (`tomelab.engines.lora_gguf`): the exact
    merged weights (held-out NLL equal to the f16 file's) at 0.78x the source file's tok/s here, against
    0.88x for q8_0 (bench/inference.py), so `auto` tries q8_0 first and this route next."""
    if gguf_type == "lora":
        route = lora_route(ref)
        if isinstance(route, str):
            raise TomelabError(f"cannot serve {ref} as base GGUF + LoRA adapter: {route}")
        return route
    return pick_gguf(ref, model, tokenizer, gguf_type), None


def gguf_is_quantised(path: str | Path) -> bool:
    """Whether a GGUF's weights are quantised (anything but all-f32 / mostly-f16 / mostly-bf16)."""
    import gguf

    field_ = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    ftype = int(field_.contents()) if field_ is not None else None
    return ftype not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)
