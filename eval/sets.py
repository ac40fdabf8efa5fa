"""Eval items: loading the three sets into one shape, and scoring one generated output.

Every set becomes a list of `EvalItem(id, messages, reference, extra)`: `messages` is the prompt
conversation given to the chat template, `reference` the gold answer. Malformed lines in a JSONL set
are quarantined with their line number rather than silently skipped or fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomelab import paths
from tomelab.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    id: str
    messages: list[dict[str, str]]  # the prompt (no final assistant turn)
    reference: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedSet:
    items: list[EvalItem]
    rows_in: int
    quarantine: list[dict[str, Any]]  # {file, line, field, reason}


def stable_subset(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first `limit` items in hash order: a fixed, spread-out subset, identical for every model."""
    ordered = sorted(items, key=lambda it: hashlib.sha256(it.id.encode()).hexdigest())
    return ordered if limit is None else ordered[:limit]


def _read_jsonl(path: Path, required: dict[str, type]) -> tuple[list[tuple[int, dict]], list[dict]]:
    if not path.is_file():
        raise DataError(f"eval set {path} does not exist. Check `path` in the eval config, or that ../shared/data sits beside the repo.")
    rows, bad = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"file": str(path), "line": lineno, "field": None, "reason": f"bad_json: {e.msg}"})
                continue
            missing = [k for k, t in required.items() if not isinstance(obj, dict) or not isinstance(obj.get(k), t)]
            if missing:
                bad.append({"file": str(path), "line": lineno, "field": missing[0],
                            "reason": f"missing_field: `{missing[0]}` absent or not {required[missing[0]].__name__}"})
                continue
            rows.append((lineno, obj))
    if bad:
        log.warning("%s: %d malformed line(s) quarantined (first: line %d, %s)", path, len(bad), bad[0]["line"], bad[0]["reason"])
    return rows, bad


def default_path(set_name: str) -> Path:
    d = paths.shared_data_dir()
    return {"ifeval": d / "ifeval" / "input_data.jsonl", "gsm8k": d / "gsm8k" / "test.jsonl"}[set_name]


def load_ifeval(path: str | Path | None = None) -> LoadedSet:
    p = Path(path) if path else default_path("ifeval")
    rows, bad = _read_jsonl(p, {"key": int, "prompt": str, "instruction_id_list": list, "kwargs": list})
    items = [
        EvalItem(
            id=str(r["key"]),
            messages=[{"role": "user", "content": r["prompt"]}],
            reference="",
            extra={"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]},
        )
        for _, r in rows
    ]
    return LoadedSet(items, len(rows) + len(bad), bad)


def load_gsm8k(path: str | Path | None = None) -> LoadedSet:
    p = Path(path) if path else default_path("gsm8k")
    rows, bad = _read_jsonl(p, {"question": str, "answer": str})
    items, rows_in = [], len(rows) + len(bad)
    for lineno, r in rows:
        gold = gsm8k_gold(r["answer"])
        if gold is None:
            bad.append({"file": str(p), "line": lineno, "field": "answer", "reason": "no `#### <number>` in answer"})
            continue
        items.append(EvalItem(id=f"gsm8k-{lineno}", messages=[{"role": "user", "content": r["question"]}],
                              reference=gold, extra={"answer": r["answer"]}))
    return LoadedSet(items, rows_in, bad)


def load_heldout(heldout_dir: str | Path) -> LoadedSet:
    """Held-out conversations (canonical schema); the last assistant turn is the reference."""
    import pyarrow.parquet as pq

    p = Path(heldout_dir) / "test.parquet"
    if not p.is_file():
        raise DataError(f"held-out set {p} does not exist. Run `tomelab curate` for a variant first (it writes heldout_dir).")
    table = pq.read_table(p, columns=["id", "messages"])
    items, bad = [], []
    for i, (rid, msgs) in enumerate(zip(table.column("id").to_pylist(), table.column("messages").to_pylist())):
        if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            bad.append({"file": str(p), "line": i, "field": "messages", "reason": "does not end with an assistant turn"})
            continue
        items.append(EvalItem(id=rid, messages=msgs[:-1], reference=msgs[-1]["content"], extra={"conversation": msgs}))
    return LoadedSet(items, table.num_rows, bad)


def load_nll_extras(heldout_dir: str | Path, sc: Any) -> list[EvalItem]:
    """Items scored by NLL only, beside the held-out test conversations: the validation slice (split
    "val", where winners are chosen) and reference sets no variant trains on (split "alpaca": rows the
    held-out mechanism kept out of every pool; split "gsm8k": GSM8K test solutions). Ids are prefixed
    with the split so they never collide with test ids."""
    import pyarrow.parquet as pq

    hdir = Path(heldout_dir)
    out: list[EvalItem] = []

    def add(split: str, table_path: Path, limit: int | None) -> None:
        t = pq.read_table(table_path, columns=["id", "messages"])
        items = [EvalItem(id=f"{split}:{rid}", messages=m[:-1], reference=m[-1]["content"],
                          extra={"conversation": m, "split": split})
                 for rid, m in zip(t.column("id").to_pylist(), t.column("messages").to_pylist())
                 if m and len(m) >= 2 and m[-1]["role"] == "assistant"]
        out.extend(stable_subset(items, limit))

    if sc.val:
        add("val", hdir / "val.parquet", sc.reference_limit)
    for ref in sc.references:
        if ref == "alpaca":
            p = hdir / "ref-alpaca.parquet"
            if not p.is_file():
                raise DataError(f"reference set {p} does not exist: add `reference_rows = {{alpaca = 300}}` to the "
                                "recipes' [heldout] section (configs/variants/_base.toml) and re-run the ablation.")
            add("alpaca", p, sc.reference_limit)
        elif ref == "gsm8k":
            rows, _ = _read_jsonl(default_path("gsm8k"), {"question": str, "answer": str})
            items = [EvalItem(id=f"gsm8k:{lineno}", messages=[{"role": "user", "content": r["question"]}],
                              reference=r["answer"],
                              extra={"conversation": [{"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["answer"]}], "split": "gsm8k"})
                     for lineno, r in rows]
            out.extend(stable_subset(items, sc.reference_limit))
    return out


# --- scoring -------------------------------------------------------------------------------

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm_number(s: str) -> str:
    s = s.replace(",", "").strip().rstrip(".")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f == int(f) else repr(f)


def gsm8k_gold(answer: str) -> str | None:
    if "####" not in answer:
        return None
    m = _NUM.search(answer.split("####")[-1])
    return _norm_number(m.group()) if m else None


def gsm8k_pred(output: str) -> str | None:
    """The model's answer: the number after the last `####` if any, else the last number in the output."""
    tail = output.split("####")[-1] if "####" in output else output
    nums = _NUM.findall(tail) or _NUM.findall(output)
    return _norm_number(nums[-1]) if nums else None


def score_gsm8k(item: EvalItem, output: str) -> dict[str, Any]:
    pred = gsm8k_pred(output)
    return {"pred": pred, "em": float(pred is not None and pred == item.reference)}


def score_ifeval(item: EvalItem, output: str) -> dict[str, Any]:
    """Strict/loose checks by the `if-verifiable` checkers; an empty output fails every instruction.

    IFEval's checkers draw a random value for an argument they cannot use (prompts 1122 and 1129 ask for the
    frequency of "#" and "!", and the letter checker then counts a random letter instead), so the same answer
    could pass one run and fail the next, which is noise in a paired comparison. The draw is seeded by the
    item's id: one fixed letter per item, the global `random` state left as it was. `language:response_language`
    calls langdetect, which samples with a fresh random seed on every call unless `DetectorFactory.seed` is set,
    so a short or mixed-language answer flipped between runs (prompts 2299 and 3195 of the base model's full
    decoding); it is fixed at 0 while scoring, as langdetect's documentation advises."""
    import random

    state = random.getstate()  # before the imports: importing if_verifiable draws from `random` too
    import langdetect
    from if_verifiable.api import evaluate_output_for_sample
    from if_verifiable.types import IFEvalSample

    ensure_punkt()
    ids = item.extra["instruction_id_list"]
    sample = IFEvalSample(key=int(item.id), prompt=item.messages[-1]["content"], instruction_id_list=ids,
                          kwargs=item.extra["kwargs"])
    lang_seed = langdetect.DetectorFactory.seed
    try:
        random.seed(f"ifeval:{item.id}")
        langdetect.DetectorFactory.seed = 0
        results, scores = evaluate_output_for_sample("ifeval", sample, output)
    finally:
        random.setstate(state)
        langdetect.DetectorFactory.seed = lang_seed
    strict = [bool(r.strict_pass) for r in results] or [False] * len(ids)
    loose = [bool(r.loose_pass) for r in results] or [False] * len(ids)
    return {
        "prompt_strict": float(all(strict)),
        "prompt_loose": float(all(loose)),
        "inst_strict": sum(strict) / len(strict),
        "inst_loose": sum(loose) / len(loose),
        "n_inst": len(strict),
        "instructions": [{"id": r.instruction_id, "strict": r.strict_pass, "loose": r.loose_pass} for r in results],
    }


IFEVAL_METRICS = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")


@dataclass(frozen=True)
class PairedMetric:
    """One IFEval metric of two answer sets to the same prompts, in points, and the paired CI of a - b."""

    mean_a: float
    mean_b: float
    diff: Any  # eval.stats.Interval


def ifeval_paired(scores_a: list[dict], scores_b: list[dict], metrics: tuple[str, ...] = IFEVAL_METRICS,
                  names: tuple[str, str] = ("a", "b")) -> dict[str, PairedMetric]:
    """`score_ifeval` results of two answer sets, prompt by prompt, compared per metric: both means and the 95%
    bootstrap CI of a - b with items paired. Instruction-level metrics weight a prompt by its instruction count,
    as IFEval's own averages do; every engine and guard comparison goes through this one function."""
    from eval.stats import paired_bootstrap_diff

    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"ifeval_paired: {len(scores_a)} vs {len(scores_b)} scored answers; pass the same prompts")
    out = {}
    for metric in metrics:
        w = [float(s["n_inst"]) for s in scores_b] if metric.startswith("inst") else [1.0] * len(scores_b)
        xa, xb = ([100.0 * float(s[metric]) for s in scores] for scores in (scores_a, scores_b))
        ci = paired_bootstrap_diff(xa, xb, w, min_seeds_a=1, min_seeds_b=1, names=names)
        mean_a, mean_b = (sum(wi * v for wi, v in zip(w, x)) / sum(w) for x in (xa, xb))
        out[metric] = PairedMetric(mean_a, mean_b, ci)
    return out


# --- NLTK punkt_tab, built offline ----------------------------------------------------------

# Common English abbreviations Punkt should not split on (the trained set misses some, e.g. "p.m").
_EXTRA_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
                        "u.s", "u.k", "no", "fig", "inc", "ltd", "co", "approx", "dept", "est", "min", "max"}


def punkt_dir() -> Path:
    return paths.cache_dir() / "nltk_data"


def ensure_punkt() -> Path:
    """Provide NLTK's `punkt_tab/english` offline: Punkt trained on local English text (Alpaca outputs).

    IFEval's sentence-count checks call NLTK's Punkt tokenizer, whose data cannot be downloaded here.
    This is a deviation from official IFEval (which uses NLTK's shipped English model): the parameters
    are learned from ../shared/data/alpaca plus a list of common abbreviations.
    """
    import nltk

    root = punkt_dir()
    lang = root / "tokenizers" / "punkt_tab" / "english"
    if not (lang / "ortho_context.tab").is_file():
        from nltk.tokenize.punkt import PunktTrainer, TabEncoder

        from tomelab.io import write_text

        src = paths.shared_data_dir() / "alpaca" / "alpaca_5000.json"
        if not src.is_file():
            raise DataError(f"cannot build the offline Punkt model: {src} is missing (needs ../shared/data).")
        text = "\n\n".join(r["output"] for r in json.loads(src.read_text(encoding="utf-8")) if r.get("output"))
        trainer = PunktTrainer()
        trainer.train(text, finalize=True)
        params = trainer.get_params()
        params.abbrev_types |= _EXTRA_ABBREVIATIONS
        enc = TabEncoder()
        write_text(lang / "collocations.tab", enc.tups2tab(params.collocations))
        write_text(lang / "sent_starters.txt", enc.set2txt(params.sent_starters))
        write_text(lang / "abbrev_types.txt", enc.set2txt(params.abbrev_types))
        write_text(lang / "ortho_context.tab", enc.ivdict2tab(params.ortho_context))  # written last: marks done
        log.info("built offline NLTK punkt_tab/english at %s", lang)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
