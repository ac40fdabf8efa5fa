"""`tomelab train` (one variant x base x seed) and `tomelab export RUN` (merged safetensors, optional GGUF)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="LoRA/QLoRA fine-tune one variant with one seed (resumes, skips finished runs)")
    p.add_argument("--variant", required=True, help="curated variant name (artifacts/variants/<name>/train.parquet)")
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model: registry name, hub id or folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, LoRA init and dropout (default: %(default)s)")
    p.add_argument("--config", default=None, help="train TOML (default: configs/train/default.toml)")
    p.add_argument("--force", action="store_true", help="retrain from scratch even if the run is finished")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (DDP through accelerate: one per GPU, or N CPU ranks "
                        "over gloo), re-launched through torchrun; the global batch stays the recipe's (default: %(default)s)")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="merge a run's adapter into full safetensors (optionally also GGUF)")
    p.add_argument("run", help="run dir artifacts/runs/<variant>/<base>/<seed> (or <variant>/<base>/<seed>)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/merged)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved weight dtype (default: %(default)s)")
    p.add_argument("--gguf", default=None, metavar="OUTTYPE", choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                   help="also write model-OUTTYPE.gguf (Llama models: written directly, no compiler; "
                        "others: llama.cpp's converter)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    import os

    from tomelab.io import read_json
    from training.config import load_train_config
    from training.train import METRICS, train_run

    cfg = load_train_config(args.config)
    if args.nproc != 1:
        return _launch(args)
    run_dir = train_run(args.variant, args.base, args.seed, cfg, force=args.force)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch, rank 0 reports for the group
        return 0
    m = read_json(run_dir / METRICS)
    print(
        f"{run_dir}: {m['steps']} steps, {m['tokens_seen']:,} tokens at {m['tok_s']} tok/s, "
        f"train loss {m['final_train_loss']}, val loss {m['final_val_loss']}, peak RSS {m['peak_rss_mb']:.0f} MB"
    )
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`--nproc N`: check what a user can get wrong once, here, then re-run this command as N torchrun ranks."""
    import os
    import subprocess

    from tomelab.errors import TomelabError
    from tomelab.models import resolve_model
    from training.data import variant_paths
    from training.distributed import env_world_size, torchrun_command

    if args.nproc < 1:
        raise TomelabError(f"--nproc must be a number of processes >= 1, got {args.nproc}.")
    if env_world_size() > 1:
        raise TomelabError(f"--nproc {args.nproc} inside a launched group (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                           "drop --nproc when torchrun or accelerate launch starts the ranks.")
    if args.seed < 0:
        raise TomelabError(f"--seed must be an integer >= 0, got {args.seed!r}.")
    variant_paths(args.variant)
    resolve_model(args.base)
    argv = (["-v"] if args.verbose else []) + ["train", "--variant", args.variant, "--base", args.base,
                                               "--seed", str(args.seed)]
    argv += (["--config", str(args.config)] if args.config else []) + (["--force"] if args.force else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))  # N ranks share the cores
    return subprocess.run(torchrun_command(args.nproc, argv), env=env, check=False).returncode


def _export(args: argparse.Namespace) -> int:
    from training.export import export_run

    out = export_run(args.run, out=args.out, dtype=args.dtype, gguf=args.gguf, force=args.force)
    print(out)
    return 0
