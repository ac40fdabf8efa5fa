"""The chat session every engine serves through: template, context fitting, stops and streaming.

The app, the chat CLI, evaluation and the benchmarks all talk to a `ChatEngine`: it renders the
conversation with the model's own chat template (HF tokenizer), fits it into the context window
(dropping the oldest turns, then cutting the last message, and saying so), and streams decoded text
while a `TokenBackend` (`backend_transformers`, `backend_llamacpp`, `backend_ctranslate2`) produces
token ids. Every backend receives the same prompt ids and stops on the same ids, so their outputs
compare token for token (`tomelab.engines.match`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tomelab.engines.loops import LoopRule, LoopWatch
from tomelab.errors import TomelabError

# End-of-turn markers of the chat formats tomelab uses (ChatML for SmolLM2, Gemma turns).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant."


def default_threads() -> int:
    """Generation threads when none are given: `$TOMELAB_THREADS`, else every core this process may use."""
    env = os.environ.get("TOMELAB_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class GenerationSettings:
    """What a user can turn in the app; temperature 0 means greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stop: tuple[str, ...] = ()  # extra stop strings, cut from the output
    seed: int | None = None
    # greedy only: stop decoding an answer caught in a token cycle and write the cycle out to max_new_tokens
    # (tomelab/engines/loops.py; evaluation's `loop_repeats`)
    loop_rule: LoopRule | None = None

    def __post_init__(self) -> None:
        if self.loop_rule is not None and self.temperature != 0.0:
            raise TomelabError("a loop rule extrapolates greedy decoding only: set temperature = 0 or drop the rule")
        if not 0.0 <= self.temperature <= 2.0:
            raise TomelabError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise TomelabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise TomelabError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class StreamEvent:
    """One step of a streamed answer: the new text and the running numbers."""

    delta: str
    text: str  # the whole answer so far
    n_tokens: int
    first_token_s: float | None  # seconds from request to the first generated token
    elapsed_s: float
    done: bool = False
    finish_reason: str | None = None  # "stop" (end of turn / stop string), "length", or "loop" (settings.loop_rule)
    note: str | None = None  # set when the conversation was cut to fit the context

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (so it does not fold in prompt processing)."""
        if self.first_token_s is None or self.n_tokens < 2:
            return 0.0
        dt = self.elapsed_s - self.first_token_s
        return (self.n_tokens - 1) / dt if dt > 0 else 0.0


@dataclass
class FittedPrompt:
    ids: list[int]
    note: str | None
    dropped_turns: int = 0


class TokenBackend(Protocol):
    """Produces token ids for prompt ids; stops on `stop_ids`, `max_new_tokens` or `cancel`."""

    name: str
    context_length: int

    def iter_tokens(
        self, prompt_ids: list[int], settings: GenerationSettings, stop_ids: set[int], cancel: threading.Event
    ) -> Iterator[int]: ...


def stream_from_thread(
    produce: Callable[[Callable[[Any], None]], None],
    cancel: threading.Event,
    *,
    name: str,
    fail: Callable[[BaseException], BaseException] | None = None,
) -> Iterator[Any]:
    """Run `produce(put)` in a daemon thread and yield everything it `put`s, in order, until it returns.

    For runtimes that push their output from a callback (transformers' streamer, llama.cpp's chunk
    handler). When the consumer stops early or the stream ends, `cancel` is set (the producer polls it)
    and the thread gets up to 30 s to finish. An exception in `produce` is raised here after the items
    put before it: as it is, or as `fail(error)` chained to it.
    """
    out: queue.Queue = queue.Queue()
    end = object()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            produce(out.put)
        except BaseException as e:  # surfaced in the consumer below
            errors.append(e)
        finally:
            out.put(end)

    th = threading.Thread(target=work, name=name, daemon=True)
    th.start()
    try:
        while True:
            item = out.get()
            if item is end:
                break
            yield item
    finally:
        cancel.set()
        th.join(timeout=30)
    if errors:
        if fail is None:
            raise errors[0]
        raise fail(errors[0]) from errors[0]


def stop_token_ids(tokenizer: Any, model_config_eos: Any = None) -> set[int]:
    """Every id that ends a turn: the tokenizer's eos, the model's eos and known turn markers."""
    ids: set[int] = set()
    for v in (model_config_eos, tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(vocab[tok])
    return ids


def render_messages(history: Sequence[dict[str, str]], user_message: str, system_prompt: str) -> list[dict[str, str]]:
    """The conversation as chat-template messages: system prompt, past turns, the new user turn."""
    messages: list[dict[str, str]] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for m in history:
        role, content = m.get("role"), m.get("content")
        if role in ("user", "assistant") and isinstance(content, str) and content:
            messages.append({"role": role, "content": content})
    messages.append({"role": "user", "content": user_message})
    return messages


# Caps on the history one request may carry, applied before any tokenisation: the oldest exchanges
# beyond them are not read (with a note). A 1 MB history of 300 exchanges took 109 s of CPU to fit when
# every dropped exchange re-encoded the whole conversation.
MAX_HISTORY_BYTES = 200_000
MAX_HISTORY_EXCHANGES = 100


def fit_prompt(tokenizer: Any, messages: list[dict[str, str]], max_prompt_tokens: int, *,
               max_history_bytes: int = MAX_HISTORY_BYTES,
               max_history_exchanges: int = MAX_HISTORY_EXCHANGES) -> FittedPrompt:
    """Token ids of the chat-templated prompt, cut to `max_prompt_tokens` with a visible note.

    Oldest user/assistant turns go first (the system prompt and the new message stay); if the new
    message alone is still too long, its middle is cut. Never raises for a long request.
    Linear in the history: each message is tokenised once (one batched call) to estimate what dropping
    the oldest exchanges saves, the prompt is encoded for that choice and corrected by one exchange at
    a time only if the estimate was off; history beyond the byte/exchange caps is not read at all.
    """

    def encode(msgs: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) : -1]
    last = messages[-1]
    # exchanges = (user, assistant) pairs from the oldest; a lone leading turn counts as one exchange
    starts = list(range(len(turns) % 2, len(turns), 2))
    if len(turns) % 2:
        starts = [0] + starts
    capped = max(0, len(starts) - max_history_exchanges)
    sizes = [sum(len(m["content"].encode("utf-8")) for m in turns[a:b])
             for a, b in zip(starts, starts[1:] + [len(turns)])]
    total = sum(sizes[capped:])
    while capped < len(starts) and total > max_history_bytes:
        total -= sizes[capped]
        capped += 1
    cap_note = (f"History too long (over {max_history_exchanges} exchanges or {max_history_bytes // 1000} kB): "
                f"the {capped} oldest exchange(s) were not read." if capped else None)
    starts = starts[capped:]
    turns = turns[starts[0]:] if starts else []
    starts = [a - (starts[0] if starts else 0) for a in starts]

    def with_note(note: str | None) -> str | None:
        return " ".join(n for n in (cap_note, note) if n) or None

    ids = encode(system + turns + [last])
    if len(ids) <= max_prompt_tokens:
        return FittedPrompt(ids, with_note(None), capped)
    base = encode(system + [last])
    dropped = len(starts)
    if turns and len(base) <= max_prompt_tokens:
        lens = [len(x) for x in tokenizer([m["content"] for m in turns], add_special_tokens=False)["input_ids"]]
        per_msg = (len(ids) - len(base) - sum(lens)) / len(turns)  # template tokens around each message
        bounds = list(zip(starts, starts[1:] + [len(turns)]))
        cost = [sum(lens[a:b]) + per_msg * (b - a) for a, b in bounds]
        kept = len(ids) - len(base)  # estimated history tokens when keeping exchanges k..end
        k = 0
        while k < len(cost) and len(base) + kept > max_prompt_tokens:
            kept -= cost[k]
            k += 1
        k0 = k
        while k < len(starts):  # the estimate is close, not exact: correct one exchange at a time
            ids = encode(system + turns[starts[k]:] + [last])
            if len(ids) <= max_prompt_tokens:
                break
            k += 1
        if k == k0 and 0 < k <= len(starts):  # it fitted at once: maybe one exchange fewer fits too
            fewer = encode(system + turns[starts[k - 1]:] + [last])
            if len(fewer) <= max_prompt_tokens:
                k, ids = k - 1, fewer
        if k < len(starts):
            dropped = capped + k
            return FittedPrompt(ids, with_note(f"Conversation too long: the {dropped} oldest exchange(s) were left out."),
                                dropped)
    dropped += capped
    if len(base) <= max_prompt_tokens:
        return FittedPrompt(base, with_note(f"Conversation too long: the {dropped} oldest exchange(s) were left out."),
                            dropped)
    overhead = len(encode(system + [{"role": "user", "content": ""}]))
    budget = max(8, max_prompt_tokens - overhead - 8)
    msg_ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    head, tail = msg_ids[: budget // 2], msg_ids[len(msg_ids) - (budget - budget // 2) :]
    cut = tokenizer.decode(head) + "\n[...]\n" + tokenizer.decode(tail)
    ids = encode(system + [{"role": "user", "content": cut}])[-max_prompt_tokens:]
    note = (
        f"Message too long ({len(msg_ids)} tokens): its middle was cut to fit the "
        f"{max_prompt_tokens}-token prompt budget."
    )
    if dropped:
        note += f" The {dropped} oldest exchange(s) were left out too."
    return FittedPrompt(ids, with_note(note), dropped)


class _IncrementalText:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text if text.startswith(self.text) else self.text
        return delta


class ChatEngine:
    """A model ready to chat: template, context fitting, stop handling and streaming."""

    def __init__(self, backend: TokenBackend, tokenizer: Any, *, label: str, stop_ids: set[int], info: dict | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.label = label
        self.stop_ids = stop_ids
        self.info = info or {}

    @property
    def engine_name(self) -> str:
        return self.backend.name

    def stream_chat(
        self, history: Sequence[dict[str, str]], user_message: str, settings: GenerationSettings
    ) -> Iterator[StreamEvent]:
        """Stream an answer to `user_message` after `history` (dicts with role/content)."""
        messages = render_messages(history, user_message, settings.system_prompt)
        return self.stream_messages(messages, settings)

    def stream_messages(self, messages: list[dict[str, str]], settings: GenerationSettings) -> Iterator[StreamEvent]:
        t0 = time.perf_counter()
        budget = max(16, self.backend.context_length - settings.max_new_tokens)
        fitted = fit_prompt(self.tokenizer, messages, budget)
        cancel = threading.Event()
        dec = _IncrementalText(self.tokenizer)
        first: float | None = None
        n = 0
        finish = "length"
        watch = LoopWatch(settings.loop_rule, settings.max_new_tokens) if settings.loop_rule else None
        tokens = self.backend.iter_tokens(fitted.ids, settings, self.stop_ids, cancel)
        try:
            for tid in tokens:
                if first is None:
                    first = time.perf_counter() - t0
                if tid in self.stop_ids:
                    finish = "stop"
                    break
                n += 1
                delta = dec.push(tid)
                cut = _find_stop(dec.text, settings.stop)
                if cut is not None:
                    before = len(dec.text) - len(delta)
                    delta = dec.text[before:cut] if cut > before else ""
                    dec.text = dec.text[:cut]
                    finish = "stop"
                    if delta:
                        yield StreamEvent(delta, dec.text, n, first, time.perf_counter() - t0, note=fitted.note)
                    break
                if watch is not None and watch.push(tid) and n < settings.max_new_tokens:
                    before = len(dec.text) - len(delta)
                    for t in watch.complete(settings.max_new_tokens)[n:]:  # the cycle written out, not decoded
                        dec.push(t)  # one at a time: a multi-byte character split across tokens is cut as in decoding
                    n, finish = settings.max_new_tokens, "loop"
                    cut = _find_stop(dec.text, settings.stop)
                    if cut is not None:
                        dec.text, finish = dec.text[: max(cut, before)], "stop"
                    delta = dec.text[before:]
                if delta:
                    yield StreamEvent(delta, dec.text, n, first, time.perf_counter() - t0, note=fitted.note)
                if n >= settings.max_new_tokens:
                    break
        finally:
            cancel.set()  # also stops the backend when the consumer goes away (client disconnect)
            with contextlib.suppress(Exception):
                tokens.close()  # type: ignore[union-attr]
        yield StreamEvent("", dec.text, n, first, time.perf_counter() - t0, done=True, finish_reason=finish, note=fitted.note)

    def generate(self, messages: list[dict[str, str]], settings: GenerationSettings) -> StreamEvent:
        """The whole answer at once (the last event of the stream)."""
        last = None
        for ev in self.stream_messages(messages, settings):
            last = ev
        assert last is not None and last.done
        return last


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

