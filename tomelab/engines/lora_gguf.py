"""Serve a fine-tune as its base model's own quantised GGUF plus its LoRA adapter as a GGUF adapter.

Why: a registry base model's HF weights are its source GGUF dequantised (`tomelab.models`), so the
source file plus the run's adapter (kept in f32, applied by llama.cpp at run time) *is* the merged
fine-tune, up to llama.cpp's kernels. Re-quantising the merged weights instead loses the fine-tune: the
base sits exactly on the Q4_1 grid and the LoRA delta is far smaller than one grid step, so a q4_1 export
snaps back to the base (measured: +0.016 nats of held-out NLL vs f16 on a demo run, refused by the guard),
and a q5 export rounds the 4-bit weights onto a grid that does not contain them. The adapter route keeps
the source file's speed and the f16 file's quality.

The adapter file follows llama.cpp's `convert_lora_to_gguf.py` layout: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha` (llama.cpp scales by alpha / rank), and per target matrix
`<gguf name>.lora_a` (PEFT's lora_A, rank x in) and `.lora_b` (lora_B, out x rank; q/k rows permuted
for llama.cpp's rotary layout, as the weights are).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tomelab import paths
from tomelab.engines.gguf_writer import rotary_permute, rotary_unpermute
from tomelab.errors import TomelabError
from tomelab.io import atomic_path

_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def adapter_problem(adapter_dir: Path, base_cfg: dict) -> str | None:
    """Why this PEFT adapter cannot be served as a llama.cpp LoRA (None when it can)."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        return f"{adapter_dir} has no adapter_config.json + adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "LlamaForCausalLM" not in (base_cfg.get("architectures") or []):
        return "the base is not a Llama-architecture model"
    for key, bad in (("peft_type", lambda v: v != "LORA"), ("use_dora", bool), ("modules_to_save", bool),
                     ("rank_pattern", bool), ("alpha_pattern", bool), ("layers_to_transform", bool),
                     ("trainable_token_indices", bool), ("bias", lambda v: v not in (None, "none"))):
        if bad(cfg.get(key)):
            return f"adapter_config {key}={cfg.get(key)!r} has no llama.cpp LoRA equivalent"
    return None


def _pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors import safe_open

    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        for key in st.keys():
            # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
            parts = key.split(".")
            if "layers" not in parts or parts[-2] not in ("lora_A", "lora_B") or parts[-3] not in _MODULES:
                raise TomelabError(f"{adapter_dir}: adapter tensor {key} is not a LoRA pair of a Llama linear layer")
            layer = int(parts[parts.index("layers") + 1])
            name = f"blk.{layer}.{_MODULES[parts[-3]]}.weight"
            pairs.setdefault(name, {})[parts[-2]] = st.get_tensor(key).float().numpy()
    return pairs


def write_lora_gguf(adapter_dir: str | Path, base_cfg: dict, out: str | Path) -> Path:
    """Write the PEFT adapter in `adapter_dir` as a llama.cpp LoRA GGUF at `out` (f32 tensors; atomic)."""
    import gguf

    adapter_dir, out = Path(adapter_dir), Path(out)
    problem = adapter_problem(adapter_dir, base_cfg)
    if problem:
        raise TomelabError(f"cannot write {adapter_dir} as a llama.cpp LoRA: {problem}")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); llama.cpp by alpha / r
        alpha = alpha * math.sqrt(r)
    n_head = int(base_cfg["num_attention_heads"])
    n_kv = int(base_cfg.get("num_key_value_heads") or n_head)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, ab in sorted(_pairs(adapter_dir).items()):
            if set(ab) != {"lora_A", "lora_B"}:
                raise TomelabError(f"{adapter_dir}: {name} has only {sorted(ab)}")
            a, b = ab["lora_A"], ab["lora_B"]
            if ".attn_q." in name:
                b = rotary_permute(b, n_head)
            elif ".attn_k." in name:
                b = rotary_permute(b, n_kv)
            w.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def lora_gguf_for(adapter_dir: str | Path, base_cfg: dict) -> Path:
    """The adapter's llama.cpp LoRA GGUF, written once per adapter weights and cached."""
    st = Path(adapter_dir) / "adapter_model.safetensors"
    key = hashlib.sha256(f"{st.resolve()}|{st.stat().st_size}|{st.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    out = paths.cache_dir() / "gguf" / f"lora-{key}" / "adapter-f32.gguf"
    return out if out.is_file() else write_lora_gguf(adapter_dir, base_cfg, out)


def apply_lora_gguf(state: dict[str, Any], lora_path: str | Path, base_cfg: dict) -> None:
    """Add the LoRA deltas stored in a llama.cpp adapter file to a HF state dict, as llama.cpp applies them
    (scale alpha / rank); the quality guard scores exactly what is served."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(lora_path))
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.contents()) if field is not None else 0.0
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape.tolist())])
               for t in reader.tensors}
    inverse = {v: k for k, v in _MODULES.items()}
    n_head = int(base_cfg["num_attention_heads"])
    n_kv = int(base_cfg.get("num_key_value_heads") or n_head)
    for name in sorted(n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")):
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        if ".attn_q." in name:
            b = rotary_unpermute(b, n_head)
        elif ".attn_k." in name:
            b = rotary_unpermute(b, n_kv)
        _, layer, kind, _ = name.split(".")
        module = inverse[kind]
        hf = f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{module}.weight"
        scale = alpha / a.shape[0] if alpha else 1.0
        state[hf] = state[hf] + torch.from_numpy(scale * (b @ a)).to(state[hf].dtype)
