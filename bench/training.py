"""Training speed: the tomelab recipe vs TRL `SFTTrainer` defaults, same model, data and tokens, one run.

    .venv/bin/python bench/training.py                 # the head-to-head (TRL defaults vs tomelab)
    .venv/bin/python bench/training.py --levers        # also each speed lever alone, in the tomelab loop

Both sides train LoRA (same r, alpha, dropout, all-linear targets) for one epoch over the same
Alpaca rows from ../shared/data, with the recipe's learning rate and schedule, loss on the
answer only (TRL: a prompt-completion dataset, its default completion-only loss). Everything
else on the TRL side is SFTConfig's default (fp32 weights + bf16 autocast, gradient
checkpointing, padded batches, full-vocabulary logits at every position, no packing).
The tomelab side is `training.train.train_run` itself.

"final loss" is measured the same way for both finished models: the mean assistant-token
cross-entropy on a fixed held-out slice, computed by `training.loss.evaluate_loss`. Each side
runs in its own subprocess, so peak RSS (ru_maxrss) is its own. tok/s counts non-padding tokens
over the training loop's wall time (model loading and tokenisation excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANT = "bench-alpaca"


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _bench_config(args: argparse.Namespace, token_budget: int):
    """The default recipe with the bench's size knobs: one epoch over the rows, no mid-run eval/checkpoints."""
    from dataclasses import replace

    from training.config import load_train_config

    cfg = load_train_config(args.config)
    return replace(cfg, token_budget=token_budget, epochs_cap=1.0, max_length=args.max_length,
                   batch_size=args.batch_size, grad_accum=1, eval_every=0, save_every=0)


def _val_examples(base: str, max_length: int):
    from training.data import read_conversations, tokenize_rows, variant_paths
    from training.load import load_base_tokenizer

    tok = load_base_tokenizer(base)
    _, val = variant_paths(VARIANT)
    ex, _ = tokenize_rows(tok, read_conversations(val), max_length, "val")
    return tok, ex


def _val_loss(causal_lm, examples, pad_id: int, batch_size: int) -> float:
    from training.loss import AssistantLoss, evaluate_loss

    return evaluate_loss(AssistantLoss(causal_lm), causal_lm, examples, batch_size=batch_size, pad_id=pad_id,
                         device="cpu", bf16=False)  # fp32: both finished models are scored identically


# ------------------------------------------------------------------------------------------ workers


def worker_tomelab(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from tomelab.io import read_json
    from training.train import METRICS, train_run

    cfg = _bench_config(args, args.token_budget)
    if args.micro_batch and args.micro_batch < cfg.batch_size:  # same optimiser batch, fewer activations held at once
        cfg = replace(cfg, batch_size=args.micro_batch, grad_accum=cfg.batch_size // args.micro_batch)
    if args.micro_batch_tokens >= 0:
        cfg = replace(cfg, micro_batch_tokens=args.micro_batch_tokens)
    run_dir = train_run(VARIANT, args.base, args.seed, cfg, force=True)
    m = read_json(run_dir / METRICS)
    return {"name": "tomelab recipe", "tokens": m["tokens_seen"], "seconds": m["train_seconds"], "tok_s": m["tok_s"],
            "steps": m["steps"], "train_loss": m["final_train_loss"], "val_loss": m["final_val_loss"],
            "peak_rss_mb": _rss_mb(), "setup": f"{m['quantization']}/{m['base_dtype']}, threads {m['threads']}, "
                                                  f"micro-batch {cfg.batch_size} x accum {cfg.grad_accum}"
                                                  + (f", micro-batches capped at {cfg.micro_batch_tokens} padded tokens"
                                                     if cfg.micro_batch_tokens else "")}


def worker_trl(args: argparse.Namespace) -> dict:
    """TRL `SFTTrainer` with its defaults; `--trl-fp32` turns off only its bf16 autocast.

    On a CPU without native bf16 (AVX2 only, like this one) TRL's bf16 default runs torch's slow
    reference GEMM, so the literal defaults are a weak peer there; the fp32 run is the fair one.
    A run still going after `--trl-time-limit` seconds is stopped by a callback: its tok/s is then
    measured over the steps it finished (TRL's own non-padding token counter), and it is marked cut.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tomelab.models import load_model
    from training.data import read_conversations, variant_paths

    cfg = _bench_config(args, args.token_budget)
    tok, val_ex = _val_examples(args.base, cfg.max_length)
    train_path, _ = variant_paths(VARIANT)
    rows = read_conversations(train_path)
    ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for _, m in rows])
    torch.manual_seed(args.seed)
    model = load_model(args.base, dtype="float32")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")

    class TimeLimit(TrainerCallback):
        def __init__(self, limit: float) -> None:
            self.limit, self.t0, self.cut = limit, 0.0, False

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if self.limit and time.perf_counter() - self.t0 > self.limit and state.global_step < state.max_steps:
                self.cut, control.should_training_stop = True, True

    limit = TimeLimit(args.trl_time_limit)
    extra = {"bf16": False} if args.trl_fp32 else {}
    with tempfile.TemporaryDirectory() as out:
        sft = SFTConfig(output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio,
                        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, seed=args.seed,
                        report_to="none", save_strategy="no", disable_tqdm=True,
                        include_num_input_tokens_seen="non_padding",  # a counter only: measures, changes nothing
                        use_cpu=not torch.cuda.is_available(),  # required by transformers with TRL's bf16 default on CPU
                        **extra)
        trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=lora,
                             callbacks=[limit])
        epoch_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
        t0 = time.perf_counter()
        res = trainer.train()
        seconds = time.perf_counter() - t0
        tokens = int(trainer.state.num_input_tokens_seen) or epoch_tokens
        trained = trainer.model
    trained.eval()
    val = _val_loss(trained.get_base_model(), val_ex, tok.pad_token_id, cfg.batch_size)
    name = "TRL SFTTrainer defaults" + (", bf16=False" if args.trl_fp32 else "")
    setup = (f"fp32{' + bf16 autocast' if sft.bf16 else ''}, grad ckpt={sft.gradient_checkpointing}, "
             f"threads {torch.get_num_threads()}")
    if limit.cut:
        setup += f"; CUT at {args.trl_time_limit:.0f}s after {res.global_step} of {trainer.state.max_steps} steps"
    return {"name": name, "tokens": tokens, "seconds": round(seconds, 1), "tok_s": round(tokens / seconds, 1),
            "steps": res.global_step, "train_loss": round(res.training_loss, 5), "val_loss": round(val, 5),
            "peak_rss_mb": _rss_mb(), "setup": setup, "cut": limit.cut}


def worker_base(args: argparse.Namespace) -> dict:
    """Validation loss of the untouched base model: how far training moved each side."""
    from tomelab.models import load_model

    tok, val_ex = _val_examples(args.base, args.max_length)
    model = load_model(args.base, dtype="float32").eval()
    return {"name": "base model (no training)", "val_loss": round(_val_loss(model, val_ex, tok.pad_token_id, args.batch_size), 5)}


LEVERS = {
    # name: (description, settings that differ from the recipe)
    "recipe": ("tomelab loop as configured: resolved precision, assistant-only head, length buckets", {}),
    "full_head": ("lm_head + loss over every position (HF labels path)", {"head": "full"}),
    "no_bucket": ("random batches (no length bucketing)", {"packing": "none"}),
    "fp32": ("fp32 base weights, no autocast", {"dtype": "float32"}),
    "bf16": ("bf16 base weights + bf16 autocast", {"dtype": "bfloat16"}),
    "qlora_4bit": ("bitsandbytes nf4 + double quant base (QLoRA on CPU)", {"dtype": "4bit"}),
    "threads_1": ("torch.set_num_threads(1)", {"threads": 1}),
    "compile": ("torch.compile(decoder, dynamic=True)", {"compile": True}),
}


def worker_lever(args: argparse.Namespace) -> dict:
    """The tomelab step (same plan, loss, optimiser) with one setting changed; tok/s after 1 warm-up step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from training.data import collate, plan_batches, read_conversations, tokenize_rows, variant_paths
    from training.hardware import load_training_base
    from training.load import load_base_tokenizer
    from training.loss import AssistantLoss, autocast

    desc, s = LEVERS[args.lever]
    cfg = _bench_config(args, args.token_budget)
    if "threads" in s:
        torch.set_num_threads(s["threads"])
    tok = load_base_tokenizer(args.base)
    train_path, _ = variant_paths(VARIANT)
    ex, _ = tokenize_rows(tok, read_conversations(train_path), cfg.max_length, "train")
    steps = plan_batches(ex, seed=args.seed, batch_size=cfg.batch_size, grad_accum=1, token_budget=cfg.token_budget,
                         epochs_cap=1.0, packing=s.get("packing", cfg.packing))
    from training.train import resolve_hardware

    dtype = s.get("dtype", resolve_hardware(cfg)[2])
    torch.manual_seed(args.seed)
    if dtype in ("4bit", "nf4"):
        model = load_training_base(args.base, "4bit", "nf4", "cpu")
    else:
        model = load_training_base(args.base, "none", dtype, "cpu")
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    loss_fn = AssistantLoss(model.get_base_model())
    if s.get("compile"):
        loss_fn.decoder = torch.compile(loss_fn.decoder, dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    bf16_autocast = dtype != "float32"
    tokens, seconds, losses = 0, 0.0, []
    for i, (mb,) in enumerate(steps):
        batch = collate([ex[j] for j in mb], tok.pad_token_id)
        t0 = time.perf_counter()
        with autocast("cpu", bf16_autocast):
            if s.get("head") == "full":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["targets"])
                loss = out.loss
            else:
                total, n = loss_fn(batch, "cpu")
                loss = total / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i > 0:  # step 0 is warm-up (allocations, compilation)
            tokens += batch["n_tokens"]
            seconds += dt
            if args.lever_time_limit and seconds > args.lever_time_limit and i >= 2:
                break  # a slow setting (bf16 on AVX2) is timed on the steps it finished, not the whole epoch
    return {"name": args.lever, "what": desc, "tok_s": round(tokens / max(seconds, 1e-9), 1),
            "steps": f"{i + 1}/{len(steps)}", "mean_loss": round(sum(losses) / len(losses), 4), "peak_rss_mb": _rss_mb()}


# ------------------------------------------------------------------------------------------ driver


def _spawn(args: argparse.Namespace, home: Path, worker: str, extra: list[str] | None = None, timeout: int = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--rows", str(args.rows), "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--base", args.base,
           "--token-budget", str(args.token_budget)] + (["--config", args.config] if args.config else []) + (extra or [])
    env = dict(os.environ, TOMELAB_HOME=str(home))
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": " ".join([worker, *(extra or [])]), "error": f"timed out after {timeout}s"}
    if r.returncode != 0:
        return {"name": " ".join([worker, *(extra or [])]), "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {res['name']}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return res


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s, carrying every run's tok/s (and the largest peak RSS) with it."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tok_s"])
    if not ok:
        return runs[0]
    med = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        med["tok_s_runs"] = [r.get("tok_s") for r in runs]
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return med


def _prepare(args: argparse.Namespace, home: Path) -> int:
    """Build the bench variant in `home` (models shared) and return its tokens per epoch."""
    os.environ["TOMELAB_HOME"] = str(home)
    from tomelab import paths
    from tomelab.models import resolve_model
    from training.data import read_conversations, tokenize_rows, variant_paths
    from training.fixtures import alpaca_rows, write_variant
    from training.load import load_base_tokenizer

    real_models = REPO / "artifacts" / "models"
    if real_models.is_dir() and not (home / "models").exists():
        (home / "models").symlink_to(real_models, target_is_directory=True)
    resolve_model(args.base)
    rows = alpaca_rows(args.rows + args.val_rows, offset=1000)
    write_variant(VARIANT, rows[args.val_rows:], rows[: args.val_rows], heldout_key="bench")
    tok = load_base_tokenizer(args.base)
    train_path, _ = variant_paths(VARIANT)
    ex, _ = tokenize_rows(tok, read_conversations(train_path), args.max_length, "train")
    assert paths.variants_dir().is_relative_to(home)
    return sum(e.n_tokens for e in ex)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="training rows (one epoch each side)")
    ap.add_argument("--val-rows", type=int, default=32, help="held-out rows for the common validation loss")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--config", default=None, help="train TOML for the shared hyperparameters (default recipe)")
    ap.add_argument("--levers", action="store_true", help="also time each speed lever alone")
    ap.add_argument("--only-levers", action="store_true", help="skip the TRL head-to-head")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--trl-time-limit", type=float, default=900,
                    help="stop a TRL run after this many seconds and time the steps it finished (0: no limit)")
    ap.add_argument("--trl-fp32", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="tomelab side: micro-batches of this size with gradient accumulation up to --batch-size "
                         "(same optimiser batch; bounds activation memory)")
    ap.add_argument("--micro-batch-tokens", type=int, default=-1,
                    help="tomelab side: cap on a micro-batch's padded tokens (-1: the recipe's micro_batch_tokens; 0: no cap)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run TRL (bf16=False) and tomelab this many times each, interleaved; report the median tok/s")
    ap.add_argument("--skip-trl-defaults", action="store_true",
                    help="skip TRL's literal defaults (bf16 autocast: very slow on CPUs without native bf16)")
    ap.add_argument("--lever-time-limit", type=float, default=120,
                    help="time a lever on the steps it finishes within this many seconds (>= 2 timed steps; 0: all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lever", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--token-budget", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        fn = {"tomelab": worker_tomelab, "trl": worker_trl, "base": worker_base, "lever": worker_lever}[args.worker]
        print(json.dumps(fn(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="tomelab-bench-") as tmp:
        home = Path(tmp) / "artifacts"
        home.mkdir()
        args.token_budget = _prepare(args, home)
        print(f"bench: {args.rows} Alpaca rows, {args.token_budget:,} tokens (1 epoch), max_length {args.max_length}, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs", file=sys.stderr)
        results: dict = {"rows": args.rows, "tokens": args.token_budget, "max_length": args.max_length,
                         "batch_size": args.batch_size, "cpus": os.cpu_count()}
        if not args.only_levers:
            results["base"] = _spawn(args, home, "base")
            results["trl"] = (_spawn(args, home, "trl", ["--trl-time-limit", str(args.trl_time_limit)])
                              if not args.skip_trl_defaults else {"name": "TRL SFTTrainer defaults", "error": "skipped"})
            trl_runs, ours_runs = [], []
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
                trl_runs.append(_spawn(args, home, "trl", ["--trl-fp32", "--trl-time-limit", str(args.trl_time_limit)]))
                ours_runs.append(_spawn(args, home, "tomelab", ["--micro-batch", str(args.micro_batch),
                                                                "--micro-batch-tokens", str(args.micro_batch_tokens)]))
            results["trl_fp32"], results["tomelab"] = _median_run(trl_runs), _median_run(ours_runs)
        if args.levers or args.only_levers:
            results["levers"] = [_spawn(args, home, "lever", ["--lever", name, "--lever-time-limit", str(args.lever_time_limit)],
                                        timeout=1800) for name in LEVERS]

    if "trl" in results:
        ours = results["tomelab"]
        peers = [results["trl"], results["trl_fp32"]]
        print(f"\nTRL vs tomelab recipe ({results['rows']} rows, {results['tokens']:,} tokens, "
              f"base val loss {results['base'].get('val_loss')})")
        print("| trainer | tokens | seconds | tok/s | val loss (assistant tokens) | peak RSS MB | setup |")
        print("|---|---|---|---|---|---|---|")
        for r in (*peers, ours):
            if "error" in r:
                print(f"| {r['name']} | error: {r['error']} |")
            else:
                runs = f" (median of {', '.join(map(str, r['tok_s_runs']))})" if r.get("tok_s_runs") else ""
                print(f"| {r['name']} | {r['tokens']:,} | {r['seconds']} | {r['tok_s']}{runs} | {r['val_loss']} | "
                      f"{r['peak_rss_mb']:.0f} | {r['setup']} |")
        if "error" not in ours:
            for key, r in (("defaults", peers[0]), ("fp32", peers[1])):
                if "error" in r:
                    continue
                ratio = ours["tok_s"] / r["tok_s"]
                dloss = (ours["val_loss"] - r["val_loss"]) / r["val_loss"] * 100
                results[f"ratio_vs_trl_{key}"] = round(ratio, 2)
                results[f"val_loss_delta_pct_vs_trl_{key}"] = None if r.get("cut") else round(dloss, 2)
                loss_txt = "val loss not comparable (TRL run cut)" if r.get("cut") else f"val loss {dloss:+.2f}%"
                met = ratio >= 3 and not r.get("cut") and abs(dloss) <= 2 and ours["peak_rss_mb"] <= 4096
                print(f"vs {r['name']}: {ratio:.2f}x tok/s; {loss_txt}; peak RSS {ours['peak_rss_mb']:.0f} MB vs "
                      f"{r['peak_rss_mb']:.0f} MB -> goal (>=3x, loss within 2%, RSS <= 4 GB): {'MET' if met else 'NOT met'}")
    if "levers" in results:
        ref = next((r for r in results["levers"] if r.get("name") == "recipe" and "tok_s" in r), None)
        print("\nlevers (tomelab loop, one setting changed; tok/s after a warm-up step)")
        print("| setting | what | tok/s | vs recipe | steps timed | mean train loss | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for r in results["levers"]:
            if "error" in r:
                print(f"| {r['name']} | error: {r['error']} | | | | | |")
                continue
            rel = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
            print(f"| {r['name']} | {r['what']} | {r['tok_s']} | {rel} | {r['steps']} | {r['mean_loss']} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
