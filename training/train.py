"""`train_run`: one (Q)LoRA fine-tune of one variant with one seed, resumable and skippable.

Why a lean loop rather than `trl.SFTTrainer` as is: on 2 CPU cores the 49k-vocabulary lm_head
over every position, padding and fp32 dominate. This loop runs the base model's decoder, gathers
only the assistant positions and applies the lm_head there (the loss is assistant-only anyway:
`training/loss.py`), batches rows of similar length, and keeps the frozen base in bf16 where the
hardware has native bf16 (fp32 otherwise: emulated bf16 is ~15x slower on AVX2-only CPUs). Models
and LoRA come from transformers + peft exactly as TRL would build them; bench/training.py measures
the difference against TRL's defaults on the same data and token count.

Reproducibility: the batch plan is a pure function of (seed, data, config) and the dropout RNG is
reseeded from (seed, step) at every optimiser step, so a run resumed from a checkpoint after a
kill -9 follows the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tomelab.artifacts import ADAPTER_DIR, METRICS, RUN_CONFIG, TRAIN_LOG, Run, base_key  # noqa: F401  (re-exported)
from tomelab.config import config_hash, safe_name_problem, to_dict
from tomelab.errors import TomelabError
from tomelab.io import atomic_dir, atomic_path, exclusive, pyplot, read_json, save_figure, write_json, write_jsonl
from tomelab.models import resolve_model
from training.config import TrainConfig
from training.data import (
    collate,
    fingerprint,
    plan_batches,
    plan_digest,
    read_conversations,
    tokenize_rows,
    variant_paths,
)
from training.distributed import Dist
from training.hardware import (  # noqa: F401  (re-exported: the run's hardware choices live there)
    auto_precision_override,
    check_target_modules,
    cpu_has_native_bf16,
    load_checkpoint,
    load_training_base,
    oom_error,
    peak_rss_mb,
    precision_of,
    resolve_hardware,
)
from training.load import load_base_tokenizer
from training.loss import AssistantLoss, autocast, evaluate_loss

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def run_dir_for(variant: str, base: str, seed: int) -> Path:
    return Run.of(variant, base, seed).dir


def _plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    tr = [r for r in records if "loss" in r]
    va = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], lw=1, label="train (assistant tokens)")
    if va:
        ax.plot([r["tokens"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
    ax.set_xlabel("trained tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# knobs added after runs were made: left out of the recorded recipe while at their default, so the
# config hash of those runs (and their reuse by ablations and sweeps) is unchanged
_OMIT_AT_DEFAULT = {"micro_batch_tokens": 0, "budget_unit": "tokens", "gradient_checkpointing": False}


def _recipe_for_hash(cfg: TrainConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    return {k: v for k, v in d.items() if not (k in _OMIT_AT_DEFAULT and v == _OMIT_AT_DEFAULT[k])}


def _resolved_config(variant: str, base: str, seed: int, cfg: TrainConfig, train_path: Path, val_path: Path,
                     device: str, quant: str, dtype: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    resolved: dict[str, Any] = {
        "variant": variant,
        "base": base,
        "base_key": base_key(base),
        "base_dir": str(resolve_model(base)),
        "seed": seed,
        "recipe": _recipe_for_hash(cfg),
        "data": {
            "train": str(train_path),
            "val": str(val_path),
            "fingerprint": fingerprint(train_path, val_path),
        },
        "device": device,
        "quantization": quant,
        "base_dtype": dtype,
        "loss": "assistant tokens only (chat template, prefix-rendered mask)",
    }
    resolved["config_hash"] = config_hash({k: v for k, v in resolved.items() if k != "base_dir"})
    resolved["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "trl": trl.__version__}
    return resolved


def train_run(variant: str, base: str, seed: int, cfg: TrainConfig, *, force: bool = False,
              on_step: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune `base` on variant `variant` with `seed`; returns the run directory.

    Skips a finished run with the same resolved config; resumes a killed one from its checkpoint.
    `force` retrains from scratch. `on_step(record)` is called after every optimiser step with that
    step's log record (step, loss, lr, tok/s, ...), after any checkpoint of that step: for live plots or
    a custom stop; an exception it raises ends the run unsaved, as a kill would. One process at a time
    trains a run dir: another one asking for it waits, then skips the finished run.
    """
    problem = safe_name_problem(variant)
    if problem:
        raise TomelabError(f"--variant: {problem}; pass the name of a curated variant (artifacts/variants/<name>).")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TomelabError(f"--seed must be an integer >= 0, got {seed!r}.")
    variant_paths(variant)  # an uncurated variant fails before any lock folder is made
    dist = Dist.current()  # one process, or this rank of a torchrun / accelerate launch group (only rank 0 locks)
    with dist.lock(lambda: exclusive(run_dir_for(variant, base, seed), "train")):
        return _train_run(variant, base, seed, cfg, force=force, dist=dist, on_step=on_step)


def _train_run(variant: str, base: str, seed: int, cfg: TrainConfig, *, force: bool, dist: Dist,
               on_step: Callable[[dict], None] | None) -> Path:
    import torch
    from tqdm import tqdm

    t_start = time.perf_counter()
    train_path, val_path = variant_paths(variant)
    resolve_model(base)  # unknown base -> clear error before any work
    device, quant, dtype = resolve_hardware(cfg)
    resolved = _resolved_config(variant, base, seed, cfg, train_path, val_path, device, quant, dtype)
    run_dir = run_dir_for(variant, base, seed)

    def prepare() -> bool:  # rank 0 decides for every rank: skip a finished run, refuse a changed one, or (re)start
        if (run_dir / METRICS).is_file() and not force:
            old = read_json(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).is_file() else {}
            if old.get("config_hash") == resolved["config_hash"]:
                log.info("run %s is finished with the same config: skipped", run_dir)
                return True
            raise TomelabError(
                f"{run_dir} holds a finished run with a different config or data (hash {old.get('config_hash')} != "
                f"{resolved['config_hash']}). Re-run with --force to retrain it, or delete that folder."
            )
        if force and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_CONFIG, resolved)
        return False

    if dist.on_main(prepare):
        return run_dir

    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # data
    tok = load_base_tokenizer(base)
    train_rows = read_conversations(train_path)
    val_rows = read_conversations(val_path, limit=cfg.val_rows)
    train_ex, train_stats = tokenize_rows(tok, train_rows, cfg.max_length, "tokenize_train")
    val_ex, val_stats = tokenize_rows(tok, val_rows, cfg.max_length, "tokenize_val")
    if not val_ex:
        raise TomelabError(f"{val_path}: no validation row has an answer token within max_length={cfg.max_length}.")
    steps = plan_batches(train_ex, seed=seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         token_budget=cfg.token_budget, epochs_cap=cfg.epochs_cap, packing=cfg.packing,
                         source=f"variant {variant!r} ({train_path})", micro_batch_tokens=cfg.micro_batch_tokens,
                         budget_unit=cfg.budget_unit)
    total_steps = len(steps)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    log.info("run %s: %d rows, %d optimiser steps (%d warm-up), budget %d tokens, %s/%s on %s",
             run_dir, len(train_ex), total_steps, warmup_steps, cfg.token_budget, quant, dtype, device)
    if warmup_steps >= total_steps:
        # linear warm-up starts at lr 0, so a one-step run never leaves its initialisation
        effect = ("its only step runs at lr 0, so the adapter stays at its initialisation" if total_steps == 1
                  else "the learning rate never reaches its peak")
        log.warning("run %s: warm-up covers all %d optimiser step(s): %s; raise token_budget or lower "
                    "warmup_ratio", run_dir, total_steps, effect)

    # model: seed first so the LoRA init is a function of the seed
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = load_training_base(base, quant, dtype, device)
    targets: Any = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    if targets != "all-linear":
        check_target_modules(model, targets, base)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:  # same maths, less memory: activations are recomputed layer by layer
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_fn = AssistantLoss(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=warmup_steps,
                          num_training_steps=total_steps)
    use_autocast = dtype in ("bfloat16", "nf4")  # compute in bf16 only where the weights are bf16/nf4

    # resume
    state = {"step": 0, "tokens": 0, "loss_tokens": 0, "train_seconds": 0.0, "log": [],
             "best_val": None, "bad_evals": 0, "stopped_early": False}
    ckpt_path = run_dir / CHECKPOINT
    digest = plan_digest(steps)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None:
        if ckpt.get("config_hash") == resolved["config_hash"] and ckpt.get("plan") == digest:
            set_peft_model_state_dict(model, ckpt["lora"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            state = ckpt["state"]
            log.info("resuming %s from step %d/%d", run_dir, state["step"], total_steps)
        else:
            log.warning("%s: checkpoint is from a different config or data; starting over", ckpt_path)
    dist.agree(state["step"], "the step to resume from",
               f"Every rank must read the same {ckpt_path}: put TOMELAB_HOME on a filesystem all nodes share.")

    def save_checkpoint() -> None:
        if not dist.is_main:  # one writer; every rank holds the same weights and optimiser state
            return
        with atomic_path(ckpt_path) as tmp:
            torch.save({"config_hash": resolved["config_hash"], "plan": digest,
                        "lora": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "state": state}, tmp)
        write_jsonl(run_dir / TRAIN_LOG, state["log"])

    def run_eval() -> float:
        v = evaluate_loss(loss_fn, model, val_ex, batch_size=cfg.batch_size, pad_id=pad_id, device=device,
                          bf16=use_autocast, dist=dist)
        state["log"].append({"step": state["step"], "tokens": state["tokens"], "val_loss": round(v, 5)})
        return v

    fwd = dist.wrap_loss(model, loss_fn)  # the loss itself, or under DDP a wrapped module that syncs LoRA grads
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {variant}/{base_key(base)}/{seed}", unit="step",
               disable=not dist.is_main)
    try:
        while state["step"] < total_steps and not state["stopped_early"]:
            i = state["step"]
            # dropout RNG: a function of (seed, step) (and the rank under DDP), so resume is exact
            torch.manual_seed((seed * 1_000_003 + i) * dist.world_size + dist.rank)
            micro = steps[i]
            n_loss = sum(train_ex[j].n_loss for mb in micro for j in mb)
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for rows, weight, sync in dist.shard(micro):  # this rank's rows of each micro-batch (all of them alone)
                batch = collate([train_ex[j] for j in rows], pad_id)
                with sync:
                    with autocast(device, use_autocast):
                        s, _ = fwd(batch, device)
                    (s / n_loss * weight).backward()
                step_loss += float(s.detach()) * (weight > 0)
                step_tokens += batch["n_tokens"] * (weight > 0)
            step_loss, step_tokens = dist.sum(step_loss, step_tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += step_tokens
            state["loss_tokens"] += n_loss
            state["train_seconds"] += dt
            rec = {"step": state["step"], "tokens": state["tokens"], "loss": round(step_loss / n_loss, 5),
                   "lr": lr, "grad_norm": round(grad_norm, 4), "tok_s": round(step_tokens / dt, 1)}
            state["log"].append(rec)
            bar.update(1)
            bar.set_postfix(loss=rec["loss"], tok_s=rec["tok_s"])
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
                v = run_eval()
                if state["best_val"] is None or v < state["best_val"] - 1e-4:
                    state["best_val"], state["bad_evals"] = v, 0
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping and state["bad_evals"] >= cfg.patience:
                        log.info("early stop at step %d: validation loss did not improve for %d evaluations", state["step"], cfg.patience)
                        state["stopped_early"] = True
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                save_checkpoint()
            if on_step is not None:
                on_step(dict(rec))
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise oom_error(e, cfg, state["step"]) from None
    except RuntimeError as e:
        if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
            raise oom_error(e, cfg, state["step"]) from None
        raise
    finally:
        bar.close()

    final_val = run_eval()
    if not dist.is_main:  # rank 0 writes the run folder; the others return once it is complete
        dist.finish()
        return run_dir
    write_jsonl(run_dir / TRAIN_LOG, state["log"])
    with atomic_dir(run_dir / ADAPTER_DIR) as adapter_tmp:
        model.save_pretrained(str(adapter_tmp))
    _plot_loss(state["log"], Run(run_dir).loss_png, f"{variant} / {base_key(base)} / seed {seed}")

    losses = [r["loss"] for r in state["log"] if "loss" in r]
    tail = losses[-max(1, math.ceil(len(losses) * 0.1)):]
    metrics = {
        "variant": variant,
        "base": base,
        "seed": seed,
        "steps": state["step"],
        "planned_steps": total_steps,
        "warmup_steps": warmup_steps,
        "stopped_early": state["stopped_early"],
        "tokens_seen": state["tokens"],
        "loss_tokens_seen": state["loss_tokens"],
        "prompt_tokens_seen": state["tokens"] - state["loss_tokens"],  # context + template tokens, not trained
        "rows_seen": sum(len(mb) for step in steps[: state["step"]] for mb in step),
        "budget_unit": cfg.budget_unit,
        "tok_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "train_seconds": round(state["train_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": round(sum(tail) / len(tail), 5),
        "final_val_loss": round(final_val, 5),
        "device": device,
        "quantization": quant,
        "base_dtype": dtype,
        "precision": precision_of(dtype),
        "threads": torch.get_num_threads(),
        "world_size": dist.world_size,  # processes that trained it (DDP ranks; the global batch is the same)
        "data": {"train": train_stats.to_dict(), "val": val_stats.to_dict()},
        "config_hash": resolved["config_hash"],
    }
    write_json(run_dir / METRICS, metrics)  # written last: its presence marks the run finished
    if ckpt_path.exists():
        ckpt_path.unlink()
    dist.finish()  # the other ranks wait for this: the run folder is complete when any rank returns
    log.info("run %s done: val loss %.4f, %.0f tok/s, peak RSS %.0f MB", run_dir, final_val, metrics["tok_s"], metrics["peak_rss_mb"])
    return run_dir
