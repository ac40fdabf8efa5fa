"""Training data: canonical rows -> token ids with an assistant-only loss mask -> a fixed batch plan.

The loss mask is computed from the model's own chat template by rendering the conversation turn
by turn: the characters an assistant turn adds after the generation prompt (its content and the
end-of-turn token, not the trailing newline) are the trained positions. This works for any
template whose renderings of prefixes are prefixes of the whole (ChatML, Gemma turns, ...).

The batch plan (which rows, in which order, grouped into which steps) depends only on the seed,
the data and the config, so two runs with the same seed see the same batches and a resumed run
can skip exactly the steps it has done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tomelab.artifacts import Variant
from tomelab.errors import DataError, TomelabError
from tomelab.schema import validate_messages
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)


@dataclass
class Example:
    id: str
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is an assistant token to predict

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss(self) -> int:
        return sum(self.loss_mask[1:])  # position 0 is never predicted


def variant_paths(variant: str) -> tuple[Path, Path]:
    """(train.parquet, val.parquet) for a curated variant, with a clear error when missing."""
    v = Variant(variant)
    train = v.train
    if not train.is_file():
        raise TomelabError(
            f"variant {variant!r} was never curated: {train} does not exist. "
            f"Run `tomelab curate configs/variants/{variant}.toml` first."
        )
    stats_path = v.stats_path
    if not stats_path.is_file():
        raise TomelabError(f"{stats_path} is missing, so the held-out split of {variant!r} is unknown. Re-run `tomelab curate` for it.")
    hdir = v.heldout_dir()  # paths relative to the artefact home allowed
    if hdir is None:
        raise TomelabError(f"{stats_path}: field `heldout_dir` is missing or empty. Re-run `tomelab curate` for {variant!r}.")
    val = hdir / "val.parquet"
    if not val.is_file():
        raise TomelabError(f"validation slice {val} (from {stats_path} `heldout_dir`) does not exist. Re-run `tomelab curate` for {variant!r}.")
    return train, val


def fingerprint(*files: Path) -> str:
    """Content hash of the input files: a re-curated variant is a different run."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_conversations(path: Path, limit: int | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(id, messages) per row, checking the canonical schema and naming the bad row and field."""
    table = pq.read_table(path)
    for col in ("id", "messages"):
        if col not in table.column_names:
            raise DataError(f"{path}: column `{col}` is missing (has {table.column_names}). Write it in the canonical schema (tomelab/schema.py).")
    ids = table.column("id").to_pylist()
    msgs = table.column("messages").to_pylist()
    rows = []
    for i, (rid, m) in enumerate(zip(ids, msgs)):
        if not isinstance(m, list) or any(not isinstance(t, dict) or "role" not in t or "content" not in t for t in m):
            raise DataError(f"{path}: row {i} (id {rid}): field `messages` must be a list of {{role, content}}. Fix or drop this row in curation.")
        bad = validate_messages(m)
        if bad:
            raise DataError(f"{path}: row {i} (id {rid}): field `messages` is unusable ({bad[0]}: {bad[1]}). Fix or drop this row in curation.")
        rows.append((str(rid), m))
    if limit is not None:
        rows = sorted(rows, key=lambda r: r[0])[:limit]  # fixed slice: does not depend on file order
    return rows


def _render(tok: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_char_spans(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (content + end-of-turn)."""
    text = _render(tok, messages, False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tok, messages[:k], True)
        end_text = _render(tok, messages[: k + 1], False)
        if not text.startswith(start_text) or not text.startswith(end_text):
            raise TomelabError(
                "the chat template does not render conversations prefix by prefix, so assistant tokens "
                "cannot be located. Use a template where each turn only appends text (ChatML, Gemma turns)."
            )
        end = len(end_text.rstrip())  # keep the end-of-turn token, drop the newline after it
        spans.append((len(start_text), max(end, len(start_text))))
    return text, spans


def tokenize_conversation(tok: Any, rid: str, messages: list[dict[str, str]]) -> Example:
    """Token ids and the assistant loss mask for one conversation (full length, not truncated)."""
    text, spans = assistant_char_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for a, _ in enc["offset_mapping"]:
        mask.append(any(s <= a < e for s, e in spans))  # trained if it starts inside an assistant span
    return Example(rid, list(enc["input_ids"]), mask)


def tokenize_rows(tok: Any, rows: list[tuple[str, list[dict[str, str]]]], max_length: int, stage: str) -> tuple[list[Example], StageStats]:
    """Tokenise and truncate; rows with no answer token left after truncation are dropped (counted)."""
    from tqdm import tqdm

    stats = StageStats(stage=stage, rows_in=len(rows))
    out: list[Example] = []
    reasons: dict[str, int] = {}
    truncated = 0
    with Timer() as t:
        for rid, m in tqdm(rows, desc=f"tokenise {stage}", unit="row", leave=False, mininterval=2):
            ex = tokenize_conversation(tok, rid, m)
            if ex.n_tokens > max_length:
                truncated += 1
                ex = Example(ex.id, ex.input_ids[:max_length], ex.loss_mask[:max_length])
            if ex.n_loss == 0:
                reasons["no_answer_within_max_length"] = reasons.get("no_answer_within_max_length", 0) + 1
                continue
            out.append(ex)
    stats.kept = len(out)
    stats.dropped = reasons
    stats.seconds = round(t.seconds, 2)
    stats.extra = {
        "truncated": truncated,
        "tokens": sum(e.n_tokens for e in out),
        "loss_tokens": sum(e.n_loss for e in out),
    }
    return out, stats.check()


def plan_batches(examples: list[Example], *, seed: int, batch_size: int, grad_accum: int, token_budget: int,
                 epochs_cap: float, packing: str, source: str = "the variant",
                 micro_batch_tokens: int = 0, budget_unit: str = "tokens") -> list[list[list[int]]]:
    """Optimiser steps, each a list of micro-batches of example indices, until `token_budget` tokens
    (all tokens, or with budget_unit="answer_tokens" only the trained answer tokens).

    Each epoch is a fresh seeded shuffle; with packing="bucket", rows are sorted by length within
    windows of 50 micro-batches so a micro-batch pads little, and the micro-batches are shuffled again.
    `micro_batch_tokens` > 0 then splits any micro-batch over that padded size (see `cap_micro_batch`).
    """
    if not examples:
        raise TomelabError(f"{source} has no usable training rows.")
    answer = budget_unit == "answer_tokens"
    counted = [e.n_loss if answer else e.n_tokens for e in examples]
    tokens_per_epoch = sum(counted)
    if tokens_per_epoch * epochs_cap < token_budget:
        need = math.ceil(token_budget / tokens_per_epoch * 100) / 100
        raise TomelabError(
            f"token_budget {token_budget:,} is larger than {source} allows: it has {tokens_per_epoch:,} "
            f"{'answer tokens' if answer else 'tokens'} "
            f"per epoch ({len(examples)} rows), x epochs_cap {epochs_cap} = {int(tokens_per_epoch * epochs_cap):,}. "
            f"Lower token_budget to at most {int(tokens_per_epoch * epochs_cap):,} or raise epochs_cap to {need}."
        )
    rng = np.random.default_rng(seed)
    lengths = np.array([e.n_tokens for e in examples])
    counts = np.array(counted)
    steps: list[list[list[int]]] = []
    current: list[list[int]] = []
    seen = 0
    epoch = 0
    while seen < token_budget:
        if epoch >= math.ceil(epochs_cap):
            break
        order = rng.permutation(len(examples))
        if packing == "bucket":
            window = batch_size * 50
            parts = []
            for i in range(0, len(order), window):
                chunk = order[i : i + window]
                parts.append(chunk[np.argsort(lengths[chunk], kind="stable")])
            order = np.concatenate(parts)
            micro = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
            micro = [micro[i] for i in rng.permutation(len(micro))]
        else:
            micro = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        for mb in micro:
            current.append(mb)
            seen += int(counts[mb].sum())
            if len(current) == grad_accum:
                steps.append(current)
                current = []
            if seen >= token_budget:
                break
        epoch += 1
    if current:
        steps.append(current)
    if micro_batch_tokens:
        lengths_list = lengths.tolist()
        steps = [[part for mb in step for part in cap_micro_batch(mb, lengths_list, micro_batch_tokens)] for step in steps]
    return steps


def cap_micro_batch(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split one micro-batch so that rows x longest row <= `max_tokens` in each part (one row at least).

    Activation memory grows with the padded size of the largest micro-batch, so a cap in tokens bounds
    the peak while short rows still go through in wide batches. The optimiser step keeps the same rows
    and the same loss normalisation: only the memory peak and the summation order change.
    """
    parts: list[list[int]] = []
    for r in sorted(rows, key=lambda i: -lengths[i]):
        if parts and (len(parts[-1]) + 1) * lengths[parts[-1][0]] <= max_tokens:
            parts[-1].append(r)
        else:
            parts.append([r])
    return parts


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, and targets (-100 where no loss)."""
    import torch

    n = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    targets = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, : e.n_tokens] = t
        att[i, : e.n_tokens] = 1
        m = torch.tensor(e.loss_mask, dtype=torch.bool)
        targets[i, : e.n_tokens] = torch.where(m, t, torch.full_like(t, -100))
    return {"input_ids": ids, "attention_mask": att, "targets": targets, "n_tokens": int(att.sum())}


def plan_digest(steps: list[list[list[int]]]) -> str:
    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]
