"""Multi-process training (DDP through accelerate): this process's rank, its share of each step, gradient sync.

Why a thin layer rather than accelerate's Trainer-style loop: with one process (no WORLD_SIZE > 1 in the
environment) every method below is the identity and no Accelerator is built, so a single-process run is
bit-for-bit what it was before DDP existed. Under `torchrun`, `accelerate launch` or `tomelab train --nproc N`
(which re-execs through torchrun), accelerate builds the process group (gloo on CPU, nccl on CUDA) and wraps
the loss in DistributedDataParallel.

Global batch: every rank builds the same batch plan and takes a disjoint share of each micro-batch (rows
r, r+W, ...). Its loss is divided by the whole step's answer-token count and multiplied by W (DDP averages
gradients), so an optimiser step sees the same rows and the same gradient as one process, up to float
summation order. Dropout masks are drawn per rank, so only a dropout-free run matches one process closely
(the measured tolerance is in docs/training.md). Only rank 0 writes the run folder; every rank reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from tomelab.errors import TomelabError

log = logging.getLogger("training.train")


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when not launched as a group)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TomelabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; unset it or launch "
                           "with torchrun / accelerate launch.") from None


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a launch that must not collide with another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, module_args: list[str], *, port: int | None = None) -> list[str]:
    """The one-node launch `tomelab train --nproc N` re-execs: N ranks of `python -m tomelab.cli ...`.

    torchrun rather than `accelerate launch`: `accelerate launch --cpu --num_processes 2` silently starts a
    single process (measured), while torchrun starts N ranks on CPU (gloo) and on GPUs (nccl) alike. The
    rendezvous port is MASTER_PORT if set, else a free one, so two launches on one machine never collide.
    """
    import sys

    env_port = os.environ.get("MASTER_PORT", "")
    port = port or (int(env_port) if env_port.isdigit() else free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "tomelab.cli", *module_args]


def _loss_module(model: Any, loss_fn: Callable[..., Any]) -> Any:
    """An nn.Module whose forward is the run's loss, so DDP hooks the LoRA parameters it reaches."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registers every parameter; DDP syncs only those with requires_grad
            self.loss_fn = loss_fn

        def forward(self, batch: dict[str, Any], device: str) -> Any:
            return self.loss_fn(batch, device)

    return LossModule()


class Dist:
    """This process's place in the group; identity methods when it is the only process."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0
        self._ddp: Any = None

    @classmethod
    def current(cls) -> Dist:
        """The group this process was launched in (WORLD_SIZE > 1), else a single process."""
        if env_world_size() <= 1:
            return cls()
        import torch
        from accelerate import Accelerator

        # the recipe owns precision (its own autocast), so accelerate must add none, whatever the launcher says
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", dynamo_backend="no")
        if acc.num_processes <= 1:
            raise TomelabError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but accelerate built no process group "
                               "(a CPU launch with --cpu starts one process). Launch with `tomelab train --nproc N` "
                               "or `torchrun --nproc-per-node N -m tomelab.cli train ...`.")
        d = cls(acc)
        if not d.is_main:  # one copy of the run's log lines, from rank 0
            logging.getLogger("training").setLevel(logging.WARNING)
        log.info("rank %d of %d (%s, %s)", d.rank, d.world_size, acc.distributed_type, acc.device)
        return d

    def lock(self, make_lock: Callable[[], Any]) -> Any:
        """The run folder's lock, taken by rank 0 only (the other ranks wait for it in the first collective)."""
        return make_lock() if self.is_main else contextlib.nullcontext()

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on rank 0 only and give every rank its result (or its TomelabError)."""
        if self.accelerator is None:
            return fn(*args)
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args))
            except TomelabError as e:
                box[0] = ("error", str(e))
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise TomelabError(value)
        return value

    def agree(self, value: int, what: str, fix: str) -> None:
        """Fail on every rank if the ranks hold different values of `what` (e.g. the step they resume from)."""
        if self.accelerator is None:
            return
        from accelerate.utils import gather_object

        values = gather_object([int(value)])
        if len(set(values)) > 1:
            raise TomelabError(f"ranks disagree on {what}: {values} (rank order). {fix}")

    def wrap_loss(self, model: Any, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """The loss to train with: `loss_fn` itself, or a DDP-wrapped module computing it."""
        if self.accelerator is None:
            return loss_fn
        # placement is the recipe's (QLoRA weights are already on this rank's GPU): accelerate only wraps
        self._ddp = self.accelerator.prepare_model(_loss_module(model, loss_fn), device_placement=False)
        return self._ddp

    def shard(self, micro: list[list[int]]) -> Iterator[tuple[list[int], int, Any]]:
        """(rows, loss weight, sync context) for this rank's share of each micro-batch of one optimiser step.

        Weight W scales the loss against DDP's gradient average. DDP all-reduces once per step: on this
        rank's last micro-batch (the others run under no_sync). A rank left without a row in a short step
        runs one weight-0 pass, so every rank joins the all-reduce and contributes a zero gradient.
        """
        if self.accelerator is None:
            for mb in micro:
                yield mb, 1, contextlib.nullcontext()
            return
        w = self.world_size
        parts = [mb[self.rank :: w] for mb in micro if mb[self.rank :: w]]
        weights = [w] * len(parts)
        if not parts:
            parts, weights = [micro[0][:1]], [0]
        for k, (rows, weight) in enumerate(zip(parts, weights)):
            last = k == len(parts) - 1
            yield rows, weight, (contextlib.nullcontext() if last else self.accelerator.no_sync(self._ddp))

    def eval_share(self, batch_index: int) -> bool:
        """Whether this rank evaluates validation batch `batch_index` (batches are dealt round-robin)."""
        return batch_index % self.world_size == self.rank

    def sum(self, *values: Any) -> tuple[Any, ...]:
        """Each value summed over the ranks (the same types back; the identity for one process)."""
        if self.accelerator is None:
            return values
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        out = self.accelerator.reduce(t, reduction="sum").tolist()
        return tuple(type(v)(x) for v, x in zip(values, out))

    def finish(self) -> None:
        """Wait until every rank is done (rank 0 writing the run), then drop accelerate's hold on this run's model."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.free_memory()
            self._ddp = None
