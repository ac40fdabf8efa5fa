"""Loop extrapolation: stop decoding a greedy answer once it is caught in an exact token cycle, and write
the rest of the cycle out to the token limit instead of decoding it.

Why: most of a small model's greedy evaluation time is spent decoding loops. SmolLM2-135M-Instruct's full
IFEval (540 prompts, 512 new tokens, CTranslate2 int8) ran 326 answers into the limit, and those answers
held most of the decoded tokens, the same sentence over and over. Once the last tokens repeat one cycle
`min_repeats` times, greedy decoding usually goes on repeating it, and then the written-out answer is the
one full decoding writes. Not always: loops drift, and a model can leave its cycle later, so a rule is an
approximation whose cost `scripts/loop_rule.py` measures (chosen on validation prompts as the rule saving the
most tokens with no IFEval verdict changed, reported on test prompts, checked against full runs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopRule:
    """An answer loops once its last tokens are one cycle of period <= `max_period` repeated `min_repeats`
    times in a row, spanning at least `min_tokens` tokens."""

    min_repeats: int = 4
    min_tokens: int = 64
    max_period: int = 256

    def __post_init__(self) -> None:
        if self.min_repeats < 2 or self.min_tokens < 1 or self.max_period < 1:
            raise ValueError("a loop rule needs min_repeats >= 2, min_tokens >= 1 and max_period >= 1")


class LoopWatch:
    """One answer's tokens as they are decoded: `push(token)` says whether the answer now loops (by its rule),
    and `complete(limit)` writes the cycle out to `limit` tokens.

    Keeps, for every period p, how many trailing tokens equal the token p before them (`runs[p]`); a run of
    k such tokens means the last k + p tokens are periodic with period p. O(max_period) work per token."""

    def __init__(self, rule: LoopRule, capacity: int = 512):
        import numpy as np  # here, not at import: `tomelab --help` loads this module through the eval config

        self._np = np
        self.rule = rule
        self._tokens = np.zeros(max(16, capacity), dtype=np.int64)
        self.n = 0
        self._runs = np.zeros(rule.max_period + 1, dtype=np.int64)  # index p; runs[0] unused
        self._periods = np.arange(rule.max_period + 1, dtype=np.int64)
        self.period: int | None = None  # set once the answer loops
        self.loop_from: int | None = None  # tokens decoded when it was caught

    @property
    def tokens(self) -> list[int]:
        return self._tokens[: self.n].tolist()

    def push(self, token: int) -> bool:
        if self.period is not None:
            return True
        n = self.n
        if n == len(self._tokens):
            self._tokens = self._np.concatenate([self._tokens, self._np.zeros_like(self._tokens)])
        self._tokens[n] = token
        self.n = n + 1
        top = min(self.rule.max_period, n)
        if top == 0:
            return False
        # hits[p-1]: token == the token p before it, for p = 1..top
        hits = self._tokens[n - top : n][::-1] == token
        runs = self._runs[1 : top + 1]
        self._np.multiply(runs + 1, hits, out=runs)
        p = self._periods[1 : top + 1]
        span = runs + p  # the periodic tail's length
        ok = (span >= self.rule.min_repeats * p) & (span >= self.rule.min_tokens)
        if ok.any():
            self.period = int(self._np.argmax(ok)) + 1  # the shortest period: the cycle itself, not a multiple of it
            self.loop_from = self.n
            return True
        return False

    def complete(self, limit: int) -> list[int]:
        """The answer's tokens with its cycle repeated up to `limit` tokens (as decoded when it does not loop)."""
        out = self.tokens
        if self.period is not None:
            while len(out) < limit:
                out.append(out[-self.period])
        return out


def first_loop(tokens: list[int], rule: LoopRule) -> LoopWatch:
    """Replay a finished answer through a watch: where the rule would have stopped decoding it, if anywhere
    (`scripts/loop_rule.py` checks a rule against fully decoded answers with this)."""
    watch = LoopWatch(rule, capacity=len(tokens) + 1)
    for t in tokens:
        if watch.push(t):
            break
    return watch
