"""The ablation grid on Ray (`tomelab ablate CONFIG --executor ray`): every training and evaluation job a Ray task.

The driver curates (cached) and plans as the local path does; this module only runs the jobs: one task per
untouched-base evaluation and per run (`train_run`, then `evaluate` as a task that waits for it), each asking
for one GPU where the cluster has GPUs, else `job_cpus` CPUs, with torch / OpenMP threads set to `job_cpus`.
The tasks call the same `train_run` / `evaluate` as the local path, so they take the same per-run locks
(a killed task's run resumes; a local worker and a task never train one run at once) and write to the same
artefact home: $TOMELAB_HOME, made absolute, reaches every worker through the task's runtime_env (on a
multi-node cluster it must be a path every node shares). The driver then builds the leaderboard as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tomelab.errors import TomelabError
from tomelab.ray_cluster import connect, import_ray, worker_env

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# one training job: (variant folder, base model, seed, TrainConfig)
TrainJob = tuple[str, str, int, Any]


def job_env(threads: int) -> dict[str, str]:
    """Environment of every task: the absolute artefact home and shared data, offline switches, thread counts."""
    return worker_env(**{k: str(threads) for k in THREAD_ENV})


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train(variant: str, base: str, seed: int, tcfg: Any, threads: int) -> str:
    from training.train import train_run

    _set_threads(threads)
    return str(train_run(variant, base, seed, tcfg))


def _evaluate(ref: str, ecfg: Any, heldout_dir: str, threads: int) -> str:
    from eval.evaluate import evaluate

    _set_threads(threads)
    evaluate(ref, ecfg, heldout_dir=Path(heldout_dir))
    return ref


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resources(ray: Any, job_cpus: int) -> dict[str, Any]:
    """One GPU per job where the cluster has GPUs, else `job_cpus` CPUs (refused when no node could ever run it)."""
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": job_cpus}
    most = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if job_cpus > most:
        raise TomelabError(f"job_cpus = {job_cpus} but the largest Ray node has {most:g} CPUs: no job could start. "
                           f"Lower job_cpus in the ablation config")
    return {"num_cpus": job_cpus}


def run_grid(base_evals: list[str], runs: list[TrainJob], ecfg: Any, heldout_dir: Path, *, address: str = "",
             job_cpus: int = 1) -> list[str]:
    """Evaluate each base model in `base_evals` and train + evaluate each of `runs` as Ray tasks; wait for all.
    Returns the run directories in the order of `runs`. The first failed job cancels the rest and is raised."""
    ray = import_ray()
    owns = connect(address, hint="ablation's `address`, --address or $RAY_ADDRESS")
    try:
        opts = {**resources(ray, job_cpus), "runtime_env": {"env_vars": job_env(job_cpus)}}
        train = ray.remote(_train).options(**opts, name="tomelab-train")
        evaluate = ray.remote(_evaluate).options(**opts, name="tomelab-eval")
        log.info("Ray: %d base evaluation(s) + %d run(s) as tasks, each asking for %s", len(base_evals), len(runs),
                 ", ".join(f"{k}={v}" for k, v in opts.items() if k.startswith("num_")))
        hd = str(Path(heldout_dir).resolve())
        pending = {evaluate.remote(b, ecfg, hd, job_cpus): f"evaluate {b}" for b in base_evals}
        done_refs = []
        for variant, base, seed, tcfg in runs:
            trained = train.remote(variant, base, seed, tcfg, job_cpus)
            ref = evaluate.remote(trained, ecfg, hd, job_cpus)  # starts when `trained` is done
            pending[ref] = f"train + evaluate {variant}/{base}/{seed}"
            done_refs.append(ref)
        _wait(ray, pending)
        return [ray.get(r) for r in done_refs]
    finally:
        if owns:
            ray.shutdown()


def _wait(ray: Any, pending: dict) -> None:
    """Wait for every task, logging each as it finishes; on the first failure cancel the others and raise it:
    a TomelabError from a task as itself (the CLI prints its one line), a worker lost after Ray's retries (killed,
    out of memory) as one line too, a bug with its remote traceback."""
    left, n = list(pending), len(pending)
    try:
        while left:
            ready, left = ray.wait(left, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as e:
                for r in left:
                    ray.cancel(r)
                cause = getattr(e, "cause", None)
                if isinstance(cause, TomelabError):
                    raise cause from None
                if isinstance(e, ray.exceptions.RayTaskError):
                    raise
                raise TomelabError(f"Ray lost the job `{pending[ready[0]]}` ({_first_line(e)}); finished runs "
                                   "are kept: re-run to resume") from None
            log.info("Ray: %d/%d done: %s", n - len(left), n, pending[ready[0]])
    except KeyboardInterrupt:
        for r in left:
            ray.cancel(r, force=True)  # a killed run resumes from its checkpoint; its lock dies with the worker
        raise
