"""Fast CPU generation behind one streaming interface, whichever runtime serves it.

The app, the chat CLI and the benchmark all talk to a `ChatEngine`: it renders the conversation
with the model's own chat template (HF tokenizer), fits it into the context window (dropping the
oldest turns, then cutting the last message, and saying so), and streams decoded text while the
backend produces token ids. Two backends produce those ids:

* `TransformersBackend`: `model.generate` with the KV cache, in a worker thread;
* `LlamaCppBackend`: llama.cpp (`llama-cpp-python`) on a GGUF of the *same* weights.

Both receive the same prompt token ids and stop on the same ids, so their outputs are comparable
token for token; `artifacts/cache/engine_choice/` records whether its greedy outputs matched
the transformers reference, and `load_engine(..., engine="auto")` serves llama.cpp only then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from tomelab import paths
from tomelab.engines_native import (  # noqa: F401 - re-exported: callers import them from here
    CONVERTER_SDIST_VERSION,
    CTranslate2Backend,
    LlamaCppBackend,
    _default_threads,
    ct2_model_dir,
    ensure_converter,
    export_ct2,
    export_gguf,
    gguf_path_for,
)
from tomelab.engines_xllama import XLlamaBackend, xllamacpp_available
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json

log = logging.getLogger(__name__)

# End-of-turn markers of the chat formats tomelab uses (ChatML for SmolLM2, Gemma turns).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant."
# A fixed prompt set: the greedy-match check and the benchmark both use it.
MATCH_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the ocean.",
    "Explain what a neural network is in two sentences.",
    "List the first five prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
)


@dataclass
class GenerationSettings:
    """What a user can turn in the app; temperature 0 means greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stop: tuple[str, ...] = ()  # extra stop strings, cut from the output
    seed: int | None = None

    def __post_init__(self) -> None:
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
    finish_reason: str | None = None  # "stop" (end of turn / stop string) or "length"
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
        for last in self.stream_messages(messages, settings):
            pass
        assert last is not None and last.done
        return last


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


# --------------------------------------------------------------------------- transformers


class TransformersBackend:
    """`model.generate` with the KV cache in a worker thread, ids handed over through a queue."""

    name = "transformers"

    def __init__(self, model: Any, *, threads: int | None = None, context_length: int | None = None):
        import torch

        self.model = model.eval()
        self.threads = threads or _default_threads()
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

        out: queue.Queue = queue.Queue()
        _END = object()

        class _QueueStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    out.put(int(t))

            def end(self) -> None:
                out.put(_END)

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
            streamer=_QueueStreamer(),
            stopping_criteria=StoppingCriteriaList([_Cancel()]),
            use_cache=True,
        )
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surfaced in the consumer thread below
                errors.append(e)
                out.put(_END)

        th = threading.Thread(target=work, name="tomelab-generate", daemon=True)
        th.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    break
                yield item
        finally:
            cancel.set()
            th.join(timeout=30)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- loading and engine choice


def load_for_inference(ref: str, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) for a base name, a run dir or a merged export: training's loader when present."""
    try:
        from training.load import load_for_inference as training_load  # type: ignore[import-not-found]
    except ImportError:
        training_load = None
    if training_load is not None:
        return training_load(ref, dtype=dtype)
    p = Path(ref)
    if p.is_dir() and (p / "adapter").is_dir():
        raise TomelabError(f"{ref} is a run dir with an adapter, but training.load is not available to load it.")
    from tomelab.models import load_model, load_tokenizer

    return load_model(ref, dtype=dtype), load_tokenizer(ref)


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


@dataclass
class MatchReport:
    """How a candidate engine's greedy outputs compare with the transformers fp32 reference."""

    prompts: int
    exact: int  # prompts whose first `n_tokens` greedy tokens are identical
    mean_prefix: float  # mean fraction matched before the first difference that is not a numerical tie
    n_tokens: int
    passed: bool
    criterion: str
    details: list[dict] = field(default_factory=list)
    ties: int = 0  # prompts that differ first at a near-tie of the reference (see TIE_NATS)


# A first difference where the reference model itself scores the two tokens within this many nats is a
# numerical tie: any other kernel (even fp32 with another summation order) may break it either way.
# Measured on SmolLM2-135M (README: Inference engines): llama.cpp f32 and f16 GGUFs of a fine-tune differ
# from transformers fp32 only at a 0.0014-nat tie; Q4_1 and q8_0 differ at 0.01-0.44 nats.
TIE_NATS = 0.005
MATCH_CRITERION = (f"greedy tokens equal to transformers fp32 on >= 7 of the 8 fixed prompts (first 32 tokens), up to "
                   f"numerical ties (reference log-prob gap < {TIE_NATS} nats at the first difference); mean prefix >= 0.95")


def greedy_ids(engine: ChatEngine, prompt: str, n_tokens: int) -> list[int]:
    """The first `n_tokens` greedy token ids (stop ids included) for one user prompt."""
    s = GenerationSettings(temperature=0.0, max_new_tokens=n_tokens, system_prompt=DEFAULT_SYSTEM_PROMPT)
    ids: list[int] = []
    with contextlib.closing(engine.backend.iter_tokens(_match_prompt_ids(engine, prompt), s, engine.stop_ids,
                                                       threading.Event())) as tokens:
        for t in tokens:
            ids.append(t)
            if t in engine.stop_ids or len(ids) >= n_tokens:
                break
    return ids


def _match_prompt_ids(engine: ChatEngine, prompt: str) -> list[int]:
    return fit_prompt(engine.tokenizer, render_messages([], prompt, DEFAULT_SYSTEM_PROMPT), engine.backend.context_length).ids


def tie_gap(reference: ChatEngine, prompt: str, prefix: list[int], ours: int, theirs: int) -> float | None:
    """log p(ours) - log p(theirs) under the reference model after `prefix` (None: the reference has no model)."""
    model = getattr(reference.backend, "model", None)
    if model is None:
        return None
    import torch

    ids = torch.tensor([_match_prompt_ids(reference, prompt) + prefix])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return float(logp[ours] - logp[theirs])


def compare_greedy(reference: ChatEngine, candidate: ChatEngine, *, prompts: Sequence[str] = MATCH_PROMPTS,
                   n_tokens: int = 32, reference_ids: dict[str, list[int]] | None = None,
                   tie_nats: float = TIE_NATS) -> MatchReport:
    """Greedy-output agreement of `candidate` with `reference` on a fixed prompt set.

    A prompt whose first difference is a near-tie of the reference (gap < `tie_nats`) counts as matched:
    past it both continue equally likely prefixes. `reference_ids` memoises the reference's answers."""
    exact, ties, fracs, details = 0, 0, [], []
    memo = reference_ids if reference_ids is not None else {}
    for p in prompts:
        if p not in memo:
            memo[p] = greedy_ids(reference, p, n_tokens)
        a, b = memo[p], greedy_ids(candidate, p, n_tokens)
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = tie_gap(reference, p, a[:same], a[same], b[same]) if same < min(len(a), len(b)) else None
        tie = gap is not None and gap < tie_nats
        frac = 1.0 if tie else same / max(1, len(a))
        exact += int(a == b)
        ties += int(tie)
        fracs.append(frac)
        details.append({"prompt": p, "exact": a == b, "prefix": round(same / max(1, len(a)), 3), "ref_len": len(a),
                        **({"first_diff_gap_nats": round(gap, 4), "tie": tie} if gap is not None else {})})
    mean_prefix = sum(fracs) / len(fracs)
    passed = exact + ties >= len(prompts) - 1 and mean_prefix >= 0.95
    return MatchReport(len(prompts), exact, round(mean_prefix, 4), n_tokens, passed, MATCH_CRITERION, details, ties)


def llama_cpp_available() -> bool:
    """A llama.cpp runtime is installed: `xllamacpp` (prebuilt, preferred) or `llama-cpp-python`."""
    return xllamacpp_available() or importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_backend(gguf: str | Path, *, threads: int | None = None, context_length: int = 2048,
                      slots: int = 4) -> Any:
    """llama.cpp on `gguf`: xllamacpp's embedded server (parallel slots, continuous batching) when
    installed, else llama-cpp-python (one request at a time). `TOMELAB_LLAMACPP=llama-cpp-python` forces it."""
    if xllamacpp_available() and os.environ.get("TOMELAB_LLAMACPP") != "llama-cpp-python":
        return XLlamaBackend(gguf, threads=threads or 1, context_length=context_length, slots=slots)
    return LlamaCppBackend(gguf, threads=threads, context_length=context_length)


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
    else one converted (and cached) from the loaded HF weights as `gguf_type` (`auto` -> q8_0)."""
    if gguf_type in ("auto", "source"):
        src = source_gguf(ref)
        if src is not None:
            return src
        if gguf_type == "source":
            raise TomelabError(f"{ref} has no source GGUF (only registry base models do); use --gguf-type q8_0 or f16.")
        gguf_type = "q8_0"
    return export_gguf(merged_model_dir(model, tokenizer, ref), gguf_type)


# `auto` tries these (engine, weights) in speed order as measured by bench/inference.py
# (SmolLM2-135M, 1 thread: llama.cpp Q4_1 57.7 tok/s > ct2 int8 > llama.cpp f16 35.4 > llama.cpp f32 23.3
# > ct2 float32 18.5 > transformers fp32 12.1) and serves the first whose greedy output matches
# transformers fp32 (`MATCH_CRITERION`); transformers is the fallback. The quantised ones fail the match
# (Q4_1 3/8, q8_0 1/8, ct2 int8 1/8 prompts, first differences 0.01-0.44 nats apart); f16 and f32 pass
# (8/8 on the base model; 7/8 + one 0.0014-nat tie on the README ablation's winner).
# Quantised GGUFs (the source file, q8_0) are now gated by the held-out NLL quality guard instead
# (`tomelab.engine_guard`), which asks whether they are measurably worse, not whether greedy text is equal.
AUTO_ORDER = ("llama.cpp", "ctranslate2")
AUTO_CANDIDATES = (("llama.cpp", "auto"), ("llama.cpp", "q8_0"), ("ctranslate2", "int8"), ("llama.cpp", "f16"), ("llama.cpp", "f32"),
                   ("ctranslate2", "float32"))


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def _fast_engine(kind: str, ref: str, model: Any, tok: Any, stop: set[int], *, threads: int | None,
                 context_length: int, gguf_type: str, ct2_quantization: str, label: str, info: dict,
                 slots: int = 4) -> ChatEngine:
    if kind == "llama.cpp":
        if not llama_cpp_available():
            raise TomelabError("no llama.cpp runtime: `pip install xllamacpp` (prebuilt wheel; `make setup` installs it)")
        gguf = pick_gguf(ref, model, tok, gguf_type)
        backend: Any = llama_cpp_backend(gguf, threads=threads, context_length=context_length, slots=slots)
        info = dict(info, weights=str(gguf), runtime=getattr(backend, "runtime", "llama-cpp-python"),
                    slots=getattr(backend, "slots", 1))
    elif kind == "ctranslate2":
        if not ctranslate2_available():
            raise TomelabError("ctranslate2 is not installed: pip install 'ctranslate2>=4.8,<5'")
        ct2 = export_ct2(hf_weights_dir(ref, model, tok), ct2_quantization)
        backend = CTranslate2Backend(ct2, tok, compute_type=ct2_quantization, threads=threads, context_length=context_length)
        info = dict(info, weights=str(ct2))
    else:
        raise TomelabError(f"unknown engine {kind!r}; use auto, transformers, llama.cpp or ctranslate2")
    return ChatEngine(backend, tok, label=label, stop_ids=stop, info=info)


def gguf_is_quantised(path: str | Path) -> bool:
    """Whether a GGUF's weights are quantised (anything but all-f32 / mostly-f16 / mostly-bf16)."""
    import gguf

    field_ = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    ftype = int(field_.contents()) if field_ is not None else None
    return ftype not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)


def _guard_report(ref: str, model: Any, tok: Any, quant: Path) -> dict:
    """The quality guard of `quant` against the f16 GGUF of the same weights (cached per file)."""
    from tomelab.engine_guard import cached_guard

    report = cached_guard(quant, pick_gguf(ref, model, tok, "f16"), model, tok)
    report.setdefault("summary", (f"{'PASS' if report['passed'] else 'REFUSED'}: held-out NLL diff {report['diff']:+.4f} nats "
                                  f"(95% CI [{report['lo']:+.4f}, {report['hi']:+.4f}], MDE {report['mde']:.4f}, "
                                  f"margin {report['margin']}, {report['n_items']} conversations)"))
    return report


def _match_report(reference: ChatEngine, candidate: ChatEngine, reference_ids: dict[str, list[int]]) -> dict:
    """The greedy-match check of `candidate`, run once per weights file and chat template, then cached."""
    weights = Path(candidate.info["weights"])
    size = weights.stat().st_size if weights.is_file() else sum(p.stat().st_size for p in weights.glob("*"))
    key = hashlib.sha256(f"{weights.resolve()}|{size}|{reference.tokenizer.chat_template}|{MATCH_CRITERION}".encode()).hexdigest()[:10]
    choice_file = paths.cache_dir() / "engine_choice" / f"{candidate.engine_name}-{weights.stem}-{key}.json"
    if choice_file.is_file():
        return read_json(choice_file)
    log.info("checking %s on %s: greedy outputs against transformers fp32 (one-off)", candidate.engine_name, weights.name)
    report = dataclasses.asdict(compare_greedy(reference, candidate, reference_ids=reference_ids))
    write_json(choice_file, report)
    return report


def load_engine(
    ref: str,
    *,
    engine: str = "auto",
    label: str | None = None,
    threads: int | None = None,
    dtype: str = "float32",
    gguf_type: str = "auto",
    ct2_quantization: str = "int8",
    context_length: int = 2048,
    info: dict | None = None,
    slots: int = 4,
    guard: bool = True,
) -> ChatEngine:
    """A ready `ChatEngine` for `ref` (base name, run dir or merged export).

    `auto` serves the first of `AUTO_CANDIDATES` that is installed and whose greedy outputs match the
    transformers fp32 reference (`compare_greedy`, checked once per weights and cached under
    `artifacts/cache/engine_choice/`); otherwise transformers `generate`. Naming an engine
    serves it without the check (and fails loudly when it cannot load). `slots`: concurrent requests
    llama.cpp (xllamacpp) decodes together; others queue.
    A quantised GGUF (Q4_1, q8_0, ...) is served only when it passes the quality guard
    (`tomelab.engine_guard`: held-out NLL vs the f16 file, paired CI; verdict in `info["quality_guard"]`),
    in `auto` and when named (`guard=False` skips it, for benchmarks of speed only).
    """
    if engine not in ("auto", "transformers", *AUTO_ORDER):
        raise TomelabError(f"unknown engine {engine!r}; use auto, transformers, {' or '.join(AUTO_ORDER)}")
    model, tok = load_for_inference(ref, dtype=dtype)
    stop = stop_token_ids(tok, getattr(model.generation_config, "eos_token_id", None))
    label = label or ref
    hf = ChatEngine(TransformersBackend(model, threads=threads, context_length=context_length), tok,
                    label=label, stop_ids=stop, info=dict(info or {}))
    if engine == "transformers":
        hf.info["engine_reason"] = "requested"
        return hf
    reasons: list[str] = []
    reference_ids: dict[str, list[int]] = {}
    if engine == "auto":
        candidates = list(AUTO_CANDIDATES)
    else:
        candidates = [(engine, gguf_type if engine == "llama.cpp" else ct2_quantization)]
    for kind, weights in candidates:
        try:
            fast = _fast_engine(kind, ref, model, tok, stop, threads=threads, context_length=context_length,
                                gguf_type=weights, ct2_quantization=weights, label=label, info=dict(info or {}),
                                slots=slots)
        except (TomelabError, subprocess.CalledProcessError, OSError, RuntimeError, ValueError) as e:
            if engine != "auto":
                raise TomelabError(f"cannot serve {ref} with {kind}: {e}") from e
            log.warning("%s (%s) unavailable for %s: %s", kind, weights, ref, e)
            reasons.append(f"{kind} {weights}: {str(e)[:120]}")
            continue
        if kind == "llama.cpp" and guard and gguf_is_quantised(fast.info["weights"]):
            try:
                g = _guard_report(ref, model, tok, Path(fast.info["weights"]))
            except (TomelabError, OSError, RuntimeError, ValueError) as e:
                if engine != "auto":
                    raise TomelabError(f"quality guard of {fast.info['weights']} could not run: {e}") from e
                reasons.append(f"{kind} {weights}: quality guard could not run ({str(e)[:120]})")
                continue
            fast.info["quality_guard"] = g
            verdict = f"{Path(fast.info['weights']).name}: quality guard {g['summary']}"
            if g["passed"]:
                fast.info["engine_reason"] = verdict
                return fast
            if engine != "auto":
                raise TomelabError(f"refusing to serve {ref} from {verdict}. Use a less quantised --gguf-type (f16).")
            log.warning("%s (%s) on %s: %s", kind, weights, ref, verdict)
            reasons.append(f"{kind} {weights} refused by the {verdict}")
            continue
        if engine != "auto":
            fast.info["engine_reason"] = f"requested ({Path(fast.info['weights']).name}, greedy match not checked)"
            return fast
        report = _match_report(hf, fast, reference_ids)
        match = (f"greedy match {report['exact']}/{report['prompts']} prompts"
                 + (f" + {report['ties']} at a numerical tie" if report.get("ties") else "") + f", mean prefix {report['mean_prefix']}")
        if report["passed"]:
            fast.info["engine_reason"] = f"{Path(fast.info['weights']).name}: {match}"
            return fast
        log.warning("%s (%s) on %s failed the greedy match (%s)", kind, weights, ref, match)
        reasons.append(f"{kind} {weights} failed the {match}")
    hf.info["engine_reason"] = "fallback; " + "; ".join(reasons) if reasons else "fallback"
    return hf
