"""Stats records: every stage reports rows in, kept, dropped by reason and seconds,
and checks that rows are conserved (in = kept + dropped)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageStats:
    stage: str
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def check(self) -> StageStats:
        """Fail loudly if the stage lost or invented rows."""
        if self.rows_in != self.kept + self.n_dropped:
            raise AssertionError(
                f"stage {self.stage!r} does not conserve rows: in={self.rows_in} "
                f"kept={self.kept} dropped={self.n_dropped} ({self.dropped})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["n_dropped"] = self.n_dropped
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def count_reasons(reasons: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(reasons).items()))
