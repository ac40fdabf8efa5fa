import re
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


# ------------------------------------------------------------------------------- issue 16


def test_non_utf8_toml_is_a_config_error_naming_the_line(tmp_path):
    from tomelab.config import read_toml

    p = tmp_path / "c.toml"
    p.write_bytes(b'name = "x"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"c\.toml: line 2: byte 0xe9 is not UTF-8"):
        read_toml(p)


def test_safe_names():
    from tomelab.config import safe_name_problem

    for ok in ("random", "dedup-filter-ifd", "v1.2_b", "_base"):
        assert safe_name_problem(ok) is None
    for bad in ("../../x", "/tmp/abs", ".hidden", "a..b", "a/b", "sp ace", "", "é", None):
        assert safe_name_problem(bad), bad


@pytest.mark.parametrize("table,body,match", [
    ("minhash", "ngram = 0", "`ngram` must be >= 1"),
    ("minhash", "num_perm = -1", "`num_perm` must be >= 1"),
    ("minhash", "threshold = 7.5", r"`threshold` must be in \(0, 1\]"),
    ("semantic_dedup", "threshold = -1.0", r"`threshold` must be in \(0, 1\]"),
    ("semantic_dedup", "k = 0", "`k` must be >= 1"),
    ("decontam", "ngram = 0", "`ngram` must be >= 1"),
    ("decontam", "embed_threshold = 1.5", r"`embed_threshold` must be in \(0, 1\]"),
    ("quality", "batch_size = 0", "`batch_size` must be >= 1"),
    ("quality", "candidates_factor = -1.0", "`candidates_factor` must be a finite number > 0"),
    ("quality", "max_ifd = inf", "`max_ifd` must be a finite number > 0"),
    ("filters", "max_dup_line_ratio = 0.0", r"`max_dup_line_ratio` must be in \(0, 1\]"),
    ("filters", "min_prompt_tokens = -1", "`min_prompt_tokens` must be >= 0"),
    ("heldout", "seed = -1", "`seed` must be >= 0"),
])
def test_recipe_stage_settings_are_range_checked(tmp_path, table, body, match):
    from curation.recipe import load_recipe

    p = tmp_path / "r.toml"
    p.write_text(f'budget_rows = 5\n[[sources]]\nname = "a"\nkind = "alpaca"\n[{table}]\n{body}\n')
    with pytest.raises(ConfigError, match=rf"r\.toml: {table}: {match}"):
        load_recipe(p)


def test_recipe_name_and_seed_are_checked(tmp_path):
    from curation.recipe import load_recipe

    src = '[[sources]]\nname = "a"\nkind = "alpaca"\n'
    p = tmp_path / "r.toml"
    for top, match in (('name = "../../x"', "`name` '../../x' may use only"), ('name = "/tmp/abs"', "may use only"),
                       ("seed = -1", "`seed` must be >= 0")):
        p.write_text(f"{top}\nbudget_rows = 5\n{src}")
        with pytest.raises(ConfigError, match=rf"r\.toml: Recipe: .*{re.escape(match)}"):
            load_recipe(p)
    bad_file = tmp_path / "bad name.toml"  # the name defaults to the file name
    bad_file.write_text(f"budget_rows = 5\n{src}")
    with pytest.raises(ConfigError, match="may use only"):
        load_recipe(bad_file)


def test_atomic_writes_honour_the_umask(tmp_path):
    import os

    from tomelab.io import write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        os.umask(0o022)
        write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644


def test_save_figure_is_atomic_and_keeps_the_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tomelab.io import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "plots" / "f.png")
    plt.close(fig)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]  # no temp file left behind


def test_read_parquet_or_none(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tomelab.io import read_parquet_or_none

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": list(range(100))}), p)
    assert read_parquet_or_none(p).num_rows == 100
    assert read_parquet_or_none(p, as_polars=True)["a"].sum() == 4950
    p.write_bytes(p.read_bytes()[:50])  # truncated
    assert read_parquet_or_none(p) is None
    assert read_parquet_or_none(tmp_path / "missing.parquet") is None
