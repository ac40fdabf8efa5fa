"""The llama.cpp backends: `xllamacpp` (prebuilt wheel, parallel slots) and `llama-cpp-python` (optional).

`xllamacpp` is llama.cpp's own server embedded in Python. Why this runtime: it installs from PyPI with
no compiler (llama-cpp-python builds ~5 min from source and segfaults here unless built with special
flags), and its server schedules concurrent requests in `slots` parallel sequences with continuous
batching, so concurrent chats and evaluation prompts are decoded together instead of queueing. Requests
go through the in-process handler (no HTTP); the server's own listener binds 127.0.0.1 on a free port
and is not used.

Token ids in, token ids out: the prompt is the ids `ChatEngine` fitted, and each streamed chunk's
`logprobs` (top 1) carries the sampled ids, so outputs compare token for token with transformers.
`llama_cpp_backend` picks the runtime; `TOMELAB_LLAMACPP=llama-cpp-python` forces the older one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tomelab.engines.chat import GenerationSettings, default_threads, stream_from_thread
from tomelab.errors import TomelabError


def xllamacpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


def xllamacpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xllamacpp")
    except PackageNotFoundError:
        return "not installed"


def _import() -> Any:
    # llama.cpp's OpenMP workers spin while idle; on 2 shared cores 2 spinning threads ran at ~5 tok/s
    # vs ~55 with 1 (../shared/NOTES.md). Must be set before the library (and its libgomp) loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import xllamacpp
    except ImportError as e:
        raise TomelabError("the llama.cpp engine needs `pip install xllamacpp` (prebuilt wheel, no compiler)") from e
    return xllamacpp


class XLlamaBackend:
    """A GGUF served by an embedded llama.cpp server with `slots` parallel sequences (thread-safe).

    Each `iter_tokens` call is one request; up to `slots` run at once, batched by llama.cpp (continuous
    batching); more wait in its queue. `context_length` is per slot."""

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, *, threads: int | None = None, context_length: int = 2048, slots: int = 4,
                 lora: str | Path | None = None):
        xl = _import()
        self.gguf = Path(gguf)
        self.lora = Path(lora) if lora else None  # a llama.cpp LoRA adapter GGUF applied on top (lora_gguf.py)
        for f in (self.gguf, self.lora):
            if f is not None and not f.is_file():
                raise TomelabError(f"GGUF file not found: {f}")
        self.threads = max(1, threads or 1)
        self.slots = max(1, int(slots))
        self.context_length = context_length
        self.dtype = self.gguf.stem.rsplit("-", 1)[-1]
        self.runtime = f"xllamacpp {xllamacpp_version()}"
        p = xl.CommonParams()
        p.model.path = str(self.gguf)
        if self.lora is not None:
            adapter = xl.CommonAdapterLoraInfo()
            adapter.path, adapter.scale = str(self.lora), 1.0
            p.lora_adapters = [adapter]
        p.n_ctx = context_length * self.slots  # split evenly between the slots (kv_unified off)
        p.n_parallel = self.slots
        p.kv_unified = False
        p.cont_batching = True
        p.n_batch = 512
        p.cpuparams.n_threads = self.threads
        p.cpuparams_batch.n_threads = self.threads
        p.hostnames = ["127.0.0.1"]
        p.port = 0  # a free loopback port; tomelab never calls it
        p.n_threads_http = 1
        p.verbosity = -1
        try:
            self.server = xl.Server(p)
        except RuntimeError as e:
            raise TomelabError(f"llama.cpp (xllamacpp) could not load {self.gguf}: {e}") from e
        self.listening_address = self.server.listening_address
        if "127.0.0.1" not in self.listening_address:
            raise TomelabError(f"llama.cpp server bound {self.listening_address}, not 127.0.0.1")

    def request(self, prompt_ids: list[int], settings: Any) -> dict:
        greedy = settings.temperature == 0.0
        req: dict[str, Any] = {
            "prompt": [int(t) for t in prompt_ids], "max_tokens": int(settings.max_new_tokens), "stream": True,
            "logprobs": 1, "temperature": float(settings.temperature), "top_p": 1.0 if greedy else float(settings.top_p),
            "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "cache_prompt": True,
        }
        if settings.seed is not None:
            req["seed"] = int(settings.seed)
        return req

    def iter_tokens(self, prompt_ids: list[int], settings: Any, stop_ids: set[int], cancel: threading.Event) -> Iterator[int]:
        def complete(put: Callable[[Any], None]) -> None:
            def on_chunk(chunk: Any) -> bool:  # called by llama.cpp's handler; True stops (and cancels) the request
                put(chunk)
                return cancel.is_set()

            self.server.handle_completions(self.request(prompt_ids, settings), on_chunk)

        chunks = stream_from_thread(complete, cancel, name="tomelab-xllama",
                                    fail=lambda e: TomelabError(f"llama.cpp request failed: {e}"))
        with contextlib.closing(chunks):  # leaving early (an error chunk, or the consumer stops) ends the thread
            for item in chunks:
                if not isinstance(item, dict) or "error" in item or "choices" not in item:
                    err = item.get("error", item) if isinstance(item, dict) else item
                    raise TomelabError(f"llama.cpp request failed: {str(err)[:300]}")
                choice = item["choices"][0] if item["choices"] else {}
                for c in (choice.get("logprobs") or {}).get("content") or []:
                    yield int(c["id"])

    def close(self) -> None:
        """Stop the server now (it also stops when garbage-collected)."""
        self.server = None  # type: ignore[assignment]


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
        self.threads = threads or default_threads()
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


def llama_cpp_available() -> bool:
    """A llama.cpp runtime is installed: `xllamacpp` (prebuilt, preferred) or `llama-cpp-python`."""
    return xllamacpp_available() or importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_backend(gguf: str | Path, *, threads: int | None = None, context_length: int = 2048,
                      slots: int = 4, lora: str | Path | None = None) -> Any:
    """llama.cpp on `gguf` (plus a LoRA adapter GGUF): xllamacpp's embedded server (parallel slots,
    continuous batching) when installed, else llama-cpp-python (one request at a time, no adapter).
    `TOMELAB_LLAMACPP=llama-cpp-python` forces it."""
    if xllamacpp_available() and os.environ.get("TOMELAB_LLAMACPP") != "llama-cpp-python":
        return XLlamaBackend(gguf, threads=threads or 1, context_length=context_length, slots=slots, lora=lora)
    if lora is not None:
        raise TomelabError("a LoRA adapter GGUF is served by xllamacpp only: `pip install xllamacpp`")
    return LlamaCppBackend(gguf, threads=threads, context_length=context_length)
