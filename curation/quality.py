"""Model-based quality with the small base model itself: IFD and response NLL.

IFD (instruction-following difficulty, Cherry LLM / Superfiltering) compares how hard the answer
is for the model with and without the instruction:
- `nll`       = mean token loss of the answer given the instruction (chat template applied),
- `nll_alone` = mean token loss of the same answer tokens with no instruction,
- `ifd`       = exp(nll) / exp(nll_alone)  (ratio of perplexities, as in Cherry LLM's code) when
  ifd_kind = "ppl", or nll / nll_alone (ratio of losses) when ifd_kind = "loss".
IFD >= 1 means the instruction does not help predict the answer (Superfiltering drops those).
The instruction is everything before the last assistant turn; the answer is that turn.
Scores are cached per (model, lengths, row id) so re-runs and other variants reuse them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import QualityConfig
from curation.stage import Need, Stage
from tomelab import paths
from tomelab.config import config_hash
from tomelab.io import write_parquet
from tomelab.stats import Timer

log = logging.getLogger(__name__)

SCORE_SCHEMA = {"id": pl.String, "nll": pl.Float64, "nll_alone": pl.Float64}


class QualityScorer:
    """Computes (nll, nll_alone) per row in batches, with a parquet cache keyed by row id."""

    def __init__(self, cfg: QualityConfig, cache_dir: Path | None = None) -> None:
        self.cfg = cfg
        key = config_hash({"model": cfg.model, "p": cfg.max_prompt_tokens, "a": cfg.max_answer_tokens})
        self.cache_file = (cache_dir or paths.cache_dir()) / "quality" / f"{Path(cfg.model).name}-{key}.parquet"
        self._model = self._tok = None

    def _load(self) -> None:
        if self._model is None:
            from tomelab.models import load_model, load_tokenizer

            self._tok = load_tokenizer(self.cfg.model)
            self._model = load_model(self.cfg.model)
            self._model.eval()

    def cached(self) -> pl.DataFrame:
        if self.cache_file.exists():
            return pl.read_parquet(self.cache_file)
        return pl.DataFrame(schema=SCORE_SCHEMA)

    def _encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        """(instruction ids, answer ids, answer ids without instruction) under the chat template."""
        tok = self._tok
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        answer = messages[last]["content"]
        prefix = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"][-self.cfg.max_prompt_tokens:]
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"][: self.cfg.max_answer_tokens]
        # "without the instruction": the same answer tokens after only the assistant header
        bare = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=False)
        header = prefix[len(bare):] if prefix.startswith(bare) else ""
        header_ids = tok(header, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and header_ids[:1] != [tok.bos_token_id]:
            header_ids = [tok.bos_token_id] + header_ids
        return prefix_ids, answer_ids, header_ids

    def _losses(self, seqs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Mean answer-token loss for each (context, answer) pair.

        Left padding puts every answer at the end, so the model computes logits only for the last
        max(answer)+1 positions (`logits_to_keep`): the 49k-word output layer over the context
        would otherwise cost more than the model body.
        """
        import torch

        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        L = max(len(c) + len(a) for c, a in seqs)
        K = max(len(a) for _, a in seqs) + 1
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        labels = torch.full((len(seqs), K), -100, dtype=torch.long)
        for b, (c, a) in enumerate(seqs):
            full = c + a
            ids[b, L - len(full):] = torch.tensor(full)
            att[b, L - len(full):] = 1
            labels[b, K - 1 - len(a): K - 1] = torch.tensor(a)  # logit j predicts token L-K+j+1
        pos = (att.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self._model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=K).logits
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="none")
        n = (labels != -100).sum(1).clamp(min=1)
        return (loss.sum(1) / n).tolist()

    def score(self, ids: list[str], messages: list[list[dict]], *, progress: bool = True) -> pl.DataFrame:
        """nll / nll_alone for every id (cached ones are not recomputed); saves after each batch."""
        cache = self.cached()
        have = set(cache["id"].to_list())
        todo = [(i, m) for i, m in dict(zip(ids, messages)).items() if i not in have]
        if todo:
            self._load()
            from tqdm import tqdm

            new: list[dict] = []
            bs = self.cfg.batch_size
            # length-sorted batches: left padding to the longest row of a batch is wasted compute
            encoded = sorted(((i, self._encode(m)) for i, m in todo), key=lambda t: len(t[1][0]) + len(t[1][1]))
            bar = tqdm(total=len(todo), desc="IFD/NLL", unit="row", disable=not progress)
            for start in range(0, len(encoded), bs):
                chunk = encoded[start: start + bs]
                enc = [e for _, e in chunk]
                cond = self._losses([(p, a) for p, a, _ in enc])
                alone = self._losses([(h, a) for _, a, h in enc])
                new += [{"id": i, "nll": c, "nll_alone": a} for (i, _), c, a in zip(chunk, cond, alone)]
                bar.update(len(chunk))
                if len(new) >= 256 or start + bs >= len(encoded):  # checkpoint: a kill loses at most one chunk
                    cache = pl.concat([cache, pl.DataFrame(new, schema=SCORE_SCHEMA)])
                    write_parquet(self.cache_file, cache)
                    new = []
            bar.close()
        return cache.filter(pl.col("id").is_in(ids)).unique("id", keep="last")


def ifd_expr(kind: str) -> pl.Expr:
    if kind == "ppl":
        return (pl.col("nll") - pl.col("nll_alone")).exp()
    return pl.col("nll") / pl.col("nll_alone")


def select_by_quality(df: pl.DataFrame, cfg: QualityConfig, targets: dict[str, int], seed: int,
                      scorer: QualityScorer | None = None, *, progress: bool = True) -> StageResult:
    """Score a seeded sample of candidates (candidates_factor x each source's target) and keep the
    top `target` rows per source by `select_by`; rows never scored are dropped as `not_candidate`."""
    df = df.with_columns(pl.int_range(pl.len()).alias("_pos"))
    with Timer() as t:
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        rng = np.random.default_rng(seed)
        src = df["source"].to_list()
        cand_idx: list[int] = []
        for s, target in targets.items():
            pos = [i for i, x in enumerate(src) if x == s]
            n_cand = min(len(pos), max(target, int(math.ceil(target * cfg.candidates_factor))))
            chosen = set(rng.choice(len(pos), size=n_cand, replace=False).tolist()) if n_cand else set()
            for k, i in enumerate(pos):
                if k in chosen:
                    cand_idx.append(i)
                else:
                    reason[i], detail[i] = "not_candidate", f"outside the {n_cand} scored candidates of {s}"
        for i, s in enumerate(src):
            if s not in targets:
                reason[i], detail[i] = "not_in_mix", f"source {s} has no share in this variant"
        cand = df[sorted(cand_idx)]
        scores = pl.DataFrame(schema=SCORE_SCHEMA)
        if cfg.select_by != "score" and len(cand):
            scorer = scorer or QualityScorer(cfg)
            scores = scorer.score(cand["id"].to_list(), cand["messages"].to_list(), progress=progress)
        scored = cand.select("id", "source", "score", "_pos").join(scores, on="id", how="left").with_columns(
            ifd_expr(cfg.ifd_kind).alias("ifd"))
        for row in scored.iter_rows(named=True):
            i = row["_pos"]
            if cfg.select_by != "score" and row["ifd"] is not None and row["ifd"] >= cfg.max_ifd:
                reason[i], detail[i] = "ifd_too_high", f"IFD {row['ifd']:.3f} >= {cfg.max_ifd}: instruction does not help"
            elif cfg.min_score is not None and (row["score"] is None or row["score"] < cfg.min_score):
                reason[i], detail[i] = "low_score", f"source score {row['score']} < {cfg.min_score}"
        alive = scored.filter(pl.Series([reason[i] is None for i in scored["_pos"].to_list()]))
        for s, target in targets.items():
            part = alive.filter(pl.col("source") == s).sort(
                [cfg.select_by, "_pos"], descending=[cfg.select_by != "nll", False], nulls_last=True)
            for i in part["_pos"].to_list()[target:]:
                reason[i], detail[i] = "below_top_k", f"not in the top {target} of {s} by {cfg.select_by}"
    out = split_result(df.drop("_pos"), "quality", reason, detail, t.seconds,
                       extra={"model": cfg.model, "ifd_kind": cfg.ifd_kind, "select_by": cfg.select_by,
                              "scored": len(cand)})
    if cfg.select_by != "score":
        out.kept = out.kept.join(scores.with_columns(ifd_expr(cfg.ifd_kind).alias("ifd")), on="id", how="left",
                                 maintain_order="left")
    return out



class QualityStage(Stage):
    """Global: candidates are a seeded sample per source, then the top rows per source are kept.
    The IFD scorer is declared in `needs`; the runner loads it (once) only when this stage runs."""

    name = "quality"
    kind = "global"
    fix = "Raise [quality] max_ifd, or lower min_score."

    def __init__(self, cfg: QualityConfig, targets: dict[str, int], seed: int) -> None:
        super().__init__(cfg)
        self.targets, self.seed = targets, seed
        self.scorer = None

    def key(self):
        return (self.cfg, self.targets)

    def needs(self) -> dict[str, Need]:
        return {"scorer": Need("scorer", self.cfg)} if self.cfg.select_by != "score" else {}

    def setup(self, scorer=None, **_) -> None:
        self.scorer = scorer

    def run(self, frame: pl.DataFrame) -> StageResult:
        return select_by_quality(frame, self.cfg, self.targets, self.seed, scorer=self.scorer, progress=False)
