"""The CLI: help for every subcommand, and user mistakes as one clear line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tomelab.cli import build_parser, main
from tomelab.errors import TomelabError
from tomelab.models import resolve_model

SUBCOMMANDS = ["models", "sources", "curate", "train", "export", "eval", "ablate", "review", "chat"]


def test_console_script_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "tomelab.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_help_imports_no_heavy_library():
    """Building the parser (all that `tomelab --help` does) loads no data or model library: each command
    imports those inside its handler (the review flags need only `curation.review.config`)."""
    code = ("import sys, tomelab.cli; tomelab.cli.build_parser(); "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "{'polars', 'pyarrow', 'numpy', 'torch', 'transformers', 'gradio', 'argilla'} "
            "or m.startswith('curation.review.') and m != 'curation.review.config'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert "usage: tomelab " + name in capsys.readouterr().out


def test_missing_config_is_one_clear_line(tmp_path, capsys):
    rc = main(["sources", str(tmp_path / "nope.toml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope.toml does not exist" in err and "Traceback" not in err


def test_bad_source_config_names_file_and_key(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text('[[sources]]\nname = "a"\nkind = "alpaca"\nlimt = 3\n')
    assert main(["sources", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "sources[0].limt" in err and "limit" in err


def test_unknown_model_lists_the_registry():
    with pytest.raises(TomelabError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_sources_command_writes_quarantine(tmp_home, tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text('[[sources]]\nname = "alpaca"\nkind = "alpaca"\n')
    assert main(["sources", str(p)]) == 0
    out = capsys.readouterr().out
    assert "4,998" in out  # 5,000 rows, 2 with an empty output quarantined
    q = (tmp_home / "sources" / "quarantine.jsonl").read_text().splitlines()
    assert len(q) == 2 and all('"empty_turn"' in line for line in q)
