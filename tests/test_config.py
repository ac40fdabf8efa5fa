from dataclasses import dataclass, field
from typing import Literal

import pytest

from tomelab.config import config_hash, from_dict, load_config
from tomelab.errors import ConfigError


@dataclass
class Inner:
    rank: int = 16
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    lr: float = 1e-4
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    limit: int | None = None


def test_loads_nested_and_converts_ints_to_float(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nlr = 1\ntags = ["a"]\n[inner]\nrank = 8\nkind = "b"\n')
    cfg = load_config(p, Outer)
    assert cfg == Outer(name="x", lr=1.0, tags=["a"], inner=Inner(rank=8, kind="b"))
    assert isinstance(cfg.lr, float)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n[inner]\nrnak = 8\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, Outer)
    msg = str(e.value)
    assert str(p) in msg and "inner.rnak" in msg and "inner.rank" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"`lr` must be a number"):
        load_config(p, Outer)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="rank"):
        from_dict(Outer, {"name": "x", "inner": {"rank": True}})


def test_literal_and_optional():
    with pytest.raises(ConfigError, match="one of 'a', 'b'"):
        from_dict(Outer, {"name": "x", "inner": {"kind": "c"}})
    assert from_dict(Outer, {"name": "x", "limit": 5}).limit == 5


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key `name`"):
        from_dict(Outer, {}, file="f.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", Outer)


def test_bad_toml_syntax(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p, Outer)


def test_config_hash_is_stable_and_sensitive():
    a, b = Outer(name="x"), Outer(name="x")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(Outer(name="x", lr=2e-4))
