"""GGUF export without llama.cpp's converter: Llama-architecture HF folders written with `gguf.GGUFWriter`.

A fresh machine has no `convert_hf_to_gguf.py` (it ships in no wheel) and may have no compiler, so the
weights a fine-tune serves are written here directly from the merged safetensors, with the same
layout llama.cpp's converter produces for `LlamaForCausalLM`: its tensor names, the rotary q/k row
permutation, 1-D norms kept f32, and the tokenizer (GPT-2 BPE vocabulary, merges, special ids and chat
template) from the folder. Other architectures still go through the converter (`ensure_converter`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tomelab.errors import TomelabError
from tomelab.io import atomic_path

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("LlamaForCausalLM",)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# The 4/5-bit types keep the token embedding (also the output matrix when tied) at q8_0, as llama.cpp's
# quantizer does for SmolLM2 (its Q6_K choice falls back to q8_0 when rows are not a multiple of 256):
# the PyPI SmolLM2 Q4_1 file has exactly this layout, so an exported q4_1 runs at that file's speed.
_EMBED_Q8 = ("q5_1", "q5_0", "q4_1", "q4_0")
# HF tensor name (after `model.layers.{i}.`) -> GGUF name (after `blk.{i}.`), as in llama.cpp's converter.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def can_write(model_dir: str | Path) -> bool:
    """Whether this module can export the folder (a Llama-architecture HF checkpoint)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    return any(a in SUPPORTED_ARCHS for a in archs)


def rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (its converter's `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `rotary_permute`: HF row order back from llama.cpp's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str | None:
    if hf in _TOP_NAMES:
        return _TOP_NAMES[hf]
    if hf.startswith("model.layers."):
        i, rest = hf[len("model.layers."):].split(".", 1)
        if rest in _LAYER_NAMES:
            return f"blk.{int(i)}.{_LAYER_NAMES[rest]}"
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    raise TomelabError(f"unexpected tensor {hf!r}: not a plain LlamaForCausalLM checkpoint (LoRA not merged?)")


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's pre-tokenizer name. Only matters when llama.cpp tokenizes text itself (tomelab always
    sends token ids); SmolLM's split (digits one by one, then byte-level) is `smollm`."""
    pre = json.dumps(tok_json.get("pre_tokenizer") or {})
    if '"Digits"' in pre and '"individual_digits": true' in pre and '"ByteLevel"' in pre:
        return "smollm"
    return "default"


def _add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok_json_path = model_dir / "tokenizer.json"
    if not tok_json_path.is_file():
        raise TomelabError(f"{model_dir} has no tokenizer.json: save the tokenizer with the weights before exporting.")
    tok_json = json.loads(tok_json_path.read_text(encoding="utf-8"))
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise TomelabError(f"{model_dir}: only BPE (GPT-2 style) tokenizers are written directly; "
                           "use llama.cpp's converter (TOMELAB_LLAMACPP_SRC) for this model.")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer)
    if getattr(tok, "chat_template", None) and not special.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", *, transform: Any = None) -> Path:
    """Write `model_dir` (merged Llama HF folder) as a GGUF of `outtype` at `out` (atomic).

    `transform(name, array) -> array`, when given, edits each HF tensor before it is written (tests use it
    to make a deliberately broken file)."""
    import gguf
    from safetensors import safe_open

    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise TomelabError(f"GGUF type {outtype!r} is not written directly; use one of {', '.join(OUTTYPES)}")
    if not can_write(model_dir):
        raise TomelabError(f"{model_dir} is not a LlamaForCausalLM folder; direct GGUF export supports {SUPPORTED_ARCHS}")
    t0 = time.perf_counter()
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise TomelabError(f"{model_dir}: rope scaling {rope!r} is not written directly; use llama.cpp's converter.")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    qtype = getattr(gguf.GGMLQuantizationType, outtype.upper())
    ftype = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TomelabError(f"{model_dir} has no safetensors weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(cfg.get("_model_name_or_path") or model_dir.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
        w.add_rope_dimension_count(int(head_dim))
        if head_dim * n_head != cfg["hidden_size"]:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, model_dir, int(cfg["vocab_size"]))
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for hf in st.keys():
                    name = _gguf_name(hf)
                    if name is None or (name == "output.weight" and cfg.get("tie_word_embeddings")):
                        continue
                    a = st.get_tensor(hf).float().numpy()
                    if transform is not None:
                        a = np.asarray(transform(hf, a), dtype=np.float32)
                    if hf.endswith("q_proj.weight"):
                        a = rotary_permute(a, n_head)
                    elif hf.endswith("k_proj.weight"):
                        a = rotary_permute(a, n_kv)
                    t = gguf.GGMLQuantizationType.Q8_0 if name == "token_embd.weight" and outtype in _EMBED_Q8 else qtype
                    if a.ndim == 1 or t == gguf.GGMLQuantizationType.F32:
                        w.add_tensor(name, a.astype(np.float32))
                    elif t == gguf.GGMLQuantizationType.F16:
                        w.add_tensor(name, a.astype(np.float16))
                    else:
                        w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s (%s) in %.1fs", out, outtype, time.perf_counter() - t0)
    return out
