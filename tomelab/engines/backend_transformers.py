"""The transformers backend: `model.generate` with the KV cache, streamed from a worker thread.

The reference every other backend is checked against (greedy match, quality guard), and the fallback
when no faster runtime is installed or passes its check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from tomelab.engines.chat import GenerationSettings, default_threads, stream_from_thread


class TransformersBackend:
    """`model.generate` with the KV cache in a worker thread, ids handed over through a queue (`stream_from_thread`)."""

    name = "transformers"

    def __init__(self, model: Any, *, threads: int | None = None, context_length: int | None = None):
        import torch

        self.model = model.eval()
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)  # the process's intra-op pool: one knob, set once
        cfg_len = getattr(model.config, "max_position_embeddings", 2048) or 2048
        self.context_length = min(context_length or 2048, cfg_len)
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")

    def iter_tokens(
        self, prompt_ids: list[int], settings: GenerationSettings, stop_ids: set[int], cancel: threading.Event
    ) -> Iterator[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class _IdStreamer(BaseStreamer):  # generate() hands its new ids over here, in the worker thread
            def __init__(self, put_id: Callable[[int], None]) -> None:
                self.put_id = put_id
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    self.put_id(int(t))

            def end(self) -> None:
                pass  # the stream ends when generate() returns

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        greedy = settings.temperature == 0.0
        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=settings.max_new_tokens,
            do_sample=not greedy,
            eos_token_id=sorted(stop_ids),
            pad_token_id=min(stop_ids),
            stopping_criteria=StoppingCriteriaList([_Cancel()]),
            use_cache=True,
        )
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)

        def generate(put: Callable[[int], None]) -> None:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                self.model.generate(**kwargs, streamer=_IdStreamer(put))

        yield from stream_from_thread(generate, cancel, name="tomelab-generate")
