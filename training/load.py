"""Load anything training produced (or a plain base model) for inference, one call for eval and the app.

A reference is one of:
- a registry base model name, a hub id or a local model folder (plain base model);
- a run directory `artifacts/runs/<variant>/<base>/<seed>/` (base + LoRA adapter, merged in memory
  so generation runs at base-model speed), or its `adapter/` folder, or `<variant>/<base>/<seed>`
  relative to `artifacts/runs`;
- a merged export folder written by `tomelab export` (full safetensors + tokenizer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tomelab.artifacts import ADAPTER_DIR, EXPORT_INFO, RUN_CONFIG, Run  # noqa: F401  (re-exported)
from tomelab.errors import TomelabError
from tomelab.io import read_json

log = logging.getLogger(__name__)


_ROUND_TRIP = "Hello world\n  two spaces, 42."


def load_base_tokenizer(base: str) -> Any:
    """`tomelab.models.load_tokenizer`, checked: text must survive encode -> decode.

    The GGUF-converted SmolLM2 folder names `CodeLlamaTokenizer`, which transformers 5 rebuilds
    without the byte-level pre-tokenizer: every space becomes `<|endoftext|>`. When the round trip
    fails and the folder has a `tokenizer.json`, load that file as a plain fast tokenizer instead
    (same vocabulary, correct spaces) and keep the chat template.
    """
    from tomelab.models import load_tokenizer, resolve_model

    tok = load_tokenizer(base)
    if tok.decode(tok(_ROUND_TRIP, add_special_tokens=False)["input_ids"]) == _ROUND_TRIP:
        return tok
    d = resolve_model(base)
    if not (d / "tokenizer.json").is_file():
        raise TomelabError(f"the tokenizer of {base} does not round-trip text and {d} has no tokenizer.json to fall back on.")
    from transformers import PreTrainedTokenizerFast

    fixed = PreTrainedTokenizerFast.from_pretrained(d)
    fixed.chat_template = tok.chat_template
    if fixed.pad_token is None:
        fixed.pad_token = fixed.eos_token
    if fixed.decode(fixed(_ROUND_TRIP, add_special_tokens=False)["input_ids"]) != _ROUND_TRIP:
        raise TomelabError(f"the tokenizer of {base} ({d}) does not round-trip text; re-convert it with `tomelab models pull {base} --force`.")
    log.warning("%s: tokenizer class %s mangles spaces; using %s/tokenizer.json directly", base, type(tok).__name__, d)
    return fixed


def find_run_dir(ref: str | Path) -> Path | None:
    """The run directory `ref` points at (run dir, its adapter folder, or a runs-relative key), else None."""
    run = Run.find(ref)
    return run.dir if run is not None else None


def describe(ref: str | Path) -> dict[str, Any]:
    """What a reference is, for display: {kind, variant, base, seed, run_dir, model_dir}."""
    run = Run.find(ref)
    if run is not None:
        info = run.config()
        return {
            "kind": "run",
            "variant": info.get("variant"),
            "base": info.get("base"),
            "seed": info.get("seed"),
            "run_dir": str(run.dir),
            "model_dir": None,
        }
    p = Path(ref).expanduser()
    if (p / EXPORT_INFO).is_file():
        info = read_json(p / EXPORT_INFO)
        return {
            "kind": "merged",
            "variant": info.get("variant"),
            "base": info.get("base"),
            "seed": info.get("seed"),
            "run_dir": info.get("run_dir"),
            "model_dir": str(p.resolve()),
        }
    return {"kind": "base", "variant": None, "base": str(ref), "seed": None, "run_dir": None, "model_dir": None}


def load_for_inference(ref: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) ready for `generate`, in eval mode, with the chat template the run trained on."""
    from tomelab.models import load_model

    run = Run.find(ref)
    if run is None:
        # a base model (registry name, hub id, folder) or a merged export folder
        model = load_model(str(ref), dtype=dtype)
        tok = load_base_tokenizer(str(ref))
        model.eval()
        return model, tok

    from peft import PeftModel

    base = run.config()["base"]
    model = load_model(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(run.adapter))
    model = model.merge_and_unload()  # plain model again: no LoRA overhead per token
    tok = load_base_tokenizer(base)  # same tokenizer and chat template the run trained with
    model.eval()
    log.info("loaded run %s (base %s, merged adapter)", run.dir, base)
    return model, tok
