"""Typed configs for evaluation (`configs/eval/*.toml`) and ablation (`configs/ablation*.toml`).

Kept separate from the code so a quick run and the full run differ only in TOML: item limits and
max new tokens are the levers that trade CPU time for precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tomelab.engines.loops import LoopRule
from tomelab.ray_cluster import address_problem

EVAL_SETS = ("heldout", "ifeval", "gsm8k")

# Ablation metric -> (eval set, per-item score key, per-item weight key or None, higher is better, subset).
# Each is a weighted mean of per-item scores over a subset of the set's items, so intervals can resample
# items. Subsets of the held-out NLL set: "<split>" (test = held-out conversations, val = the validation
# slice, alpaca / gsm8k = reference sets no variant trains on) or "<split>:clean" / "<split>:rejected"
# (items that pass / fail the clean recipe's exact, MinHash and heuristic filters; eval/labels.py).
METRICS: dict[str, tuple[str, str, str | None, bool, str | None]] = {
    "heldout_nll": ("heldout", "nll", "n_tokens", False, "test"),  # raw held-out test conversations
    "heldout_clean_nll": ("heldout", "nll", "n_tokens", False, "test:clean"),  # primary
    "heldout_rejected_nll": ("heldout", "nll", "n_tokens", False, "test:rejected"),
    "val_nll": ("heldout", "nll", "n_tokens", False, "val"),  # validation items: choose the winner on these
    "val_clean_nll": ("heldout", "nll", "n_tokens", False, "val:clean"),
    "alpaca_nll": ("heldout", "nll", "n_tokens", False, "alpaca"),
    "gsm8k_nll": ("heldout", "nll", "n_tokens", False, "gsm8k"),
    "heldout_rougeL": ("heldout", "rougeL", None, True, None),
    "heldout_cosine": ("heldout", "cosine", None, True, None),
    "ifeval_prompt_strict": ("ifeval", "prompt_strict", None, True, None),
    "ifeval_inst_strict": ("ifeval", "inst_strict", "n_inst", True, None),
    "ifeval_prompt_loose": ("ifeval", "prompt_loose", None, True, None),
    "ifeval_inst_loose": ("ifeval", "inst_loose", "n_inst", True, None),
    "gsm8k_em": ("gsm8k", "em", None, True, None),
}
# metrics measured on validation items: the only ones a winner rule may choose by
VALIDATION_METRICS = ("val_nll", "val_clean_nll")


@dataclass
class HeldoutEvalConfig:
    """Held-out conversations: NLL is cheap (one forward pass); generation for ROUGE-L/cosine is not."""

    enabled: bool = True
    limit: int | None = None  # items (conversations); None = all
    generate: bool = True  # also generate answers for ROUGE-L and embedding cosine
    generate_limit: int | None = None  # generate for the first N of the scored items only
    max_new_tokens: int = 128
    max_length: int = 1024  # tokens per conversation for NLL (longer ones are truncated)
    max_prompt_tokens: int = 512  # generate only for items whose prompt fits (long ShareGPT threads are skipped)
    embed_model: Literal["m2v", "minilm"] = "m2v"
    # > 0: score a fixed answer window instead: the first `answer_tokens` tokens of the last assistant
    # turn, after its context left-truncated to `context_tokens`. No item is dropped and every model
    # scores the same tokens (0: the whole conversation, right-truncated at max_length, as before)
    answer_tokens: int = 0
    context_tokens: int = 256
    val: bool = False  # also score the held-out validation slice (split "val": where winners are chosen)
    references: list[Literal["alpaca", "gsm8k"]] = field(default_factory=list)  # reference sets, NLL only
    reference_limit: int = 200  # items per reference set and of the validation slice (a fixed hash-ordered subset)

    def __post_init__(self) -> None:
        if self.answer_tokens < 0 or self.context_tokens < 1 or self.reference_limit < 1:
            raise ValueError("heldout.answer_tokens must be >= 0, context_tokens and reference_limit >= 1")


@dataclass
class GenSetConfig:
    """A generation benchmark (IFEval, GSM8K): item limit, token budget, optional local path."""

    enabled: bool = True
    limit: int | None = None
    max_new_tokens: int = 256
    path: str = ""  # empty: ../shared/data/<set>/...


@dataclass
class EvalConfig:
    """One fixed decoding config (greedy) shared by every model, so outputs are comparable."""

    batch_size: int = 16
    dtype: Literal["float32", "bfloat16"] = "float32"
    # torch intra-op threads while evaluating; 0 keeps torch's default. On a CPU shared by several jobs,
    # 1 thread generated ~5x faster than 2 here (OpenMP workers spin-wait when preempted).
    threads: int = 0
    # generation engine for IFEval/GSM8K/held-out answers. "ctranslate2": the weights converted for
    # CTranslate2 (ct2_compute_type), prompts sorted by length in batches of `batch_size`, `engine_workers`
    # batches decoded at once (one thread each), stop at end of turn. "llama.cpp" is the app's serving path:
    # a GGUF of the same weights (gguf_type) served by xllamacpp (prebuilt wheel), `engine_workers` servers
    # of one thread each with `slots` parallel sequences apiece decoded together (continuous batching), or
    # llama-cpp-python one prompt at a time. bench/eval_engine.py measures their speed against batched
    # transformers and the paired IFEval difference (docs/evaluation.md). Their kernels differ, so greedy
    # outputs drift: compare models within one engine. NLL is always computed with transformers.
    engine: Literal["transformers", "llama.cpp", "ctranslate2"] = "transformers"
    gguf_type: Literal["f16", "f32", "q8_0", "lora"] = "f16"  # q8_0, lora: check bench/eval_engine.py agreement first
    # int8 agreed with transformers within the paired CI but widened a model-vs-model interval by half;
    # int16 did not agree (bench/eval_engine.py, scripts/engine_conclusions.py, REPORT section 6)
    ct2_compute_type: Literal["int8", "int8_float32", "int16", "float32"] = "int8"
    engine_workers: int = 2  # llama.cpp servers / CTranslate2 batch workers (one thread each): one per core
    slots: int = 8  # parallel sequences per llama.cpp server
    # CTranslate2 and llama.cpp engines. N >= 2: an answer whose last `loop_min_tokens` or more tokens repeat
    # one token cycle N times stops decoding, and its cycle is written out to max_new_tokens
    # (tomelab/engines/loops.py); 0: decode every answer to its end. Greedy loops hold most IFEval tokens of a
    # small model; scripts/loop_rule.py chose 3 x 128 on validation prompts and checked it on test prompts
    # and against full runs (docs/evaluation.md, Loop extrapolation)
    loop_repeats: int = 0
    loop_min_tokens: int = 128
    heldout: HeldoutEvalConfig = field(default_factory=HeldoutEvalConfig)
    ifeval: GenSetConfig = field(default_factory=lambda: GenSetConfig(max_new_tokens=256))
    gsm8k: GenSetConfig = field(default_factory=lambda: GenSetConfig(max_new_tokens=256))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0 keeps torch's default)")
        if not 1 <= self.engine_workers <= 64 or not 1 <= self.slots <= 64:
            raise ValueError("engine_workers and slots must be between 1 and 64")
        if self.loop_repeats and (self.loop_repeats < 2 or self.loop_min_tokens < 1):
            raise ValueError("loop_repeats must be 0 (off) or >= 2, and loop_min_tokens >= 1")
        if self.loop_repeats and self.engine == "transformers":
            raise ValueError("loop_repeats needs engine = \"ctranslate2\" or \"llama.cpp\" (this config has the "
                             "default, transformers); set loop_repeats = 0 or choose an engine")
        for name in EVAL_SETS:
            s = getattr(self, name)
            if s.limit is not None and s.limit < 1:
                raise ValueError(f"{name}.limit must be >= 1 (or left out for all items)")
            if s.max_new_tokens < 1:
                raise ValueError(f"{name}.max_new_tokens must be >= 1")

    def enabled_sets(self) -> list[str]:
        return [s for s in EVAL_SETS if getattr(self, s).enabled]

    def loop_rule(self) -> LoopRule | None:
        return LoopRule(self.loop_repeats, self.loop_min_tokens) if self.loop_repeats else None


@dataclass
class WinnerRule:
    """Winner = best mean (over seeds) of `metric` among trained variants; near-ties go to `tie_breaker`."""

    metric: str = "val_clean_nll"
    tie_breaker: str = "val_nll"
    tie_tolerance: float = 0.0  # |difference| <= this counts as a tie

    def __post_init__(self) -> None:
        for m in (self.metric, self.tie_breaker):
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; choose one of {', '.join(METRICS)}")
        if self.tie_tolerance < 0:
            raise ValueError("winner.tie_tolerance must be >= 0")

    @property
    def on_validation(self) -> bool:
        """True when the rule reads only validation items. Choosing on test items and then reporting
        them is optimistic (winner's curse): the leaderboard says so when this is False (e.g. a
        cross-tokenizer sweep, where only generation metrics compare and they have no validation split)."""
        return self.metric in VALIDATION_METRICS and self.tie_breaker in VALIDATION_METRICS

    def describe(self) -> str:
        a = "higher" if METRICS[self.metric][3] else "lower"
        b = "higher" if METRICS[self.tie_breaker][3] else "lower"
        return (
            f"best mean {self.metric} across seeds ({a} is better) among trained variants; "
            f"differences <= {self.tie_tolerance} are ties, broken by mean {self.tie_breaker} ({b} is better); "
            f"the winning variant's best seed by the same rule is served"
        )


@dataclass
class Arm:
    """One model-side setting in a sweep (`[[arms]]`): a base model and/or training overrides, data fixed."""

    name: str
    variant: str = ""  # empty: the ablation's only variant
    base: str = ""  # empty: the ablation's `base`
    train: dict[str, Any] = field(default_factory=dict)  # overrides on top of the ablation's [train]


@dataclass
class AblationConfig:
    """Variants x seeds on one base model, evaluated on the same items, compared to a baseline."""

    variants: list[str]  # recipe names: configs/variants/<name>.toml (or paths to recipe TOMLs)
    train_config: str  # TOML for training.config.TrainConfig
    eval_config: str  # TOML for EvalConfig
    base: str = "smollm2-135m-instruct"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = "random"
    variants_dir: str = "configs/variants"
    results_dir: str = "results"
    metrics: list[str] = field(
        default_factory=lambda: ["heldout_nll", "heldout_rougeL", "heldout_cosine", "ifeval_prompt_strict",
                                 "ifeval_inst_strict", "ifeval_prompt_loose", "ifeval_inst_loose", "gsm8k_em"]
    )
    ci: bool = True  # intervals vs the baseline, paired by block and item (needs >= 2 seeds)
    include_base: bool = True  # evaluate the untouched base model as its own row
    # overrides of train_config's keys for this ablation only (e.g. a smaller token_budget), so one
    # recipe file serves several compute sizes; checked against TrainConfig like the file itself
    train: dict[str, Any] = field(default_factory=dict)
    winner: WinnerRule = field(default_factory=WinnerRule)
    # Model-centric sweeps: when set, the leaderboard rows are these arms (baseline = an arm name)
    # instead of the variants; data stays fixed to `variants` (usually one, the best data variant).
    arms: list[Arm] = field(default_factory=list)
    # a numeric training key the arms vary (e.g. "token_budget"): also plot every metric against it
    # (curve.png; the untouched base model is the 0 point of a token_budget curve)
    curve: str = ""
    # Blocks: > 0 makes each seed a block that draws its own sample of `draw_rows` rows per pool source
    # (after the held-out split); every variant of that block is curated from that draw and trained with
    # that seed, and differences are paired per block (eval/stats.py block_diff)
    draw_rows: int = 0
    # Controls (need draw_rows): an A/A row `<baseline>-aa` (the baseline recipe on an independent draw:
    # its interval must cover 0) and a positive control `<baseline>-half` (the baseline's data at half
    # the training budget: it must come out worse, else the ablation is underpowered)
    negative_control: bool = False
    positive_control: bool = False
    # recipe whose exact/MinHash/heuristic filters define the clean held-out items (heldout_clean_nll)
    clean_recipe: str = ""
    primary: str = ""  # the metric the leaderboard's verdict lines are about (empty: the first of `metrics`)
    target_mde: float = 0.0  # > 0: the leaderboard says how many blocks would bring the primary MDE down to it
    # recipe keys set on every variant this ablation curates (e.g. budget_rows = 200; tables merge into the
    # recipe's), checked against the recipe like the file itself. They change what a variant keeps, so the
    # variants get their own names: `variant_prefix` + recipe name, or `<recipe>-o<hash of the overrides>`
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    variant_prefix: str = ""
    # where the grid's training and evaluation jobs run (where, not what: no hash reads these): "local" (this
    # process; `--reverse` for a second one) or "ray" (one Ray task per job, eval/ablate_ray.py) on `address`
    # ("" = $RAY_ADDRESS, else a local Ray on this machine's cores; "auto"; "ray://HOST:PORT"; "HOST:PORT")
    executor: Literal["local", "ray"] = "local"
    address: str = ""
    job_cpus: int = 1  # Ray: CPUs each job asks for (and its torch / OpenMP threads); one GPU each where there are GPUs

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants must list at least one recipe")
        if self.curve and not self.arms:
            raise ValueError("curve plots a training key the [[arms]] vary: it needs [[arms]]")
        if self.arms:
            self._check_arms()
        elif self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} must be one of the variants {self.variants}")
        self._check_common()

    def _check_arms(self) -> None:
        if self.curve:
            import dataclasses

            from training.config import TrainConfig

            numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", int, float)}
            if self.curve not in numeric:
                raise ValueError(f"curve {self.curve!r} must be a numeric training key, one of {', '.join(sorted(numeric))}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} must be one of the arm names {names}")
        for a in self.arms:
            if not a.variant and len(self.variants) != 1:
                raise ValueError(f"arm {a.name!r} names no variant and `variants` has {len(self.variants)}: set arms.variant")
            if a.variant and a.variant not in self.variants:
                raise ValueError(f"arm {a.name!r}: variant {a.variant!r} is not in variants {self.variants}")
            if any(ch in a.name for ch in "/\\ @"):
                raise ValueError(f"arm name {a.name!r} must not contain '/', '\\', '@' or spaces (it names a folder)")

    def _check_common(self) -> None:
        problem = address_problem(self.address)
        if problem:
            raise ValueError(f"`address` {problem}")
        if self.job_cpus < 1:
            raise ValueError(f"job_cpus must be >= 1, got {self.job_cpus}")
        if self.variant_prefix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.variant_prefix):
            raise ValueError(f"variant_prefix {self.variant_prefix!r} may use only letters, digits, '_' and '-' "
                             "(it starts folder names), e.g. \"demo-\"")
        if "name" in self.recipe_overrides:
            raise ValueError("recipe_overrides cannot set `name`: variants are named by the recipe and variant_prefix")
        if self.draw_rows and {"seed", "draw_rows", "draw_seed"} & set(self.recipe_overrides):
            raise ValueError("recipe_overrides cannot set seed, draw_rows or draw_seed with draw_rows > 0: each block sets them")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds contain duplicates: {self.seeds}")
        if self.target_mde < 0:
            raise ValueError(f"target_mde must be >= 0 (0: not shown), got {self.target_mde}")
        if self.draw_rows < 0:
            raise ValueError(f"draw_rows must be >= 0 (0: no per-block draw), got {self.draw_rows}")
        if self.draw_rows and self.arms:
            raise ValueError("draw_rows (blocks) and [[arms]] cannot be combined: a sweep's arms share one variant; "
                             "run the sweep without draw_rows, or list the settings as variants")
        if (self.negative_control or self.positive_control) and not self.draw_rows:
            raise ValueError("negative_control / positive_control need blocks: set draw_rows > 0")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants lists a recipe twice: {self.variants}")
        self.primary = self.primary or (self.metrics[0] if self.metrics else "")
        if self.primary not in self.metrics:
            raise ValueError(f"primary {self.primary!r} must be one of metrics {self.metrics}")
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r} in metrics; choose from {', '.join(METRICS)}")
        if self.ci and len(self.seeds) < 2:
            raise ValueError(
                f"ci = true needs >= 2 seeds (blocks) per variant to estimate training noise, got seeds = {self.seeds}. "
                "Add seeds (e.g. seeds = [0, 1, 2]) or set ci = false"
            )
