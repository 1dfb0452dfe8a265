"""Training the target on fused distributions, with periodic checkpoints and exact resume.

The loss per answer token is ``lambda * CE(reference) + (1 - lambda) * KL(fused || model)``
(FuseLLM: lambda weighs the causal LM loss against the fusion loss). Everything a step depends on
is either restored from the checkpoint (weights, AdamW moments, scheduler, torch RNG) or a pure
function of the step number (which pairs form the batch: a seeded permutation per epoch), so a run
stopped after any checkpoint and resumed ends with the same weights, bit for bit, as one that never
stopped.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from evomerge.fuse.config import FusionSpec, TrainSpec
from evomerge.fuse.distributions import SourceDistributions, ce_weights, fuse_mince, fuse_weighted
from evomerge.zoo.train import optimizer

StepLog = Callable[[int, dict[str, float]], None]


@dataclass
class FuseData:
    """The training set in the target's tokens, and each source's distributions over it (plain tensors)."""

    ids: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], -100 outside answers
    sources: dict[str, SourceDistributions]  # empty for plain fine-tuning (lambda = 1)

    def __len__(self) -> int:
        return self.ids.shape[0]


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The pairs of step ``step``: consecutive slices of a seeded permutation, a new one each epoch."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {n} training pairs; lower it or add data")
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size: (k + 1) * batch_size]


def fused_targets(data: FuseData, rows: torch.Tensor, fusion: FusionSpec,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused distribution of each row of the batch (``[B, width, K]`` ids and probabilities)."""
    names = list(data.sources)
    idx = torch.stack([data.sources[s].indices[rows, :width] for s in names])
    p = torch.stack([data.sources[s].probs[rows, :width] for s in names])
    ce = torch.stack([data.sources[s].ce[rows] for s in names])
    if fusion.strategy == "mince":
        return fuse_mince(idx, p, ce)
    if fusion.weights == "ce":
        w = ce_weights(ce, fusion.temperature)
    else:
        w = torch.tensor([fusion.weights.get(s, 0.0) for s in names])
    return fuse_weighted(idx, p, w)


def fusion_loss(logits: torch.Tensor, labels: torch.Tensor, fused_idx: Optional[torch.Tensor],
                fused_p: Optional[torch.Tensor], lam: float) -> tuple[torch.Tensor, float, float]:
    """``lam * CE + (1 - lam) * KL(fused || model)`` averaged over answer tokens; also CE and KL alone.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; the fused row ``t`` describes the same token.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    valid = target != -100
    ce = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][valid].mean()
    if fused_idx is None or lam == 1.0:
        return ce, ce.item(), float("nan")
    if fused_p is None:
        raise ValueError("fusion_loss got fused_idx without fused_p; pass both (or neither, for plain CE)")
    p = fused_p[:, :-1]
    q = logp.gather(-1, fused_idx[:, :-1])
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    kl = (plogp - p * q).sum(-1)[valid].mean()
    return lam * ce + (1 - lam) * kl, ce.item(), kl.item()


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def _save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, history: list, keep: int) -> None:
    """Written to a temporary folder and renamed: a kill mid-write leaves the previous checkpoint intact."""
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "history": history},
               tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.pt").exists())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train_fused(model: torch.nn.Module, data: FuseData, spec: TrainSpec, fusion: FusionSpec, seed: int,
                ckpt_dir: Path, device: str | torch.device = "cpu", on_step: StepLog | None = None) -> list[dict]:
    """Train ``model`` in place for ``spec.steps`` steps, resuming from the latest checkpoint in ``ckpt_dir``.

    Returns the history: one dict per step (step, loss, ce, kl, lr). ``on_step`` is called after every
    step (and after the checkpoint of that step is written); an exception it raises stops the run
    there, which is how the tests simulate a kill.
    """
    torch.manual_seed(seed)
    opt, sched = optimizer(model, spec.lr, spec.weight_decay, spec.steps, spec.warmup)
    history: list[dict] = []
    start = 0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        state = torch.load(last / "state.pt", weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["step"]
    use_dist = spec.lam < 1.0 and bool(data.sources)
    model.train()
    for step in range(start, spec.steps):
        rows = batch_rows(len(data), spec.batch_size, seed, step)
        width = int(data.mask[rows].sum(1).max())
        ids, mask, labels = (t[rows, :width].to(device) for t in (data.ids, data.mask, data.labels))
        fidx = fp = None
        if use_dist:
            fidx, fp = (t.to(device) for t in fused_targets(data, rows, fusion, width))
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss, ce, kl = fusion_loss(logits, labels, fidx, fp, spec.lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": loss.item(), "ce": ce, "kl": None if math.isnan(kl) else kl,
                        "lr": sched.get_last_lr()[0]})
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps:
            _save_checkpoint(ckpt_dir, step + 1, model, opt, sched, history, spec.keep_checkpoints)
        if on_step is not None:
            on_step(step + 1, history[-1])
    model.eval()
    return history
