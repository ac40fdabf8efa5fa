"""Quality guard for a quantised GGUF: its held-out NLL and its IFEval answers must not be worse than the
f16 file's by more than the lab can detect.

Why NLL and not "identical greedy output on 8 prompts": greedy text flips at near-ties even for
harmless quantisation (q8_0 matched 1/8 prompts) yet says nothing about how much worse a file is. Here
both files' weights are dequantised into the transformers model (`gguf` package, no llama.cpp) and score
the same fixed conversations; per conversation NLL differences are paired (`eval.stats`), and the file
passes when the 95% CI upper bound of (quantised - f16) stays under `margin` (default: the held-out NLL
MDE of the README ablation, NLL_MARGIN_NATS). Then both files answer the same IFEval prompts through
llama.cpp, and the quantised one's prompt-strict score must not be lower by more than IFEVAL_MARGIN_POINTS
(paired CI). The verdict and numbers land in `ChatEngine.info` (the app's engine panel shows them).
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
from tomelab.engines.gguf_writer import rotary_unpermute
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json

log = logging.getLogger(__name__)

# Held-out NLL MDE of the README ablation (44 items, 3 seeds; ../shared/NOTES.md "Statistics of the first
# README ablation"): a served file worse by less than this cannot move any conclusion the lab draws.
NLL_MARGIN_NATS = 0.018
GUARD_ITEMS = 32
# IFEval leg: the served file's own greedy answers (llama.cpp) to the first IFEVAL_ITEMS prompts of the eval's
# stable order, scored prompt-level strict and paired with the f16 file's answers. The margin is the IFEval
# MDE of the README ablation (about 10 points, ../shared/NOTES.md): a smaller loss moves no conclusion.
IFEVAL_ITEMS = 32
IFEVAL_NEW_TOKENS = 256
IFEVAL_MARGIN_POINTS = 10.0
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
    ifeval: dict | None = None  # the IFEval leg (`ifeval_leg`); None when the NLL leg already refused the file

    def summary(self) -> str:
        text = (f"{'PASS' if self.passed else 'REFUSED'}: held-out NLL {self.quant_nll:.4f} vs f16 {self.reference_nll:.4f} "
                f"(diff {self.diff:+.4f} nats, 95% CI [{self.lo:+.4f}, {self.hi:+.4f}], MDE {self.mde:.4f}, "
                f"margin {self.margin}) on {self.n_items} conversations")
        return text + ("; " + ifeval_summary(self.ifeval) if self.ifeval else "")


def ifeval_summary(leg: dict) -> str:
    return (f"IFEval prompt-strict {leg['quant']:.1f} vs f16 {leg['reference']:.1f} (diff {leg['diff']:+.1f} points, "
            f"95% CI [{leg['lo']:+.1f}, {leg['hi']:+.1f}], margin -{leg['margin']:g}, {leg['identical']}/{leg['n_items']} "
            f"answers identical) on {leg['n_items']} prompts")


def model_from_gguf(gguf_path: str | Path, template: Any, lora: str | Path | None = None) -> Any:
    """A copy of the (Llama) transformers `template` model holding the dequantised weights of `gguf_path`
    (plus the deltas of a llama.cpp LoRA adapter file `lora`, as llama.cpp applies them)."""
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
            a = rotary_unpermute(a, n_head)
        elif hf.endswith("k_proj.weight"):
            a = rotary_unpermute(a, n_kv)
        if hf not in state or tuple(state[hf].shape) != a.shape:
            raise TomelabError(f"{gguf_path}: tensor {t.name} {a.shape} does not fit the model "
                               f"({tuple(state[hf].shape) if hf in state else 'missing'}): a file of another model?")
        state[hf] = torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: the reader maps the file read-only
        seen.add(hf)
    if "lm_head.weight" in state and "lm_head.weight" not in seen:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        seen.add("lm_head.weight")
    missing = [k for k in state if k not in seen and not k.endswith("inv_freq")]
    if missing:
        raise TomelabError(f"{gguf_path} lacks {len(missing)} tensors of the model (e.g. {missing[0]}): a file of another model?")
    if lora is not None:
        from tomelab.engines.lora_gguf import apply_lora_gguf

        apply_lora_gguf(state, lora, cfg.to_dict())
        if "lm_head.weight" in state and cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
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


_REFERENCE_ANSWERS: dict[tuple, dict[str, str]] = {}


def _ifeval_answers(gguf_path: Path, tokenizer: Any, stop: set[int], prompts: list, max_new_tokens: int,
                    lora: str | Path | None = None) -> dict[str, str]:
    from eval.generate import generate_greedy_engine
    from tomelab.engines.backend_llamacpp import XLlamaBackend
    from tomelab.engines.chat import ChatEngine

    engine = ChatEngine(XLlamaBackend(gguf_path, threads=1, context_length=1024 + max_new_tokens, slots=8, lora=lora), tokenizer,
                        label=gguf_path.name, stop_ids=stop)
    try:
        return generate_greedy_engine(engine, prompts, max_new_tokens=max_new_tokens, desc=f"guard ifeval {gguf_path.name}")
    finally:
        engine.backend.close()


def ifeval_leg(quant: str | Path, reference: str | Path, template: Any, tokenizer: Any, *, n: int = IFEVAL_ITEMS,
               max_new_tokens: int = IFEVAL_NEW_TOKENS, margin: float = IFEVAL_MARGIN_POINTS,
               lora: str | Path | None = None) -> dict:
    """IFEval prompt-strict of the quantised file's own llama.cpp answers vs the f16 file's, paired per prompt;
    passes when the 95% CI lower bound of (quantised - f16) is above -`margin` points."""
    from eval.sets import ifeval_paired, load_ifeval, score_ifeval, stable_subset
    from tomelab.engines.chat import stop_token_ids

    items = stable_subset(load_ifeval().items, None)[:n]
    prompts = [(it.id, it.messages) for it in items]
    stop = stop_token_ids(tokenizer, getattr(template.generation_config, "eos_token_id", None))
    ref = Path(reference)
    key = (str(ref.resolve()), ref.stat().st_size, ref.stat().st_mtime_ns, n, max_new_tokens, tokenizer.chat_template)
    if key not in _REFERENCE_ANSWERS:
        _REFERENCE_ANSWERS[key] = _ifeval_answers(ref, tokenizer, stop, prompts, max_new_tokens)
    ra, qa = _REFERENCE_ANSWERS[key], _ifeval_answers(Path(quant), tokenizer, stop, prompts, max_new_tokens, lora)
    m = ifeval_paired([score_ifeval(it, qa[it.id]) for it in items], [score_ifeval(it, ra[it.id]) for it in items],
                      ("prompt_strict",), names=("quantised", "f16"))["prompt_strict"]
    ci = m.diff
    return {"passed": ci.lo >= -margin, "n_items": len(items), "quant": round(m.mean_a, 2),
            "reference": round(m.mean_b, 2), "diff": round(ci.estimate, 2), "lo": round(ci.lo, 2),
            "hi": round(ci.hi, 2), "mde": round(ci.mde, 2), "margin": margin,
            "identical": sum(qa[it.id] == ra[it.id] for it in items), "max_new_tokens": max_new_tokens,
            "criterion": f"95% CI lower bound of IFEval prompt-strict (quantised - f16) >= -{margin:g} points"}


def quality_guard(quant: str | Path, reference: str | Path, template: Any, tokenizer: Any, *,
                  heldout_dir: str | Path | None = None, margin: float = NLL_MARGIN_NATS, n: int = GUARD_ITEMS,
                  ifeval_n: int = IFEVAL_ITEMS, ifeval_new_tokens: int = IFEVAL_NEW_TOKENS,
                  lora: str | Path | None = None) -> GuardReport:
    """Held-out NLL of `quant` vs `reference` (the f16 GGUF), paired over the same conversations; then, when
    that passes and `ifeval_n` > 0, the IFEval leg (`ifeval_leg`). Both must pass."""
    from eval.stats import paired_bootstrap_diff

    slice_name, convs = guard_conversations(heldout_dir, n)
    nq = _nll(model_from_gguf(quant, template, lora), tokenizer, convs)
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
    wa = float(np.average(a, weights=w))
    wb = float(np.average(b, weights=w))
    passed = ci.hi <= margin
    leg = (ifeval_leg(quant, reference, template, tokenizer, n=ifeval_n, max_new_tokens=ifeval_new_tokens, lora=lora)
           if passed and ifeval_n > 0 else None)
    criterion = f"95% CI upper bound of held-out NLL (quantised - f16) <= {margin} nats"
    return GuardReport(passed=passed and (leg is None or leg["passed"]), quant=str(quant) + (f" + {lora}" if lora else ""),
                       reference=str(reference),
                       n_items=len(ids), quant_nll=round(wa, 5), reference_nll=round(wb, 5), diff=round(ci.estimate, 5),
                       lo=round(ci.lo, 5), hi=round(ci.hi, 5), mde=round(ci.mde, 5), margin=margin,
                       criterion=criterion + (f"; {leg['criterion']}" if leg else ""), slice=slice_name, ifeval=leg)


def cached_guard(quant: str | Path, reference: str | Path, template: Any, tokenizer: Any, **kw: Any) -> dict:
    """`quality_guard`, run once per (file, reference, tokenizer template, criterion) and cached."""
    q, r = Path(quant), Path(reference)
    key = hashlib.sha256(f"{q.resolve()}|{q.stat().st_size}|{r.resolve()}|{r.stat().st_size}|{tokenizer.chat_template}|"
                         f"{kw}|{NLL_MARGIN_NATS}|{IFEVAL_MARGIN_POINTS}|{IFEVAL_NEW_TOKENS}".encode()).hexdigest()[:10]
    path = paths.cache_dir() / "engine_choice" / f"guard-{q.stem}-{key}.json"
    if path.is_file():
        return read_json(path)
    log.info("quality guard: held-out NLL of %s vs %s (one-off)", q.name, r.name)
    report = asdict(quality_guard(q, r, template, tokenizer, **kw))
    write_json(path, report)
    return report
