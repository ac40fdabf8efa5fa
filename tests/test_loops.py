"""Loop extrapolation (tomelab/engines/loops.py): where a rule catches a token cycle, against a brute-force
reading of the rule, and what the written-out answer is."""

from __future__ import annotations

import random

import pytest

from tomelab.engines.loops import LoopRule, LoopWatch, first_loop


def _periodic_tail(seq: list[int], p: int) -> int:
    """Length of the longest suffix of `seq` with period p (brute force)."""
    n, k = len(seq), 0
    while k < n - p and seq[n - 1 - k] == seq[n - 1 - k - p]:
        k += 1
    return k + p if n >= p else 0


def _brute_first_loop(seq: list[int], rule: LoopRule) -> tuple[int, int] | None:
    """(tokens read, period) where the rule first holds, reading the rule's definition literally."""
    for n in range(1, len(seq) + 1):
        for p in range(1, min(rule.max_period, n - 1) + 1):
            span = _periodic_tail(seq[:n], p)
            if span >= rule.min_repeats * p and span >= rule.min_tokens:
                return n, p
    return None


def test_a_planted_cycle_is_caught_once_repeated_enough_and_written_out_exactly():
    prefix = list(range(100, 140))
    cycle = [1, 2, 3, 4, 5, 6, 7]
    full = (prefix + cycle * 100)[:200]
    w = first_loop(full, LoopRule(min_repeats=4, min_tokens=16))
    assert w.period == 7 and w.loop_from == len(prefix) + 4 * 7  # the fourth repeat completes the rule
    assert w.complete(200) == full
    assert w.tokens == full[: w.loop_from]  # nothing past the stop was read


def test_min_tokens_and_repeats_both_have_to_hold():
    seq = [9, 8] + [5] * 40
    assert first_loop(seq, LoopRule(min_repeats=2, min_tokens=30)).loop_from == 2 + 30  # a 1-token cycle needs 30 tokens
    assert first_loop(seq, LoopRule(min_repeats=50, min_tokens=2)).period is None  # 40 repeats < 50


def test_text_without_a_cycle_is_never_stopped_and_kept_as_decoded():
    seq = list(range(300))
    w = first_loop(seq, LoopRule(min_repeats=2, min_tokens=1))
    assert w.period is None and w.complete(512) == seq


def test_the_shortest_period_is_the_cycle():
    seq = [7] + [1, 2] * 40
    w = first_loop(seq, LoopRule(min_repeats=3, min_tokens=8))
    assert w.period == 2 and w.complete(100) == (seq * 2)[:1] + ([1, 2] * 60)[:99]


@pytest.mark.parametrize("seed", range(6))
def test_the_running_counts_agree_with_the_rule_read_literally(seed: int):
    """Small alphabets make accidental repeats of every length; the watch must stop exactly where the brute
    force does, with the same period."""
    rng = random.Random(seed)
    rule = LoopRule(min_repeats=rng.choice([2, 3, 4]), min_tokens=rng.choice([4, 8, 12]), max_period=rng.choice([5, 17]))
    for _ in range(40):
        seq = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5:  # plant a loop
            cyc = [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
            seq += cyc * rng.randrange(1, 10)
        w = first_loop(seq, rule)
        expected = _brute_first_loop(seq, rule)
        assert ((w.loop_from, w.period) if w.period else None) == expected, (seq, rule)


def test_a_watch_grows_past_its_capacity_and_rejects_bad_rules():
    w = LoopWatch(LoopRule(min_repeats=2, min_tokens=2), capacity=4)
    for t in range(40):
        assert not w.push(t)
    assert w.tokens == list(range(40))
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        LoopRule(min_repeats=1)


def test_loop_rule_script_counts_changed_answers_verdicts_and_saved_tokens():
    """scripts/loop_rule.py's replay: a loop that goes on to the limit is written out unchanged; one the model
    breaks out of (or ends with its turn) is a changed answer; every stop saves its undecoded tokens."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("loop_rule", Path(__file__).parent.parent / "scripts" / "loop_rule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    limit, cyc = 60, [1, 2, 3]
    answers = {
        "stays": ([9] + cyc * 30)[:limit],  # caught at 1 + 12 tokens, decodes on in its cycle to the limit
        "breaks": ([9] + cyc * 6 + [7] * 60)[:limit],  # leaves the cycle: changed
        "ends": [9] + cyc * 6,  # ends its turn inside the loop: changed
        "plain": list(range(100, 150)),
    }
    seen = []
    r = mod._replay(answers, limit, LoopRule(min_repeats=4, min_tokens=12),
                    lambda pid, ids: seen.append((pid, len(ids))) or pid == "breaks")
    assert r == {"stops": 3, "changed": 2, "verdicts_changed": 1, "saved_tokens": 3 * (limit - 13),
                 "saved_frac": 3 * (limit - 13) / sum(map(len, answers.values()))}
    assert seen == [("breaks", limit), ("ends", limit)]  # only changed answers are re-scored, written out in full
    assert mod._upper95(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100))
