"""Quality guard for a quantised GGUF: its held-out NLL must not be worse than the f16 file's by more
than the lab can detect.

Why NLL and not "identical greedy output on 8 prompts": greedy text flips at near-ties even for
harmless quantisation (q8_0 matched 1/8 prompts) yet says nothing about how much worse a file is. Here
both files' weights are dequantised into the transformers model (`gguf` package, no llama.cpp) and score
the same fixed conversations; per conversation NLL differences are paired (`eval.stats`), and the file
passes when the 95% CI upper bound of (quantised - f16) stays under `margin` (default: the held-out NLL
MDE of the README ablation, NLL_MARGIN_NATS). The verdict and numbers land in `ChatEngine.info`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tomelab import paths
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json

log = logging.getLogger(__name__)

# Held-out NLL MDE of the README ablation (44 items, 3 seeds; ../shared/NOTES.md "Statistics of the first
# README ablation"): a served file worse by less than this cannot move any conclusion the lab draws.
NLL_MARGIN_NATS = 0.018
GUARD_ITEMS = 32
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@dataclass
class GuardReport:
    passed: bool
    quant: str
    reference: str
    n_items: int
    quant_nll: float
    reference_nll: float
    diff: float  # quantised - reference, nats per assistant token (token-weighted)
    lo: float
    hi: float
    mde: float  # 2.8 x SE of this paired comparison
    margin: float
    criterion: str
    slice: str

    def summary(self) -> str:
        return (f"{'PASS' if self.passed else 'REFUSED'}: held-out NLL {self.quant_nll:.4f} vs f16 {self.reference_nll:.4f} "
                f"(diff {self.diff:+.4f} nats, 95% CI [{self.lo:+.4f}, {self.hi:+.4f}], MDE {self.mde:.4f}, "
                f"margin {self.margin}) on {self.n_items} conversations")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_from_gguf(gguf_path: str | Path, template: Any) -> Any:
    """A copy of the (Llama) transformers `template` model holding the dequantised weights of `gguf_path`."""
    import gguf
    import torch

    cfg = template.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    reader = gguf.GGUFReader(str(gguf_path))
    model = copy.deepcopy(template)
    state = model.state_dict()
    seen = set()
    for t in reader.tensors:
        if t.name in _TOP:
            hf = _TOP[t.name]
        elif t.name.startswith("blk."):
            _, i, kind, _w = t.name.split(".")
            if kind not in _LAYER:
                raise TomelabError(f"{gguf_path}: unexpected tensor {t.name} for a Llama model")
            hf = f"model.layers.{i}.{_LAYER[kind]}.weight"
        else:
            continue
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape.tolist())])
        if hf.endswith("q_proj.weight"):
            a = _unpermute(a, n_head)
        elif hf.endswith("k_proj.weight"):
            a = _unpermute(a, n_kv)
        if hf not in state or tuple(state[hf].shape) != a.shape:
            raise TomelabError(f"{gguf_path}: tensor {t.name} {a.shape} does not fit the model "
                               f"({tuple(state[hf].shape) if hf in state else 'missing'}): a file of another model?")
        state[hf] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        seen.add(hf)
    if "lm_head.weight" in state and "lm_head.weight" not in seen:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        seen.add("lm_head.weight")
    missing = [k for k in state if k not in seen and not k.endswith("inv_freq")]
    if missing:
        raise TomelabError(f"{gguf_path} lacks {len(missing)} tensors of the model (e.g. {missing[0]}): a file of another model?")
    model.load_state_dict(state)
    return model.eval()


def guard_conversations(heldout_dir: str | Path | None = None, n: int = GUARD_ITEMS) -> tuple[str, list[tuple[str, list[dict]]]]:
    """A fixed small slice: the first `n` held-out conversations when a held-out dir is given, else the last
    `n` rows of the shared Alpaca file as single-turn conversations."""
    if heldout_dir is not None:
        from eval.sets import load_heldout

        items = load_heldout(heldout_dir).items[:n]
        return f"{heldout_dir} (first {len(items)})", [(it.id, it.extra["conversation"]) for it in items]
    src = paths.shared_data_dir() / "alpaca" / "alpaca_5000.json"
    if not src.is_file():
        raise TomelabError(f"no held-out slice for the quality guard: {src} is missing and no held-out dir was given")
    rows = json.loads(src.read_text(encoding="utf-8"))[-n:]
    convs = []
    for k, r in enumerate(rows):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        convs.append((f"alpaca-{len(rows) - n + k}", [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": r["output"]}]))
    return f"{src.name} (last {len(convs)} rows)", convs


_REFERENCE_NLL: dict[tuple, dict[str, tuple[float, int]]] = {}


def _nll(model: Any, tokenizer: Any, convs: list[tuple[str, list[dict]]]) -> dict[str, tuple[float, int]]:
    from eval.generate import assistant_nll

    return assistant_nll(model, tokenizer, convs, max_length=512, desc="guard nll")


def quality_guard(quant: str | Path, reference: str | Path, template: Any, tokenizer: Any, *,
                  heldout_dir: str | Path | None = None, margin: float = NLL_MARGIN_NATS, n: int = GUARD_ITEMS) -> GuardReport:
    """Held-out NLL of `quant` vs `reference` (the f16 GGUF), paired over the same conversations."""
    from eval.stats import paired_bootstrap_diff

    slice_name, convs = guard_conversations(heldout_dir, n)
    nq = _nll(model_from_gguf(quant, template), tokenizer, convs)
    ref = Path(reference)
    memo_key = (str(ref.resolve()), ref.stat().st_size, ref.stat().st_mtime_ns, slice_name, tokenizer.chat_template)
    if memo_key not in _REFERENCE_NLL:  # the f16 file's scores serve every quantised candidate
        _REFERENCE_NLL[memo_key] = _nll(model_from_gguf(reference, template), tokenizer, convs)
    nr = _REFERENCE_NLL[memo_key]
    ids = [c for c, _ in convs if nq[c][1] > 0 and np.isfinite(nq[c][0]) and np.isfinite(nr[c][0])]
    if len(ids) < 8:
        raise TomelabError(f"quality guard: only {len(ids)} scorable conversations in {slice_name}")
    w = [nq[c][1] for c in ids]
    a, b = [nq[c][0] for c in ids], [nr[c][0] for c in ids]
    ci = paired_bootstrap_diff(a, b, w, min_seeds_a=1, min_seeds_b=1, names=("quantised", "f16"))
    mde = 2.8 * (ci.hi - ci.lo) / 3.92
    wa = float(np.average(a, weights=w))
    wb = float(np.average(b, weights=w))
    return GuardReport(passed=ci.hi <= margin, quant=str(quant), reference=str(reference), n_items=len(ids),
                       quant_nll=round(wa, 5), reference_nll=round(wb, 5), diff=round(ci.estimate, 5),
                       lo=round(ci.lo, 5), hi=round(ci.hi, 5), mde=round(mde, 5), margin=margin,
                       criterion=f"95% CI upper bound of held-out NLL (quantised - f16) <= {margin} nats",
                       slice=slice_name)


def cached_guard(quant: str | Path, reference: str | Path, template: Any, tokenizer: Any, **kw: Any) -> dict:
    """`quality_guard`, run once per (file, reference, tokenizer template, criterion) and cached."""
    q, r = Path(quant), Path(reference)
    key = hashlib.sha256(f"{q.resolve()}|{q.stat().st_size}|{r.resolve()}|{r.stat().st_size}|"
                         f"{tokenizer.chat_template}|{kw}|{NLL_MARGIN_NATS}".encode()).hexdigest()[:10]
    path = paths.cache_dir() / "engine_choice" / f"guard-{q.stem}-{key}.json"
    if path.is_file():
        return read_json(path)
    log.info("quality guard: held-out NLL of %s vs %s (one-off)", q.name, r.name)
    report = asdict(quality_guard(q, r, template, tokenizer, **kw))
    write_json(path, report)
    return report
