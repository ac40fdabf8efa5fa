"""The CTranslate2 backend: `Generator.generate_tokens` on a converted model (`convert.export_ct2`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tomelab.engines.chat import GenerationSettings, default_threads


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def passive_openmp() -> None:
    """CTranslate2's OpenMP threads spin while idle; on a shared, busy CPU 2 threads then ran at
    0.23 tok/s vs 3.0 with 1 thread (4.0 with 2 passive threads). Must be set before ctranslate2
    starts its thread pool; an explicit user setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class CTranslate2Backend:
    """CTranslate2's `Generator.generate_tokens` (streams ids); one generation at a time per model."""

    name = "ctranslate2"

    def __init__(self, ct2_dir: str | Path, tokenizer: Any, *, compute_type: str = "int8", threads: int | None = None,
                 context_length: int = 2048):
        passive_openmp()
        import ctranslate2

        self.threads = threads or default_threads()
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
