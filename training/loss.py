"""The loss every run trains and is validated on: cross-entropy over assistant tokens only.

The lm_head is applied only at the assistant positions (the loss is assistant-only anyway), which on
2 CPU cores saves most of the cost of a 49k-vocabulary head over every position. The training loop
(`training/train.py`), `bench/training.py` and `scripts/gpu-check.sh` all score through this module.
"""

from __future__ import annotations

from typing import Any

from training.data import Example, collate
from training.distributed import Dist


class AssistantLoss:
    """Summed cross-entropy over assistant tokens only, with the lm_head applied only at those positions."""

    def __init__(self, causal_lm: Any):
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def __call__(self, batch: dict[str, Any], device: str) -> tuple[Any, int]:
        import torch
        import torch.nn.functional as F

        ids = batch["input_ids"].to(device)
        att = batch["attention_mask"].to(device)
        targets = batch["targets"][:, 1:].to(device)
        hidden = self.decoder(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
        sel = targets != -100
        logits = self.head(hidden[sel]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss = F.cross_entropy(logits, targets[sel], reduction="sum")
        return loss, int(sel.sum())


def autocast(device: str, enabled: bool):
    """bf16 autocast on `device` when `enabled` (the weights are bf16 or nf4), else a no-op context."""
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


def evaluate_loss(loss_fn: AssistantLoss, model: Any, examples: list[Example], *, batch_size: int, pad_id: int,
                  device: str, bf16: bool, dist: Dist | None = None) -> float:
    """Mean assistant-token loss over `examples` (the fixed validation slice; under DDP each rank scores a share)."""
    import torch

    dist = dist or Dist()
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
    total, n = 0.0, 0
    with torch.no_grad(), autocast(device, bf16):
        for i in range(0, len(order), batch_size):
            if not dist.eval_share(i // batch_size):
                continue
            batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            s, k = loss_fn(batch, device)
            total += float(s)
            n += k
    model.train(was_training)
    total, n = dist.sum(total, n)
    return total / max(n, 1)
