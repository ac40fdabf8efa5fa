"""Several single-thread llama.cpp servers of the same GGUF behind one backend: one per core.

Why: on these CPUs one llama.cpp server with 2 threads synchronises its threads at every op of a small
model's graph, and batching 20 sequences on one thread gains little over decoding them one by one
(exploratory readings on a loaded machine, results/REPORT.md section 7: 1 thread x 20 slots ~1.1x the p95 of
one at a time, 2 threads x 20 slots ~1.8x; two replicas 2.36x on a quiet one, `bench/serve_load.py`). Independent servers, one thread each, share nothing, so each core decodes its own batch. Each new
request goes to the server with the fewest requests in flight; within a server, llama.cpp's slots batch
them (continuous batching).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any


class ReplicaBackend:
    """`replicas` backends of the same weights, each request sent to the least busy one (thread-safe)."""

    name = "llama.cpp"

    def __init__(self, backends: list[Any]):
        if not backends:
            raise ValueError("ReplicaBackend needs at least one backend")
        self.backends = list(backends)
        self.in_flight = [0] * len(self.backends)
        self._lock = threading.Lock()
        first = self.backends[0]
        self.context_length = first.context_length
        self.slots = sum(getattr(b, "slots", 1) for b in self.backends)
        self.threads = sum(getattr(b, "threads", 1) for b in self.backends)
        for attr in ("gguf", "lora", "dtype", "runtime", "listening_address"):
            if hasattr(first, attr):
                setattr(self, attr, getattr(first, attr))

    @property
    def replicas(self) -> int:
        return len(self.backends)

    def iter_tokens(self, prompt_ids: list[int], settings: Any, stop_ids: set[int], cancel: threading.Event) -> Iterator[int]:
        with self._lock:
            i = min(range(len(self.backends)), key=lambda k: self.in_flight[k])
            self.in_flight[i] += 1
        try:
            yield from self.backends[i].iter_tokens(prompt_ids, settings, stop_ids, cancel)
        finally:
            with self._lock:
                self.in_flight[i] -= 1

    def close(self) -> None:
        for b in self.backends:
            if hasattr(b, "close"):
                b.close()
