"""The CTranslate2 backend on a converted model (`convert.export_ct2`): `Generator.generate_tokens` streams
one chat; `generate_batch` decodes many prompts together (evaluation, `eval.generate.generate_greedy_batched`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tomelab.engines.chat import GenerationSettings, default_threads
from tomelab.engines.loops import LoopRule, LoopWatch


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def passive_openmp() -> None:
    """CTranslate2's OpenMP threads spin while idle; on a shared, busy CPU 2 threads then ran at
    0.23 tok/s vs 3.0 with 1 thread (4.0 with 2 passive threads). Must be set before ctranslate2
    starts its thread pool; an explicit user setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class CTranslate2Backend:
    """CTranslate2's `Generator`: streamed chats one at a time, or batches of prompts, `workers` at once.

    `threads` is each worker's intra-op threads, `workers` CTranslate2's `inter_threads`: how many batches
    decode in parallel, each on its own copy of the working buffers (two single-thread workers fill the
    2 cores without OpenMP threads spinning against each other)."""

    name = "ctranslate2"

    def __init__(self, ct2_dir: str | Path, tokenizer: Any, *, compute_type: str = "int8", threads: int | None = None,
                 context_length: int = 2048, workers: int = 1):
        passive_openmp()
        import ctranslate2

        self.threads = threads or default_threads()
        self.workers = max(1, workers)
        self.context_length = context_length
        self.tokenizer = tokenizer  # ct2 takes prompt tokens as strings
        self.generator = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                               intra_threads=self.threads, inter_threads=self.workers)
        self.dtype = compute_type
        self._lock = threading.Lock()
        self.loop_stats = {"answers": 0, "extrapolated_tokens": 0}  # loop extrapolation, see generate_batch
        self._stats_lock = threading.Lock()

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

    def generate_batch(self, prompts_ids: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
                       loop_rule: LoopRule | None = None) -> list[list[int]]:
        """Greedy answer ids of prompts decoded as one batch (finished answers leave the batch at their end
        token). Thread-safe: concurrent calls run on CTranslate2's `workers`, the rest queue.

        With a `loop_rule`, an answer caught in a token cycle leaves the batch too, and its cycle is written out
        to `max_new_tokens` (`tomelab.engines.loops`); `self.loop_stats` counts the answers and tokens."""
        tokens = [self.tokenizer.convert_ids_to_tokens(p) for p in prompts_ids]
        watches = [LoopWatch(loop_rule, max_new_tokens) for _ in prompts_ids] if loop_rule else []
        extra: dict[str, Any] = {}
        if watches:  # called on CTranslate2's worker thread for every decoded token; True stops that answer
            extra["callback"] = lambda step: watches[step.batch_id].push(int(step.token_id)) and not step.is_last
        results = self.generator.generate_batch(
            tokens, max_length=max_new_tokens, sampling_topk=1, end_token=sorted(stop_ids),
            include_prompt_in_result=False, max_batch_size=len(tokens), **extra)
        outs = [list(r.sequences_ids[0]) for r in results]
        for i, w in enumerate(watches):
            if w.period is not None:
                outs[i] = w.complete(max_new_tokens)
                with self._stats_lock:
                    self.loop_stats["answers"] += 1
                    self.loop_stats["extrapolated_tokens"] += max_new_tokens - w.loop_from
        return outs
