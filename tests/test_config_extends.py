"""`extends` works for every config kind, so a config states only what differs from the one it extends."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from eval.config import AblationConfig, EvalConfig
from tomelab.config import from_dict, load_config
from tomelab.errors import ConfigError
from training.config import TrainConfig


def test_named_train_configs_resolve_to_the_full_recipe():
    small = load_config("configs/train/small.toml", TrainConfig)
    assert (small.token_budget, small.max_length, small.micro_batch_tokens, small.precision) == (3000, 256, 0, "fp32")
    default = from_dict(TrainConfig, tomllib.loads(Path("configs/train/default.toml").read_text()), file="default")
    assert small.lora_r == default.lora_r and small.lr_schedule == default.lr_schedule  # inherited, not copied


def test_every_kind_follows_extends_and_refuses_a_cycle(tmp_path: Path):
    (tmp_path / "base.toml").write_text("batch_size = 4\n[heldout]\nlimit = 10\nval = true\n")
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[heldout]\nlimit = 20\n')
    ev = load_config(tmp_path / "child.toml", EvalConfig)
    assert (ev.batch_size, ev.heldout.limit, ev.heldout.val) == (4, 20, True)  # tables merge key by key
    (tmp_path / "a.toml").write_text('extends = "b.toml"\nvariants = ["x"]\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml", AblationConfig)


def test_sweeps_state_only_their_arms():
    for p in Path("configs/sweeps").glob("*.toml"):
        text = p.read_text()
        assert "learning_rate = 1e-3\nmax_length = 256" not in text, f"{p} copies the small recipe's [train] block"
