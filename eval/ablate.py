"""`run_ablation(cfg_path)`: curate -> train (variant x block) -> evaluate -> leaderboard, plots, winner.

Every step skips what already exists (curate caches variants, train_run skips finished runs, evaluate
caches per (run, set)), so a killed ablation re-run resumes where it stopped. With `draw_rows` > 0 each
seed is a block: it draws its own sample of the raw pool, every variant of the block is curated from that
draw and trained with that seed, and differences are paired per block (eval/compare.py). Comparison and
winner live in eval/compare.py, the reports in eval/report.py; this module only orchestrates.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from eval.compare import BASE_ROW, MetricRow, System, check_precision, compare, pick_winner
from eval.config import AblationConfig, EvalConfig
from eval.evaluate import evaluate
from eval.report import (
    leaderboard_markdown,
    plot_curve,
    plot_deltas,
    plot_funnels,
    plot_loss_curves,
    plot_metrics,
    write_csv,
)
from tomelab.artifacts import Results, Run, Variant, home_relative, resolve_results_dir
from tomelab.config import load_config
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json, write_text
from tomelab.ray_cluster import address_problem, import_ray

log = logging.getLogger(__name__)

__all__ = ["BASE_ROW", "MetricRow", "System", "compare", "pick_winner", "leaderboard_markdown", "write_csv",
           "run_ablation", "write_results", "plan_cost"]

AA_DRAW_OFFSET = 100_003  # the A/A control's draw seed = block seed + this: an independent draw, same training seed


def _recipe_path(cfg: AblationConfig, entry: str) -> Path:
    p = Path(entry)
    if p.suffix == ".toml":
        return p
    return Path(cfg.variants_dir) / f"{entry}.toml"


def train_config_for(cfg: AblationConfig, overrides: dict[str, Any] | None = None) -> Any:
    """The ablation's TrainConfig: `train_config` with the ablation's `[train]` keys (then `overrides`) applied.

    Overrides go through the same typed loader as the file, so a typo or a wrong type fails with the key.
    """
    from tomelab.config import from_dict, read_config_dict
    from training.config import TrainConfig

    merged = {**read_config_dict(cfg.train_config), **cfg.train, **(overrides or {})}
    return from_dict(TrainConfig, merged, file=f"{cfg.train_config} + ablation [train]")


def recipe_overrides(cfg: AblationConfig, path: Path, cfg_path: str | Path) -> dict[str, Any]:
    """The top-level recipe keys to override for the recipe at `path` ({} without `[recipe_overrides]`): its
    tables with the overrides merged in, and the variant's own name (`variant_prefix` + the recipe's name, else
    `<name>-o<hash of the overrides>`), so an overridden variant never shares a folder with the recipe's own.
    Checked against the recipe's types like the file, so a typo fails with the key."""
    if not cfg.recipe_overrides and not cfg.variant_prefix:
        return {}
    from curation.recipe import Recipe, read_recipe_dict
    from tomelab.config import config_hash, from_dict, merge_tables

    data = read_recipe_dict(path)
    data.setdefault("name", path.stem)
    merged = merge_tables(data, cfg.recipe_overrides)
    prefix = cfg.variant_prefix or ""
    suffix = f"-o{config_hash(cfg.recipe_overrides)[:6]}" if cfg.recipe_overrides and not prefix else ""
    merged["name"] = f"{prefix}{data['name']}{suffix}"
    from_dict(Recipe, merged, file=f"{path} + {cfg_path} [recipe_overrides]")
    return {k: merged[k] for k in [*cfg.recipe_overrides, "name"]}


def _alias_variant(variant: str, alias: str) -> str:
    """A variant folder that points at `variant`'s data under another name, so a sweep arm's runs get
    their own run directories (`runs/<alias>/<base>/<seed>`) without copying or re-curating data."""
    src, dst = Variant(variant), Variant(alias)
    dst.dir.mkdir(parents=True, exist_ok=True)
    if not dst.train.is_symlink():
        dst.train.symlink_to(src.train.resolve())
    write_json(dst.stats_path, {**src.stats(), "variant": alias, "alias_of": variant})
    return alias


def plan_systems(cfg: AblationConfig, cfg_path: Path, names: dict[str, str]) -> list[System]:
    """Leaderboard rows to train: one per variant, or (sweeps) one per arm with its base and overrides."""
    if not cfg.arms:
        tcfg = train_config_for(cfg)
        return [System(names[e], [], [], base=cfg.base, train_variant=names[e], train_config=tcfg) for e in cfg.variants]
    out = []
    for arm in cfg.arms:
        variant = names[arm.variant or cfg.variants[0]]
        train_variant = f"{variant}@{cfg_path.stem}.{arm.name}" if arm.train else variant
        out.append(System(arm.name, [], [], base=arm.base or cfg.base, train_variant=train_variant,
                          train_config=train_config_for(cfg, arm.train)))
    return out


def _curate_blocks(cfg: AblationConfig, cfg_path: Path) -> tuple[dict[str, str], dict[str, dict], dict[str, dict[int, str]]]:
    """Curate every variant (per block when draw_rows > 0, plus the A/A control's independent draws).
    Returns recipe entry -> variant name, variant name -> stats (block 0), and name -> {seed: folder}."""
    from curation.pipeline import curate

    names: dict[str, str] = {}
    stats: dict[str, dict] = {}
    folders: dict[str, dict[int, str]] = {}
    for entry in cfg.variants:
        path = _recipe_path(cfg, entry)
        over = recipe_overrides(cfg, path, cfg_path)
        if not cfg.draw_rows:
            vdir = curate(path, overrides=over or None)
            st = read_json(vdir / "stats.json")
            names[entry] = st.get("variant", vdir.name)
            stats[names[entry]] = st
            continue
        from curation.recipe import load_recipe

        name = over.get("name") or load_recipe(path).name
        names[entry] = name
        jobs = [(name, 0)] + ([(f"{name}-aa", AA_DRAW_OFFSET)] if cfg.negative_control and entry == cfg.baseline else [])
        for label, offset in jobs:
            for seed in cfg.seeds:
                vname = f"{label}.b{seed}"
                vdir = curate(path, overrides={**over, "name": vname, "seed": seed, "draw_rows": cfg.draw_rows,
                                               "draw_seed": seed + offset})
                folders.setdefault(label, {})[seed] = vdir.name
                if seed == cfg.seeds[0]:
                    stats[label] = read_json(vdir / "stats.json")
    return names, stats, folders


def _systems(cfg: AblationConfig, cfg_path: Path, names: dict[str, str], folders: dict[str, dict[int, str]]) -> list[System]:
    systems = plan_systems(cfg, cfg_path, names)
    baseline = cfg.baseline if cfg.arms else names[cfg.baseline]
    for s in systems:
        s.role = "baseline" if s.name == baseline else "variant"
    if not cfg.draw_rows:
        return systems
    for s in systems:
        s.block_variants = dict(folders[s.name])
    tcfg = systems[0].train_config
    if cfg.negative_control:
        systems.append(System(f"{baseline}-aa", [], [], base=cfg.base, train_config=tcfg, role="negative control",
                              block_variants=dict(folders[f"{baseline}-aa"])))
    if cfg.positive_control:
        half = replace(tcfg, token_budget=max(1, tcfg.token_budget // 2))
        aliases = {seed: _alias_variant(v, f"{v}@half") for seed, v in folders[baseline].items()}
        systems.append(System(f"{baseline}-half", [], [], base=cfg.base, train_config=half, role="positive control",
                              block_variants=aliases))
    return systems


def plan_cost(cfg: AblationConfig, ecfg: EvalConfig) -> str:
    """The plan's size and a rough cost, printed before anything runs (tokens x measured CPU speeds)."""
    configs = [train_config_for(cfg, a.train) for a in cfg.arms] or [train_config_for(cfg)] * len(cfg.variants)
    if cfg.negative_control:
        configs.append(configs[0])
    if cfg.positive_control:
        configs.append(replace(configs[0], token_budget=max(1, configs[0].token_budget // 2)))
    runs = len(configs) * len(cfg.seeds)
    t = configs[0]
    per_tok = 1.7 if t.budget_unit == "answer_tokens" else 1.0  # ShareGPT: ~0.7 context token per answer token
    train_tok = sum(c.token_budget for c in configs) * len(cfg.seeds) * per_tok
    h = ecfg.heldout
    nll_items = (h.limit or 300) + h.reference_limit * (len(h.references) + h.val)
    nll_tok = nll_items * ((h.answer_tokens + h.context_tokens) if h.answer_tokens else h.max_length)
    gen_tok = (ecfg.ifeval.limit or 540) * ecfg.ifeval.max_new_tokens if ecfg.ifeval.enabled else 0
    # measured on this project's 2-core VMs, one thread per job: ~40 tok/s training (rows up to 2,560 tokens),
    # ~200 tok/s teacher-forced NLL, ~10 tok/s batched greedy generation (README: Evaluation)
    core_min = (train_tok / 40 + (runs + cfg.include_base) * (nll_tok / 200 + gen_tok / 10)) / 60
    return (f"plan: {len(configs)} systems x {len(cfg.seeds)} blocks = {runs} runs; training {t.token_budget:,} "
            f"{t.budget_unit} per run (~{train_tok / 1e6:.2f}M tokens in all); eval per model: {nll_items} NLL items "
            f"(~{nll_tok:,} tokens), {gen_tok:,} generated tokens; ~{core_min:.0f} core-minutes "
            f"(~{core_min / 2:.0f} min with two workers on 2 cores)")


def run_ablation(cfg_path: str | Path, *, reverse: bool = False, executor: str | None = None,
                 address: str | None = None) -> Path:
    """Curate, then per seed (outer loop) train and evaluate every row; then compare. Returns the results dir.

    Seeds are the outer loop so that an ablation cut short still holds whole seeds for every row:
    re-running with fewer seeds builds a leaderboard from the cache at once. `reverse` walks the
    runs from the last to the first: a second process started that way on the same config shares the
    work with the first (per-run locks in training and eval keep them off each other's runs), so
    single-threaded runs use two cores. `executor` / `address` replace the config's: "ray" submits every
    training and evaluation job as a Ray task (eval/ablate_ray.py) and builds the same leaderboard.
    """
    cfg_path = Path(cfg_path)
    cfg = load_config(cfg_path, AblationConfig)
    ecfg = load_config(cfg.eval_config, EvalConfig)
    if address is not None and address_problem(address):
        raise TomelabError(f"--address {address_problem(address)}")
    cfg.executor, cfg.address = executor or cfg.executor, cfg.address if address is None else address
    if cfg.executor == "ray" and reverse:
        raise TomelabError("--reverse starts a second local worker; with the Ray executor the cluster schedules every "
                           "job: drop --reverse (or use --executor local)")
    if cfg.executor == "ray":
        import_ray()  # a missing Ray fails before any work

    log.info("%s", plan_cost(cfg, ecfg))
    log.info("[1/4] curate %d variant(s)%s (cached ones are read back)", len(cfg.variants),
             f" x {len(cfg.seeds)} blocks" if cfg.draw_rows else "")
    names, stats, folders = _curate_blocks(cfg, cfg_path)
    heldouts = {st["heldout_dir"] for st in stats.values()}
    if len(heldouts) != 1:
        raise TomelabError(f"variants use different held-out sets {sorted(heldouts)}: every variant must share the recipe's "
                           "[heldout] section so all models are tested on the same items.")
    heldout_dir = Path(heldouts.pop())
    labels = None
    if cfg.clean_recipe:
        from curation.labels import label_heldout, read_labels

        labels = read_labels(label_heldout(heldout_dir, _recipe_path(cfg, cfg.clean_recipe)))

    systems = _systems(cfg, cfg_path, names, folders)
    for s in systems:
        if "@" in s.train_variant and not s.block_variants:
            _alias_variant(s.train_variant.split("@")[0], s.train_variant)
    bases = list(dict.fromkeys(s.base for s in systems))
    order = [(seed, sys_) for seed in cfg.seeds for sys_ in systems]
    if reverse:
        order.reverse()
    if cfg.executor == "ray":
        from eval.ablate_ray import run_grid

        log.info("[2-3/4] on Ray: evaluate the base model(s), train + evaluate %d run(s) (finished ones are skipped)",
                 len(order))
        dirs = run_grid(bases if cfg.include_base else [], [(s.variant_for(seed), s.base, seed, s.train_config)
                                                            for seed, s in order],
                        ecfg, heldout_dir, address=cfg.address, job_cpus=cfg.job_cpus)
    else:
        dirs = _run_local(cfg, ecfg, heldout_dir, bases, order)
    for (seed, sys_), rd in zip(order, dirs):
        sys_.refs.append(str(rd))
        sys_.seeds.append(seed)
        sys_.run_dirs[seed] = str(rd)
    for sys_ in systems:  # seed order, whichever way the runs were walked
        pairs = sorted(zip(sys_.seeds, sys_.refs))
        sys_.seeds, sys_.refs = [a for a, _ in pairs], [b for _, b in pairs]
    if cfg.include_base:
        base_rows = [System(BASE_ROW if len(bases) == 1 else f"{BASE_ROW} {b}", [b], [None], trained=False, base=b,
                            role="base") for b in bases]
        systems = base_rows + systems
    log.info("[4/4] leaderboard, plots, winner -> %s", cfg.results_dir)
    baseline = cfg.baseline if cfg.arms else names[cfg.baseline]
    return write_results(cfg, cfg_path, systems, stats, baseline, labels=labels)


def _run_local(cfg: AblationConfig, ecfg: EvalConfig, heldout_dir: Path, bases: list[str],
               order: list[tuple[int, System]]) -> list[Path]:
    """The grid in this process: the base model(s), then each (seed, system) run in `order`; returns the run dirs."""
    from training.train import train_run

    if cfg.include_base:
        log.info("[2/4] evaluate the untouched base model(s) %s", ", ".join(bases))
        for b in bases:
            evaluate(b, ecfg, heldout_dir=heldout_dir)
    log.info("[3/4] train + evaluate %d run(s) (finished runs and cached eval sets are skipped)", len(order))
    dirs = []
    for done, (seed, sys_) in enumerate(order, start=1):
        log.info("run %d/%d: %s seed %d", done, len(order), sys_.name, seed)
        rd = train_run(sys_.variant_for(seed), sys_.base, seed, sys_.train_config)
        evaluate(rd, ecfg, heldout_dir=heldout_dir)
        dirs.append(rd)
    return dirs


def results_dir(cfg: AblationConfig) -> Path:
    """`results_dir` as written, or under the artefact home when it starts with `home:`."""
    return resolve_results_dir(cfg.results_dir)


def write_results(cfg: AblationConfig, cfg_path: Path, systems: list[System], stats: dict[str, dict], baseline: str,
                  *, labels: dict[str, bool] | None = None) -> Path:
    """Leaderboard (md + csv), plots and winner.json from the cached per-item eval outputs."""
    res = Results(results_dir(cfg))
    results = res.dir
    precision = check_precision(systems)
    rows = compare(systems, baseline, cfg.metrics, ci=cfg.ci, labels=labels)
    seeds = f"blocks {cfg.seeds} (own draw of {cfg.draw_rows} rows each)" if cfg.draw_rows else f"seeds {cfg.seeds}"
    title = f"Ablation {cfg_path.stem}: {cfg.base}, {seeds}, baseline `{baseline}`"
    notes = [f"Precision of every trained run: {precision or 'n/a'}. Winner chosen on validation items by: "
             f"{cfg.winner.describe()}; test numbers are reported as they are."]
    if not cfg.winner.on_validation:
        notes.append("**The winner was chosen on test items** (no validation metric compares these systems): "
                     "its numbers below are optimistic.")
    if labels is not None:
        n_test = sum(1 for i in labels if not i.startswith("val:"))
        n_clean = sum(1 for i, v in labels.items() if v and not i.startswith("val:"))
        notes.append(f"Held-out test items passing `{cfg.clean_recipe}`'s exact, MinHash and heuristic filters "
                     f"(heldout_clean): {n_clean} of {n_test}.")
    write_text(res.leaderboard_md, leaderboard_markdown(rows, systems, baseline, cfg.metrics, title=title,
                                                                ci=cfg.ci, primary=cfg.primary, notes=notes,
                                                                target_mde=cfg.target_mde))
    write_csv(res.leaderboard_csv, rows)
    plot_metrics(results / "metrics.png", rows, systems, cfg.metrics)
    plot_loss_curves(results / "loss_curves.png", systems)
    if cfg.ci:
        plot_deltas(results / "deltas.png", rows, cfg.primary, baseline)
    if cfg.curve:
        plot_curve(results / "curve.png", rows, systems, cfg.metrics, cfg.curve)
    if stats:
        plot_funnels(results / "funnel.png", stats)
    win, k, run_metrics = pick_winner(rows, systems, cfg.winner)
    run_dir = win.refs[k]
    write_json(res.winner_path, {
        "variant": win.variant_for(win.seeds[k]) if win.seeds[k] is not None else win.name, "system": win.name,
        "base": win.base or cfg.base, "seed": win.seeds[k], "run_dir": home_relative(run_dir),
        "run_key": Run(Path(run_dir)).key, "model_dir": None,
        "metrics": run_metrics,
        "variant_mean": {r.metric: r.mean for r in rows if r.system == win.name},
        "rule": cfg.winner.describe(), "ablation_config": Path(os.path.relpath(cfg_path)).as_posix(),
        "eval_config": cfg.eval_config, "precision": precision,
    })
    log.info("winner: %s seed %s (%s)", win.name, win.seeds[k], cfg.winner.describe())
    return results
