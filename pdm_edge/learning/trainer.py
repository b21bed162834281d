"""The adapter's training loop (step 2 of :meth:`pdm_edge.model.scorer.Scorer.calibrate`).

One function, :func:`train_adapter`, that reads top to bottom (as nanoGPT's ``train.py``):
set-up (optimiser, generators, validation masks and synthetic anomalies), resume from a
checkpoint when given one, then epochs of shuffled batches with early stopping on the
validation loss and a wall-time budget, a checkpoint after every epoch, and the best state
loaded back at the end.

The objective, summed per batch:

- the self-supervised masked-patch reconstruction through the frozen decoder
  (:func:`pdm_edge.model.encoder.masked_error` on :func:`~pdm_edge.model.encoder.random_mask`
  masks of ``mask_ratio``);
- outlier exposure (Hendrycks et al. 2019), weighted by ``outlier_exposure``: the adapter's
  anomaly logit separates the batch's normal windows (negatives) from synthetic anomalies made
  from them (:mod:`pdm_edge.model.synthetic`) and from windows a technician confirmed as
  faults (positives; Deep SAD-style use of labels, Ruff et al. 2020).

Only adapter parameters have gradients; the encoder stays bit-identical.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pdm_edge.model.encoder import masked_error, random_mask
from pdm_edge.model.scorer import NO_GRAD_BATCH, TrainingInterrupted
from pdm_edge.model.synthetic import synthetic_anomalies

if TYPE_CHECKING:
    from pdm_edge.model.scorer import Scorer

__all__ = ["train_adapter"]


def train_adapter(scorer: Scorer, tr: np.ndarray, va: np.ndarray, faults: np.ndarray | None = None, *,
                  checkpoint: Callable[[dict[str, Any]], None] | None = None, resume: dict[str, Any] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[dict[str, float]]:
    """Train ``scorer.adapter`` in place and leave it at its best validation state.

    Args:
        scorer: the scorer whose fresh adapter trains (its encoder stays frozen); its
            ``config.train`` (:class:`~pdm_edge.model.scorer.TrainConfig`) sets the loop.
        tr, va: standardised feature images ``(N, 2, 64, 32)`` float32 of the training and the
            validation windows (time order; validation after training).
        faults: standardised feature images of labelled fault windows (outlier-exposure
            positives), or None.
        checkpoint: called after every epoch with the training state (``epoch``, ``adapter``,
            ``optimizer``, ``best``, ``best_state``, ``bad``, ``history``, ``elapsed_s``; tensors
            and plain values) for the caller to write atomically.
        resume: such a state: training continues after its epoch.
        should_stop: polled before every batch; when it returns True the half-done epoch is
            rolled back, the state after the last finished epoch goes to ``checkpoint`` and
            :class:`~pdm_edge.model.scorer.TrainingInterrupted` is raised.

    Returns:
        the history: one ``{"epoch", "train_loss", "val_loss"}`` per epoch (epoch 0: before
        training).

    Raises:
        TrainingInterrupted: ``should_stop`` asked to stop.
    """
    # -- set-up ------------------------------------------------------------------------------
    tc = scorer.config.train
    adapter, encoder = scorer.adapter, scorer.encoder
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    n_tok = encoder.cfg.n_tokens
    xt, xv = torch.from_numpy(tr), torch.from_numpy(va)
    xf = None if faults is None or not len(faults) else torch.from_numpy(faults)
    val_masks = [random_mask(len(xv), n_tok, tc.mask_ratio, torch.Generator().manual_seed(tc.seed + 1 + i)) for i in range(2)]
    oe = tc.outlier_exposure
    xv_syn = synthetic_anomalies(xv, scorer.config.kind, torch.Generator().manual_seed(tc.seed + 7)) if oe > 0 else None
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def oe_loss(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
        """Outlier exposure: normal windows are negatives, anomalous ones positives."""
        z = adapter.logit(scorer._tokens(torch.cat([normal, anomalous])).mean(dim=1))[:, 0]
        y = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))])
        return bce(z, y)

    def val_loss() -> float:
        # in chunks of NO_GRAD_BATCH windows: the peak memory of a validation pass stays below
        # that of a training step
        with torch.no_grad():
            errs = []
            for m in val_masks:
                for i in range(0, len(xv), NO_GRAD_BATCH):
                    xb, mb = xv[i:i + NO_GRAD_BATCH], m[i:i + NO_GRAD_BATCH]
                    errs.append(masked_error(encoder.reconstruct(scorer._tokens(xb, mb)), encoder.patchify(xb), mb))
            loss = float(torch.cat(errs).mean()) if errs else float("nan")
            if oe > 0:
                parts = [float(oe_loss(xv[i:i + NO_GRAD_BATCH], xv_syn[i:i + NO_GRAD_BATCH])) * len(xv[i:i + NO_GRAD_BATCH])  # type: ignore[index]
                         for i in range(0, len(xv), NO_GRAD_BATCH)]
                loss += oe * sum(parts) / max(1, len(xv))
            return loss

    def snapshot(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "adapter": copy.deepcopy(adapter.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                "best": best, "best_state": best_state, "bad": bad, "history": list(history),
                "elapsed_s": elapsed0 + time.monotonic() - t0}

    # -- start or resume ---------------------------------------------------------------------
    start, elapsed0 = 1, 0.0
    if resume is not None:
        adapter.load_state_dict(resume["adapter"])
        opt.load_state_dict(resume["optimizer"])
        best, best_state, bad = float(resume["best"]), resume["best_state"], int(resume["bad"])
        history, start, elapsed0 = list(resume["history"]), int(resume["epoch"]) + 1, float(resume["elapsed_s"])
        for _ in range(1, start):  # the same data order and masks as an uninterrupted run
            rng.permutation(len(xt))
    else:
        best, best_state, bad, history = val_loss(), copy.deepcopy(adapter.state_dict()), 0, []
        history.append({"epoch": 0, "train_loss": float("nan"), "val_loss": best})
    t0 = time.monotonic()

    # -- epochs --------------------------------------------------------------------------------
    stopped = bad >= tc.patience or elapsed0 > tc.max_seconds
    for ep in range(start, tc.max_epochs + 1):
        if stopped:
            break
        epoch_start = copy.deepcopy(adapter.state_dict()), copy.deepcopy(opt.state_dict())
        perm = rng.permutation(len(xt))
        tot = 0.0
        for b in range(0, len(perm), tc.batch):
            if should_stop is not None and should_stop():
                # resume from the last finished epoch: roll back the half-done one
                adapter.load_state_dict(epoch_start[0])
                opt.load_state_dict(epoch_start[1])
                if checkpoint is not None:
                    checkpoint(snapshot(ep - 1))
                raise TrainingInterrupted(f"adapter training stopped at epoch {ep} of {tc.max_epochs} (checkpoint kept)")
            j = torch.from_numpy(perm[b:b + tc.batch])
            x = xt[j]
            mask = random_mask(len(j), n_tok, tc.mask_ratio, gen)
            loss = masked_error(encoder.reconstruct(scorer._tokens(x, mask)), encoder.patchify(x), mask).mean()
            if oe > 0:
                pos = synthetic_anomalies(x, scorer.config.kind, gen)
                if xf is not None:  # confirmed faults join the positives
                    pos = torch.cat([pos, xf[torch.randint(len(xf), (max(1, len(j) // 4),), generator=gen)]])
                loss = loss + oe * oe_loss(x, pos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(j)
        vl = val_loss()
        history.append({"epoch": ep, "train_loss": tot / len(xt), "val_loss": vl})
        if vl < best - 1e-5:
            best, best_state, bad = vl, copy.deepcopy(adapter.state_dict()), 0
        else:
            bad += 1
        stopped = bad >= tc.patience or elapsed0 + time.monotonic() - t0 > tc.max_seconds
        if checkpoint is not None:
            checkpoint(snapshot(ep))

    # -- the best state ------------------------------------------------------------------------
    adapter.load_state_dict(best_state)
    return history
