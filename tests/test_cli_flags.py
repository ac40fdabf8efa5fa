"""Flags generated from dataclass fields (`tomelab.cli_flags`): names, types, choices, booleans, help,
and "not given" leaving a config's own value alone."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from tomelab.cli_flags import add_dataclass_args, dataclass_overrides, option


@dataclass
class Knobs:
    n: int = option(200, "how many rows")
    strategy: Literal["random", "low-score"] = option("random", "which rows")
    engine: str = option("auto", "runtime", choices=("auto", "fast"))
    rate: float = option(0.5, "a share")
    share: bool = option(False, "make it public")
    workspace: str | None = option(None, "where (default: the first)")
    results_dir: str = option("", "a folder", flag="--results")
    tags: list[str] = option(default_factory=lambda: ["a"], help="labels")
    hidden: dict = option(default_factory=dict, cli=False)
    plain: int = 3  # no metadata: still a flag, help from `help_texts` or just the default
    zero: int = option(0, "a count")


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_dataclass_args(p, Knobs, **kw)
    return p


def test_types_choices_booleans_and_names() -> None:
    a = parser().parse_args(["--n", "7", "--strategy", "low-score", "--engine", "fast", "--rate", "0.25", "--share",
                             "--workspace", "w", "--results", "r/x", "--tags", "x", "y", "--plain", "4"])
    assert dataclass_overrides(a, Knobs) == {"n": 7, "strategy": "low-score", "engine": "fast", "rate": 0.25,
                                             "share": True, "workspace": "w", "results_dir": "r/x",
                                             "tags": ["x", "y"], "plain": 4}
    assert parser().parse_args(["--no-share"]).share is False
    for bad in (["--strategy", "nope"], ["--engine", "nope"], ["--n", "x"], ["--hidden", "{}"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parser().parse_args(bad)


def test_flags_not_given_keep_the_configs_values() -> None:
    a = parser().parse_args([])
    assert dataclass_overrides(a, Knobs) == {}
    cfg = Knobs(n=5, share=True)  # e.g. loaded from TOML
    assert dataclasses.replace(cfg, **dataclass_overrides(parser().parse_args(["--rate", "0.1"]), Knobs)) == \
        Knobs(n=5, share=True, rate=0.1)


def test_help_text_and_defaults_come_from_the_fields() -> None:
    text = parser(help_texts={"plain": "an unannotated knob"}).format_help()
    assert "how many rows (default 200)" in text and "--share, --no-share" in text
    assert "{random,low-score}" in text and "{auto,fast}" in text and "--results RESULTS" in text
    assert "where (default: the first)" in text and "an unannotated knob (default 3)" in text
    assert "a count (default 0)" in text and "make it public\n" in text  # 0 is shown, False is not
    assert "--hidden" not in text


def test_only_and_skip_and_unknown_fields() -> None:
    p = argparse.ArgumentParser()
    assert add_dataclass_args(p, Knobs, only=["n", "share", "hidden"], skip=["share"]) == ["n"]
    with pytest.raises(ValueError, match="no field"):
        add_dataclass_args(argparse.ArgumentParser(), Knobs, only=["nope"])


def test_review_flags_come_from_review_config(tmp_path) -> None:
    """`tomelab review` flags are generated from ReviewConfig: its Literal choices, and a TOML `[review]`
    table keeps the values no flag overrides."""
    from typing import get_args, get_type_hints

    from curation import review_cli
    from curation.review.config import ReviewConfig

    p = argparse.ArgumentParser(prog="tomelab", exit_on_error=False)
    review_cli.register(p.add_subparsers())
    conf = tmp_path / "review.toml"
    conf.write_text("[review]\nn = 9\nseed = 4\n")
    a = p.parse_args(["review", "push", "--variant", "v", "--config", str(conf), "--strategy", "low-score",
                      "--embed-model", "minilm", "--seed", "3"])
    cfg = review_cli._config(a)
    assert (cfg.n, cfg.seed, cfg.strategy, cfg.embed_model) == (9, 3, "low-score", "minilm")
    a = p.parse_args(["review", "apply", "--variant", "v", "--extend-k", "5", "--holdout-share", "0.3"])
    assert (review_cli._config(a).extend_k, review_cli._config(a).holdout_share) == (5, 0.3)
    strategies = get_args(get_type_hints(ReviewConfig)["strategy"])
    for s in strategies:
        assert p.parse_args(["review", "push", "--variant", "v", "--strategy", s]).strategy == s
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        p.parse_args(["review", "push", "--variant", "v", "--strategy", "nope"])
