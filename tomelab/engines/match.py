"""The greedy-match check: does a candidate engine produce transformers fp32's greedy tokens?

`compare_greedy` runs the fixed `MATCH_PROMPTS` through both engines and counts prompts whose first
tokens agree, allowing a first difference at a numerical tie of the reference (`TIE_NATS`);
`match_report` runs it once per weights file and chat template and caches the verdict under the
artefact home's cache/engine_choice/. `tomelab.engines.choice` serves an unquantised fast engine
only when it passes (`MATCH_CRITERION`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tomelab import paths
from tomelab.engines.chat import DEFAULT_SYSTEM_PROMPT, ChatEngine, GenerationSettings, fit_prompt, render_messages
from tomelab.io import read_json, write_json

log = logging.getLogger(__name__)

# A fixed prompt set: the greedy-match check and the benchmark both use it.
MATCH_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the ocean.",
    "Explain what a neural network is in two sentences.",
    "List the first five prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
)



@dataclass
class MatchReport:
    """How a candidate engine's greedy outputs compare with the transformers fp32 reference."""

    prompts: int
    exact: int  # prompts whose first `n_tokens` greedy tokens are identical
    mean_prefix: float  # mean fraction matched before the first difference that is not a numerical tie
    n_tokens: int
    passed: bool
    criterion: str
    details: list[dict] = field(default_factory=list)
    ties: int = 0  # prompts that differ first at a near-tie of the reference (see TIE_NATS)


# A first difference where the reference model itself scores the two tokens within this many nats is a
# numerical tie: any other kernel (even fp32 with another summation order) may break it either way.
# Measured on SmolLM2-135M (README: Inference engines): llama.cpp f32 and f16 GGUFs of a fine-tune differ
# from transformers fp32 only at a 0.0014-nat tie; Q4_1 and q8_0 differ at 0.01-0.44 nats.
TIE_NATS = 0.005
MATCH_CRITERION = (f"greedy tokens equal to transformers fp32 on >= 7 of the 8 fixed prompts (first 32 tokens), up to "
                   f"numerical ties (reference log-prob gap < {TIE_NATS} nats at the first difference); mean prefix >= 0.95")


def greedy_ids(engine: ChatEngine, prompt: str, n_tokens: int) -> list[int]:
    """The first `n_tokens` greedy token ids (stop ids included) for one user prompt."""
    s = GenerationSettings(temperature=0.0, max_new_tokens=n_tokens, system_prompt=DEFAULT_SYSTEM_PROMPT)
    ids: list[int] = []
    with contextlib.closing(engine.backend.iter_tokens(_match_prompt_ids(engine, prompt), s, engine.stop_ids,
                                                       threading.Event())) as tokens:
        for t in tokens:
            ids.append(t)
            if t in engine.stop_ids or len(ids) >= n_tokens:
                break
    return ids


def _match_prompt_ids(engine: ChatEngine, prompt: str) -> list[int]:
    return fit_prompt(engine.tokenizer, render_messages([], prompt, DEFAULT_SYSTEM_PROMPT), engine.backend.context_length).ids


def tie_gap(reference: ChatEngine, prompt: str, prefix: list[int], ours: int, theirs: int) -> float | None:
    """log p(ours) - log p(theirs) under the reference model after `prefix` (None: the reference has no model)."""
    model = getattr(reference.backend, "model", None)
    if model is None:
        return None
    import torch

    ids = torch.tensor([_match_prompt_ids(reference, prompt) + prefix])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return float(logp[ours] - logp[theirs])


def compare_greedy(reference: ChatEngine, candidate: ChatEngine, *, prompts: Sequence[str] = MATCH_PROMPTS,
                   n_tokens: int = 32, reference_ids: dict[str, list[int]] | None = None,
                   tie_nats: float = TIE_NATS) -> MatchReport:
    """Greedy-output agreement of `candidate` with `reference` on a fixed prompt set.

    A prompt whose first difference is a near-tie of the reference (gap < `tie_nats`) counts as matched:
    past it both continue equally likely prefixes. `reference_ids` memoises the reference's answers."""
    exact, ties, fracs, details = 0, 0, [], []
    memo = reference_ids if reference_ids is not None else {}
    for p in prompts:
        if p not in memo:
            memo[p] = greedy_ids(reference, p, n_tokens)
        a, b = memo[p], greedy_ids(candidate, p, n_tokens)
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = tie_gap(reference, p, a[:same], a[same], b[same]) if same < min(len(a), len(b)) else None
        tie = gap is not None and gap < tie_nats
        frac = 1.0 if tie else same / max(1, len(a))
        exact += int(a == b)
        ties += int(tie)
        fracs.append(frac)
        details.append({"prompt": p, "exact": a == b, "prefix": round(same / max(1, len(a)), 3), "ref_len": len(a),
                        **({"first_diff_gap_nats": round(gap, 4), "tie": tie} if gap is not None else {})})
    mean_prefix = sum(fracs) / len(fracs)
    passed = exact + ties >= len(prompts) - 1 and mean_prefix >= 0.95
    return MatchReport(len(prompts), exact, round(mean_prefix, 4), n_tokens, passed, MATCH_CRITERION, details, ties)


def match_report(reference: ChatEngine, candidate: ChatEngine, reference_ids: dict[str, list[int]]) -> dict:
    """The greedy-match check of `candidate`, run once per weights file and chat template, then cached."""
    weights = Path(candidate.info["weights"])
    size = weights.stat().st_size if weights.is_file() else sum(p.stat().st_size for p in weights.glob("*"))
    key = hashlib.sha256(f"{weights.resolve()}|{size}|{reference.tokenizer.chat_template}|{MATCH_CRITERION}".encode()).hexdigest()[:10]
    choice_file = paths.cache_dir() / "engine_choice" / f"{candidate.engine_name}-{weights.stem}-{key}.json"
    if choice_file.is_file():
        return read_json(choice_file)
    log.info("checking %s on %s: greedy outputs against transformers fp32 (one-off)", candidate.engine_name, weights.name)
    report = dataclasses.asdict(compare_greedy(reference, candidate, reference_ids=reference_ids))
    write_json(choice_file, report)
    return report
