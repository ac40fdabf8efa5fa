"""The runtimes behind `tomelab.inference.ChatEngine` other than transformers and xllamacpp, and the
conversions they need: llama-cpp-python (optional, builds from source), CTranslate2 (and its model
conversion), GGUF export (direct writer for Llama models, llama.cpp's converter otherwise).

Split out of `tomelab.inference` to keep modules small; `tomelab.inference` re-exports every name.
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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tomelab import paths
from tomelab.errors import TomelabError
from tomelab.io import atomic_path

if TYPE_CHECKING:  # tomelab.inference imports this module
    from tomelab.inference import GenerationSettings

log = logging.getLogger("tomelab.inference")


def _default_threads() -> int:
    env = os.environ.get("TOMELAB_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- llama.cpp


class LlamaCppBackend:
    """llama.cpp on a GGUF; one generation at a time per model (a llama context is not thread-safe)."""

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, *, threads: int | None = None, context_length: int = 2048):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise TomelabError(
                "llama.cpp engine needs llama-cpp-python. Build it with "
                'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AVX2=ON '
                '-DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python==0.3.36, or use --engine transformers.'
            ) from e
        self.gguf = Path(gguf)
        self.threads = threads or _default_threads()
        self.context_length = context_length
        self.llm = Llama(
            model_path=str(self.gguf), n_ctx=context_length, n_threads=self.threads,
            n_threads_batch=self.threads, n_batch=512, verbose=False,
        )
        self.dtype = self.gguf.stem.rsplit("-", 1)[-1]
        self._lock = threading.Lock()

    def iter_tokens(
        self, prompt_ids: list[int], settings: GenerationSettings, stop_ids: set[int], cancel: threading.Event
    ) -> Iterator[int]:
        greedy = settings.temperature == 0.0
        with self._lock:
            if settings.seed is not None:
                self.llm.set_seed(settings.seed)
            gen = self.llm.generate(
                prompt_ids, top_k=0 if not greedy else 1, top_p=1.0 if greedy else settings.top_p,
                min_p=0.0, temp=settings.temperature, repeat_penalty=1.0,
            )
            try:
                for i, tid in enumerate(gen):
                    if cancel.is_set():
                        break
                    yield int(tid)
                    if int(tid) in stop_ids or i + 1 >= settings.max_new_tokens:
                        break
            finally:
                gen.close()


# --------------------------------------------------------------------------- CTranslate2


def ct2_model_dir(model_dir: Path, quantization: str) -> Path:
    """Where the CTranslate2 conversion of a HF folder lives (keyed like the GGUF cache)."""
    model_dir = Path(model_dir).resolve()
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(model_dir.glob("*.safetensors")))
    key = hashlib.sha256(f"{model_dir}|{stamp}".encode()).hexdigest()[:10]
    return paths.cache_dir() / "ct2" / f"{model_dir.name}-{key}-{quantization}"


def _passive_openmp() -> None:
    """CTranslate2's OpenMP threads spin while idle; on a shared, busy CPU 2 threads then ran at
    0.23 tok/s vs 3.0 with 1 thread (4.0 with 2 passive threads). Must be set before ctranslate2
    starts its thread pool; an explicit user setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def export_ct2(model_dir: str | Path, quantization: str = "int8") -> Path:
    """Convert a HF model folder to CTranslate2 once (weights stored as `quantization`); cached."""
    _passive_openmp()
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


class CTranslate2Backend:
    """CTranslate2's `Generator.generate_tokens` (streams ids); one generation at a time per model."""

    name = "ctranslate2"

    def __init__(self, ct2_dir: str | Path, tokenizer: Any, *, compute_type: str = "int8", threads: int | None = None,
                 context_length: int = 2048):
        _passive_openmp()
        import ctranslate2

        self.threads = threads or _default_threads()
        self.context_length = context_length
        self.tokenizer = tokenizer  # ct2 takes prompt tokens as strings
        self.generator = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                               intra_threads=self.threads, inter_threads=1)
        self.dtype = compute_type
        self._lock = threading.Lock()

    def iter_tokens(
        self, prompt_ids: list[int], settings: GenerationSettings, stop_ids: set[int], cancel: threading.Event
    ) -> Iterator[int]:
        greedy = settings.temperature == 0.0
        tokens = self.tokenizer.convert_ids_to_tokens(prompt_ids)
        kwargs: dict[str, Any] = dict(max_length=settings.max_new_tokens, end_token=sorted(stop_ids))
        if greedy:
            kwargs.update(sampling_topk=1)
        else:
            kwargs.update(sampling_topk=0, sampling_topp=settings.top_p, sampling_temperature=settings.temperature)
        with self._lock:
            if settings.seed is not None:
                import ctranslate2

                ctranslate2.set_random_seed(settings.seed)
            gen = self.generator.generate_tokens(tokens, **kwargs)
            try:
                for step in gen:
                    if cancel.is_set():
                        break
                    yield int(step.token_id)
            finally:
                with contextlib.suppress(Exception):
                    gen.close()


# --------------------------------------------------------------------------- GGUF export


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
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(model_dir.glob("*.safetensors")))
    key = hashlib.sha256(f"{model_dir}|{stamp}".encode()).hexdigest()[:10]
    return paths.cache_dir() / "gguf" / f"{model_dir.name}-{key}" / f"model-{outtype}.gguf"


def export_gguf(model_dir: str | Path, outtype: str = "f16") -> Path:
    """Convert a HF model folder (a base model or merged fine-tune) to GGUF once; cached.

    Llama-architecture folders are written directly (`tomelab.engine_gguf`, no converter or compiler);
    others use llama.cpp's `convert_hf_to_gguf.py` (`ensure_converter`)."""
    model_dir = Path(model_dir)
    out = gguf_path_for(model_dir, outtype)
    if out.is_file():
        return out
    from tomelab.engine_gguf import OUTTYPES, can_write, write_gguf

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
