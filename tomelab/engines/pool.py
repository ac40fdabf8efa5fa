"""Engines for the app's models: served at once, upgraded in the background.

Loading a model on transformers fp32 takes seconds; converting it for llama.cpp / CTranslate2 and
checking the greedy match against transformers takes a minute or more on the first launch. So each
model gets a `Slot` that is ready on transformers at once, while `tomelab.engines.choice.load_engine`
with the requested engine runs in a background thread (its verdicts are cached across launches under
the artefact home's cache/engine_choice/); the slot switches engines when that finishes. The loader's
log lines (conversions, checks) are copied into the slot's progress, which the app shows.
"""

from __future__ import annotations

import logging
import threading
import time

from tomelab.engines.chat import ChatEngine
from tomelab.engines.choice import load_engine
from tomelab.errors import TomelabError
from tomelab.serving import ModelEntry, display_path

log = logging.getLogger(__name__)


class Slot:
    """One model's engine: ready at once on transformers, swapped for a faster one checked in the background."""

    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.engine: ChatEngine | None = None
        self.ready = threading.Event()
        self.error: str | None = None
        self.busy = True  # background conversion / checks still running
        self.progress: list[str] = []

    def note(self, msg: str) -> None:
        self.progress.append(f"{time.strftime('%H:%M:%S')} {msg}")
        del self.progress[:-12]

    def markdown(self) -> str:
        if self.error:
            return f"**Engine:** failed to load: {self.error}"
        eng = self.engine
        head = (f"**Engine:** {eng.engine_name} ({eng.info.get('engine_reason', '')})" if eng else "**Engine:** loading…")
        if self.busy and eng is not None:
            head += " · checking faster engines in the background…"
        return head + "\n\n<details><summary>engine log</summary>\n\n" + "\n".join(f"- {p}" for p in self.progress) + "\n</details>"


class _Progress(logging.Handler):
    """Copies log lines of a slot's loader thread (conversions, greedy checks) into that slot's progress."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.slots: dict[int, Slot] = {}

    def emit(self, record: logging.LogRecord) -> None:
        slot = self.slots.get(record.thread or 0)
        if slot is not None:
            slot.note(record.getMessage()[:240])


_PROGRESS: _Progress | None = None


def _install_progress() -> _Progress:
    """One handler on the loggers of the loading code, whatever the number of pools."""
    global _PROGRESS
    if _PROGRESS is None:
        _PROGRESS = _Progress()
        for name in ("tomelab", "training"):
            lg = logging.getLogger(name)
            lg.addHandler(_PROGRESS)
            if lg.getEffectiveLevel() > logging.INFO:  # the loaders log their steps at INFO
                lg.setLevel(logging.INFO)
    return _PROGRESS


class EnginePool:
    """Engines by picker key. The page never waits for a conversion: each model is served at once with
    transformers fp32, while `load_engine(engine=self.engine)` converts and checks the faster runtimes
    in a background thread (verdicts cached across launches under the artefact home's
    cache/engine_choice/), and the engine is swapped when that finishes.
    `engine_slots`: requests one llama.cpp engine decodes together (parallel slots, continuous batching);
    the caller lets at least that many requests through at once (the app's Gradio queue)."""

    def __init__(self, entries: list[ModelEntry], *, engine: str = "auto", threads: int | None = None,
                 context_length: int = 2048, max_loaded: int = 3, engine_slots: int = 4, engine_replicas: int = 1):
        self.engine, self.threads, self.context_length, self.max_loaded = engine, threads, context_length, max_loaded
        self.engine_slots = max(1, int(engine_slots))
        self.engine_replicas = max(1, int(engine_replicas))
        self.entries = {e.key: e for e in entries}
        self.slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._progress = _install_progress()

    def start(self, key: str) -> Slot:
        if key not in self.entries:
            raise TomelabError(f"unknown model {key!r}; pick one of: {', '.join(self.entries)}")
        with self._lock:
            if key not in self.slots:
                self.slots[key] = slot = Slot(self.entries[key])
                threading.Thread(target=self._load, args=(slot,), name=f"load {key}", daemon=True).start()
                while len(self.slots) > self.max_loaded:
                    self.slots.pop(next(k for k in self.slots if k != key))
            return self.slots[key]

    def get(self, key: str) -> ChatEngine:
        slot = self.start(key)
        slot.ready.wait()
        if slot.engine is None:
            raise TomelabError(f"cannot load {key}: {slot.error}")
        return slot.engine

    def busy(self) -> bool:
        return any(s.busy for s in self.slots.values())

    def _load(self, slot: Slot) -> None:
        self._progress.slots[threading.get_ident()] = slot
        try:
            self._load_in_thread(slot)
        finally:
            slot.busy = False
            slot.ready.set()
            self._progress.slots.pop(threading.get_ident(), None)

    def _load_in_thread(self, slot: Slot) -> None:
        e = slot.entry
        kw = dict(label=e.key, threads=self.threads, context_length=self.context_length, slots=self.engine_slots)
        try:
            t0 = time.perf_counter()
            slot.note(f"loading {display_path(e.ref)} with transformers fp32")
            eng = load_engine(e.ref, engine="transformers", **kw)  # type: ignore[arg-type]
            eng.info["engine_reason"] = "requested" if self.engine == "transformers" else "serving at once"
            slot.engine = eng
            slot.note(f"ready on transformers in {time.perf_counter() - t0:.1f}s")
        except Exception as ex:  # noqa: BLE001 - shown on the page, the app keeps serving the others
            log.exception("loading %s failed", e.key)
            slot.error = f"{type(ex).__name__}: {ex}"
            return
        slot.ready.set()
        if self.engine == "transformers":
            return
        try:
            slot.note(f"background: engine {self.engine} (conversions and greedy-match checks, cached across launches)")
            fast = load_engine(e.ref, engine=self.engine, replicas=self.engine_replicas, **kw)  # type: ignore[arg-type]
        except Exception as ex:  # noqa: BLE001
            log.warning("%s: staying on transformers (%s)", e.key, ex)
            slot.note(f"stays on transformers: {type(ex).__name__}: {ex}")
            return
        if fast.engine_name != eng.engine_name:
            slot.engine = fast
            slot.note(f"switched to {fast.engine_name}: {fast.info.get('engine_reason', '')}")
        else:
            eng.info["engine_reason"] = fast.info.get("engine_reason", "")
            slot.note(f"stays on transformers: {fast.info.get('engine_reason', '')}")
