"""Multi-process training (DDP through accelerate): the global batch, rank-0-only writes, resume, the launcher.

The end-to-end test launches `tomelab train --nproc 2` (torchrun, 2 gloo ranks on CPU, OMP_NUM_THREADS=1 each)
and compares its per-step curve with a 1-process run of the same recipe and data. Dropout is off and fp32 is
pinned: then the two differ only in float summation order (measured: equal to the 5 decimals the log keeps).
Every rank process records its own writes (a sitecustomize on PYTHONPATH), so a silent single process, or a
second rank writing into the run folder, fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tomelab.errors import TomelabError
from training.config import TrainConfig, load_train_config
from training.distributed import Dist, torchrun_command

REPO = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m-instruct"
LOSS_TOL = 1e-4  # absolute, on the logged train and validation losses (fp32, no dropout)

# Loaded by every Python process the launch starts (PYTHONPATH): it notes each write-like call under
# AUDIT_ROOT with the RANK torchrun gave the process ("-" for the CLI and the torchrun agent).
_AUDIT = '''
import builtins, io, os, shutil
_root, _out = os.environ.get("AUDIT_ROOT"), os.environ.get("AUDIT_OUT")
if _root and _out:
    _rank, _open = os.environ.get("RANK", "-"), builtins.open

    def _note(op, path):
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return
        if p.startswith(_root):
            with _open(os.path.join(_out, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{_rank}\\t{op}\\t{p}\\n")

    def _wrap(fn, op, arg=0):
        def inner(*a, **k):
            if len(a) > arg:
                _note(op, a[arg])
            return fn(*a, **k)
        return inner

    def _open_w(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            _note("open", file)
        return _open(file, mode, *a, **k)

    builtins.open = io.open = _open_w
    os.replace, os.rename = _wrap(os.replace, "replace", 1), _wrap(os.rename, "rename", 1)
    os.mkdir, os.unlink, os.remove = _wrap(os.mkdir, "mkdir"), _wrap(os.unlink, "unlink"), _wrap(os.remove, "remove")
    shutil.rmtree = _wrap(shutil.rmtree, "rmtree")
    with _open(os.path.join(_out, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{_rank}\\tstart\\t{os.environ.get('WORLD_SIZE', '-')}\\n")
'''


def tiny_ddp_config(path: Path) -> tuple[Path, TrainConfig]:
    """A TOML (for the launched ranks) and its config (for the in-process run): the shipped recipe shrunk to a few
    optimiser steps of 2 micro-batches x 2 rows, so each rank runs a no_sync pass and a synced one per step."""
    small = dict(token_budget=600, max_length=64, batch_size=2, grad_accum=2, eval_every=2, save_every=2, val_rows=4,
                 learning_rate=1e-3, warmup_ratio=0.0, lora_dropout=0.0, precision="fp32")
    text = (REPO / "configs" / "train" / "default.toml").read_text()
    text = "\n".join(line for line in text.splitlines() if line.split("=")[0].strip() not in small)
    path.write_text(text + "\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in small.items()))
    return path, load_train_config(path)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _assert_same_curve(one: list[dict], two: list[dict]) -> float:
    """Same steps, token counts and lr; losses and grad norms within tolerance. Returns the largest loss gap."""
    assert [(r["step"], r["tokens"], "val_loss" in r) for r in one] == [(r["step"], r["tokens"], "val_loss" in r) for r in two]
    gap = 0.0
    for a, b in zip(one, two):
        key = "val_loss" if "val_loss" in a else "loss"
        gap = max(gap, abs(a[key] - b[key]))
        assert a[key] == pytest.approx(b[key], abs=LOSS_TOL), (a, b)
        if key == "loss":
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-9) and a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-3)
    return gap


def _launch_2(tmp_home: Path, tmp_path: Path, variant: str, cfg_path: Path, tag: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """`tomelab train --nproc 2` with the write audit; returns the result and the audit lines [rank, op, path]."""
    site, out = tmp_path / f"site-{tag}", tmp_path / f"audit-{tag}"
    site.mkdir()
    out.mkdir()
    (site / "sitecustomize.py").write_text(_AUDIT)
    env = dict(os.environ, TOMELAB_HOME=str(tmp_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
               AUDIT_ROOT=str((tmp_home / "runs").resolve()), AUDIT_OUT=str(out))
    env.pop("MASTER_PORT", None)  # the launcher picks a free port
    cmd = [sys.executable, "-m", "tomelab.cli", "train", "--variant", variant, "--base", BASE, "--seed", "0",
           "--config", str(cfg_path), "--nproc", "2"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    audit = [line.split("\t") for f in sorted(out.iterdir()) for line in f.read_text().splitlines()]
    return r, audit


def _check_ranks(audit: list[list[str]], run_dir: Path) -> None:
    """Two rank processes started in a world of 2; every write under runs/ came from rank 0, and it wrote the run."""
    starts = sorted((rank, world) for rank, op, world in audit if op == "start" and rank != "-")
    assert starts == [("0", "2"), ("1", "2")], starts
    writes = [(rank, path) for rank, op, path in audit if op != "start"]
    assert {rank for rank, _ in writes} == {"0"}, writes  # not rank 1, nor the launcher
    assert any(path.startswith(str(run_dir.resolve())) for _, path in writes)  # the audit does see rank 0's writes


# ------------------------------------------------------------------------------- the plumbing, no processes


class _FakeAccelerator:
    def __init__(self, rank: int, world: int):
        self.num_processes, self.process_index = world, rank

    def no_sync(self, model):
        return _NoSync()


class _NoSync(contextlib.nullcontext):
    pass


def test_single_process_is_the_identity() -> None:
    d = Dist()
    assert (d.world_size, d.rank, d.is_main, d.accelerator) == (1, 0, True, None)
    micro = [[3, 1], [2]]
    assert [(rows, w) for rows, w, _ in d.shard(micro)] == [([3, 1], 1), ([2], 1)]
    assert d.sum(1.5, 7) == (1.5, 7) and d.eval_share(5)
    fn = object()
    assert d.wrap_loss(None, fn) is fn and d.on_main(lambda: "x") == "x"


def test_each_rank_takes_a_disjoint_share_and_syncs_once_per_step() -> None:
    micro = [[0, 1, 2, 3], [4, 5, 6]]
    shares = []
    for rank in (0, 1):
        parts = list(Dist(_FakeAccelerator(rank, 2)).shard(micro))
        assert [w for _, w, _ in parts] == [2, 2]  # loss x W against DDP's gradient average
        assert [isinstance(s, _NoSync) for _, _, s in parts] == [True, False]  # all-reduce on the last pass only
        shares.append([j for rows, _, _ in parts for j in rows])
    assert sorted(shares[0] + shares[1]) == list(range(7)) and not set(shares[0]) & set(shares[1])

    # a step too short for every rank: the rank without a row still joins the all-reduce, with a zero gradient
    (rows, w, s), = Dist(_FakeAccelerator(1, 2)).shard([[9]])
    assert (rows, w, isinstance(s, _NoSync)) == ([9], 0, False)
    assert [(r, w) for r, w, _ in Dist(_FakeAccelerator(0, 2)).shard([[9]])] == [([9], 2)]


def test_launcher_command_and_bad_launches_are_one_line_errors(monkeypatch, capsys) -> None:
    from tomelab.cli import main

    cmd = torchrun_command(2, ["train", "--variant", "v"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert int(cmd[cmd.index("--master-port") + 1]) > 0 and cmd[-4:] == ["tomelab.cli", "train", "--variant", "v"]
    monkeypatch.setenv("MASTER_PORT", "29633")
    assert "29633" in torchrun_command(2, [])

    assert main(["train", "--variant", "v", "--nproc", "0"]) == 2
    assert "--nproc must be" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--variant", "v", "--nproc", "2"]) == 2
    assert "drop --nproc" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TomelabError, match="WORLD_SIZE='two'"):
        Dist.current()


# ------------------------------------------------------------------------------- two real ranks


@pytest.mark.e2e
def test_two_processes_match_one_and_only_rank_0_writes(tmp_home: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    from training.fixtures import alpaca_variant
    from training.train import train_run

    cfg_path, cfg = tiny_ddp_config(tmp_path / "tiny.toml")
    for name in ("one", "two"):  # the same rows under two names: the same plan, two run folders
        alpaca_variant(name, 12, n_val=4)
    one = train_run("one", BASE, 0, cfg)

    r, audit = _launch_2(tmp_home, tmp_path, "two", cfg_path, "fresh")
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_home / "runs" / "two" / BASE / "0"
    assert str(two) in r.stdout and r.stdout.count("tok/s") == 1  # one summary line: rank 0's
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)  # recorded by rank 0 from accelerate's process group
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert c1["recipe"] == c2["recipe"] and c1["data"]["fingerprint"] == c2["data"]["fingerprint"]  # same run, other name
    assert m1["tokens_seen"] == m2["tokens_seen"]
    assert m1["steps"] == m2["steps"] >= 3
    gap = _assert_same_curve(_log(one), _log(two))
    assert m1["final_val_loss"] == pytest.approx(m2["final_val_loss"], abs=LOSS_TOL)
    print(f"largest |loss(1 process) - loss(2 processes)| over the curve: {gap:.2e}")
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "config.json", "loss.png", "metrics.json", "train_log.jsonl"]
    _check_ranks(audit, two)


@pytest.mark.slow  # a second 2-rank launch: minutes on the shared 2-core machine
@pytest.mark.e2e
def test_a_run_killed_in_one_process_resumes_under_ddp(tmp_home: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    """Checkpoint written by 1 process, resumed by 2 ranks that both read it: the curve of an uninterrupted run."""
    from conftest import Killed, kill_after
    from training.fixtures import alpaca_variant
    from training.train import train_run

    cfg_path, cfg = tiny_ddp_config(tmp_path / "tiny.toml")
    for name in ("one", "three"):
        alpaca_variant(name, 12, n_val=4)
    one = train_run("one", BASE, 0, cfg)
    with pytest.raises(Killed):
        train_run("three", BASE, 0, cfg, on_step=kill_after(2))  # checkpoint at step 2, then "killed"
    three = tmp_home / "runs" / "three" / BASE / "0"
    assert (three / "checkpoint.pt").is_file()

    r, audit = _launch_2(tmp_home, tmp_path, "three", cfg_path, "resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert json.loads((three / "metrics.json").read_text())["world_size"] == 2
    assert not (three / "checkpoint.pt").exists()
    _assert_same_curve(_log(one), _log(three))
    _check_ranks(audit, three)
