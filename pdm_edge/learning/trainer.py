"""The adapter's training loop (step 2 of :meth:`pdm_edge.model.scorer.Scorer.calibrate`).

One function, :func:`train_adapter`, that reads top to bottom (as nanoGPT's ``train.py``):
set-up (optimiser, generators, memory plan, frozen-prefix cache, validation masks and
synthetic anomalies), resume from a checkpoint when given one, then epochs of shuffled batches
with early stopping on the validation loss, a budget of optimiser steps and a wall-time budget
(both checked before every batch: when one is spent the epoch ends early, is validated, and
training stops), a checkpoint after every epoch, and the best state loaded back at the end.

The objective, summed per batch:

- the self-supervised masked-patch reconstruction through the frozen decoder
  (:func:`pdm_edge.model.encoder.masked_error` on :func:`~pdm_edge.model.encoder.random_mask`
  masks of ``mask_ratio``);
- outlier exposure (Hendrycks et al. 2019), weighted by ``outlier_exposure``: the adapter's
  anomaly logit separates the batch's normal windows (negatives) from synthetic anomalies made
  from them (:mod:`pdm_edge.model.synthetic`) and from windows a technician confirmed as
  faults (positives; Deep SAD-style use of labels, Ruff et al. 2020);
- with ``proximal_mu`` > 0 (a fleet round run with FedProx, Li et al. 2020), the proximal term
  ``mu/2 * ||theta - theta_0||^2`` towards the adapter training started from (its gradient is
  added to each batch's; the reported losses leave it out).

Only adapter parameters have gradients; the encoder stays bit-identical. On the int8 inference
path (``ScorerConfig.inference = "int8"``) training is quantisation-aware: the encoder's linear
layers run as the int8 path computes them (:func:`pdm_edge.model.quantize.fake_int8_encoder`),
so the adapter is trained on the forward pass it is scored with.

Memory (``TrainConfig``; ``benchmarks/train_memory.py`` measures each option):

- **frozen-prefix cache** (``prefix_cache``, ``cache_views``): when LoRA sits in the top blocks
  only, the blocks below run once per window per job under ``torch.no_grad()`` (as TinyTL and
  Ladder Side-Tuning avoid keeping the frozen part's activations) and their outputs are kept:
  each window's clean tokens and, for ``cache_views`` fixed draws, its masked tokens and its
  synthetic anomaly (epoch ``e`` uses draw ``e % cache_views``, so the masks and anomalies no
  longer change every epoch). Kept in memory, or in a file of the job's directory read row by
  row when the memory envelope asks for it (plain reads, not a memory map: mapped pages would
  count in the process's resident memory);
- **gradient checkpointing** of the adapted blocks (``grad_checkpointing``);
- **micro-batches** with gradient accumulation (``micro_batch``);
- **optimiser** ``adamw`` or ``sgd`` (no momentum, no state). 8-bit optimiser states
  (bitsandbytes) are not offered: the adapter's AdamW states are about 180 KiB, so they would
  save under 150 KiB, and bitsandbytes is not installed here and its 8-bit optimisers are
  built for accelerators (CUDA), not this CPU-only appliance;
- **envelope** ``max_memory_mb``: :func:`plan_memory` estimates the activations of one window's
  pass and the cache's bytes, picks the micro-batch and the cache's place, and refuses with a
  :class:`~pdm_edge.errors.ModelError` that says what would fit when one window does not.

A checkpoint carries the torch and numpy generator states, so a job interrupted and resumed
from its checkpoint ends with exactly the adapter an uninterrupted job ends with.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pdm_edge.errors import ModelError, TrainingInterrupted
from pdm_edge.model.encoder import masked_error, random_mask
from pdm_edge.model.quantize import fake_int8_encoder
from pdm_edge.model.scorer import NO_GRAD_BATCH
from pdm_edge.model.synthetic import synthetic_anomalies

if TYPE_CHECKING:
    from pdm_edge.model.scorer import Scorer, TrainConfig

__all__ = ["MemoryPlan", "plan_memory", "train_adapter"]

FAULTS_PER_BATCH = 4
"""A batch of B normal windows draws ``max(1, B // FAULTS_PER_BATCH)`` labelled fault windows."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How a training job fits its memory envelope (:func:`plan_memory`); bytes."""

    micro_batch: int
    cache_rows: int
    cache_bytes: int
    cache_in_memory: bool
    pass_bytes_per_window: int
    envelope_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_memory(tc: TrainConfig, *, depth: int, first: int, decoder_depth: int, n_tokens: int, dim: int, heads: int,
                n_train: int, n_faults: int) -> MemoryPlan:
    """Micro-batch and prefix-cache placement for a job.

    Estimate (float32): a block keeps about ``13 * dim + heads * n_tokens`` values per token
    for its backward pass (norms, projections, MLP, attention weights); with gradient
    checkpointing an adapted block keeps only its input (``dim`` per token) and recomputes one
    block at a time. A window's pass goes through the adapted blocks and the decoder once for
    the reconstruction and through the adapted blocks for itself, its synthetic anomaly and a
    share of fault windows for outlier exposure. The cache holds ``(1 + 2 * cache_views)`` rows
    per training window and one per fault window, ``n_tokens * dim`` float32 each.

    Raises:
        ModelError: ``max_memory_mb`` is set and a single window's pass does not fit in it
            (after moving the cache to a file).
    """
    row = n_tokens * dim * 4
    block = n_tokens * (13 * dim + heads * n_tokens) * 4
    adapted = depth - first
    oe_windows = 2.0 + 1.0 / FAULTS_PER_BATCH if tc.outlier_exposure > 0 else 0.0
    kept = adapted * (row if tc.grad_checkpointing else block) * (1.0 + oe_windows) + decoder_depth * block
    transient = block * (1.0 + oe_windows) if tc.grad_checkpointing else 0.0
    per_window = int(kept + transient)
    rows = n_train * (1 + 2 * tc.cache_views) + n_faults if first > 0 and tc.prefix_cache else 0
    cache = rows * row
    micro = min(tc.micro_batch or tc.batch, tc.batch)
    if tc.max_memory_mb <= 0:
        return MemoryPlan(micro, rows, cache, True, per_window, None)
    budget = int(tc.max_memory_mb * 2**20)
    in_memory = cache <= budget // 2
    fit = (budget - (cache if in_memory else 0)) // per_window
    if fit < 1:
        raise ModelError(f"training does not fit [learning] max_memory_mb = {tc.max_memory_mb:g}: one window's pass needs about "
                         f"{per_window / 2**20:.1f} MiB ({adapted} adapted block(s), gradient checkpointing "
                         f"{'on' if tc.grad_checkpointing else 'off'}); raise max_memory_mb, turn on grad_checkpointing "
                         "or put LoRA in fewer blocks")
    return MemoryPlan(min(micro, int(fit)), rows, cache, in_memory, per_window, budget)


class _Rows:
    """Token states ``(n, n_tokens, dim)`` float32 kept in memory or in a file (read row by row)."""

    def __init__(self, n: int, shape: tuple[int, int], path: Path | None) -> None:
        self.shape, self.row = shape, int(np.prod(shape)) * 4
        self.mem = np.empty((n, *shape), np.float32) if path is None else None
        self.fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def put(self, i0: int, x: torch.Tensor) -> None:
        a = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        if self.mem is not None:
            self.mem[i0:i0 + len(a)] = a
        else:
            os.pwrite(self.fd, a.tobytes(), i0 * self.row)  # type: ignore[arg-type]

    def take(self, idx: np.ndarray) -> torch.Tensor:
        if self.mem is not None:
            return torch.from_numpy(self.mem[idx])
        out = np.empty((len(idx), *self.shape), np.float32)
        for k, i in enumerate(idx):
            out[k] = np.frombuffer(os.pread(self.fd, self.row, int(i) * self.row), np.float32).reshape(self.shape)  # type: ignore[arg-type]
        return torch.from_numpy(out)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def train_adapter(scorer: Scorer, tr: np.ndarray, va: np.ndarray, faults: np.ndarray | None = None, *,
                  checkpoint: Callable[[dict[str, Any]], None] | None = None, resume: dict[str, Any] | None = None,
                  should_stop: Callable[[], bool] | None = None, work_dir: str | os.PathLike[str] | None = None,
                  on_plan: Callable[[MemoryPlan], None] | None = None,
                  augment: Callable[[np.ndarray, torch.Tensor, np.random.Generator], torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Train ``scorer.adapter`` in place and leave it at its best validation state.

    Args:
        scorer: the scorer whose fresh adapter trains (its encoder stays frozen); its
            ``config.train`` (:class:`~pdm_edge.model.scorer.TrainConfig`) sets the loop.
        tr, va: standardised feature images ``(N, 2, 64, 32)`` float32 of the training and the
            validation windows (time order; validation after training).
        faults: standardised feature images of labelled fault windows (outlier-exposure
            positives), or None.
        checkpoint: called after every epoch with the training state (``epoch``, ``adapter``,
            ``optimizer``, ``best``, ``best_state``, ``bad``, ``history``, ``elapsed_s``, ``steps``,
            ``torch_rng``, ``numpy_rng``; tensors and plain values) for the caller to write
            atomically.
        resume: such a state: training continues after its epoch, with its generator states.
        should_stop: polled before every batch; when it returns True the half-done epoch is
            rolled back, the state after the last finished epoch goes to ``checkpoint`` and
            :class:`~pdm_edge.errors.TrainingInterrupted` is raised.
        work_dir: where a prefix cache that does not fit the memory envelope is spilled (a
            temporary file, removed at the end); the system's temporary directory when None.
        on_plan: receives the :class:`MemoryPlan` before training starts.
        augment: ``(window indices, standardised batch, numpy generator) -> batch`` applied to
            every training batch (:class:`pdm_edge.learning.augment.Augmenter`: replay windows
            only); with the prefix cache, to each cached view once.

    Returns:
        the history: one ``{"epoch", "train_loss", "val_loss"}`` per epoch (epoch 0: before
        training).

    Raises:
        TrainingInterrupted: ``should_stop`` asked to stop.
        ModelError: the job does not fit ``max_memory_mb`` (:func:`plan_memory`).
    """
    # -- set-up ------------------------------------------------------------------------------
    tc = scorer.config.train
    adapter, kind = scorer.adapter, scorer.kind
    # the int8 path trains quantisation-aware: the forward pass it is scored with, float gradients
    encoder = fake_int8_encoder(scorer.encoder) if scorer.config.inference == "int8" else scorer.encoder
    ecfg = encoder.cfg
    n_tok = ecfg.n_tokens
    first = adapter.first if tc.prefix_cache else 0  # blocks [0, first) are the frozen prefix
    params = [p for p in adapter.parameters() if p.requires_grad]
    # FedProx's anchor: the adapter training starts from (the fleet prior when there is one)
    anchor = [p.detach().clone() for p in params] if tc.proximal_mu > 0 else None
    if tc.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    xt, xv = torch.from_numpy(tr), torch.from_numpy(va)
    xf = None if faults is None or not len(faults) else torch.from_numpy(faults)
    plan = plan_memory(tc, depth=ecfg.depth, first=first, decoder_depth=ecfg.decoder_depth, n_tokens=n_tok, dim=ecfg.dim,
                       heads=ecfg.heads, n_train=len(xt), n_faults=0 if xf is None else len(xf))
    if on_plan is not None:
        on_plan(plan)
    val_masks = [random_mask(len(xv), n_tok, tc.mask_ratio, torch.Generator().manual_seed(tc.seed + 1 + i)) for i in range(2)]
    oe = tc.outlier_exposure
    xv_syn = synthetic_anomalies(xv, scorer.config.kind, torch.Generator().manual_seed(tc.seed + 7)) if oe > 0 else None
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def top(t: torch.Tensor) -> torch.Tensor:
        """The adapted part: blocks from ``first`` on, the final norm and the head."""
        return adapter.head(encoder.norm(encoder.run_blocks(t, first, adapter, checkpoint=tc.grad_checkpointing)))

    def prefix(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen prefix (token states entering block ``first``), through the scoring path's
        encoder (int8 when the scorer's ``inference`` is); no autograd graph."""
        with torch.no_grad():
            return scorer.infer_encoder.run_blocks(scorer.infer_encoder.embed_patches(x, kind, mask), 0, adapter, stop=first)

    def oe_loss(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
        """Outlier exposure: normal windows are negatives, anomalous ones positives."""
        z = adapter.logit(scorer._tokens(torch.cat([normal, anomalous])).mean(dim=1))[:, 0]
        y = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))])
        return bce(z, y)

    # validation in chunks of NO_GRAD_BATCH windows, or of the micro-batch when micro-batches are
    # on: the peak memory of a validation pass stays below that of a training step
    vb = min(NO_GRAD_BATCH, plan.micro_batch) if plan.micro_batch < tc.batch else NO_GRAD_BATCH

    def val_loss() -> float:
        with torch.no_grad():
            errs = []
            for m in val_masks:
                for i in range(0, len(xv), vb):
                    xb, mb = xv[i:i + vb], m[i:i + vb]
                    errs.append(masked_error(encoder.reconstruct(scorer._tokens(xb, mb)), encoder.patchify(xb), mb))
            loss = float(torch.cat(errs).mean()) if errs else float("nan")
            if oe > 0:
                parts = [float(oe_loss(xv[i:i + vb], xv_syn[i:i + vb])) * len(xv[i:i + vb])  # type: ignore[index]
                         for i in range(0, len(xv), vb)]
                loss += oe * sum(parts) / max(1, len(xv))
            return loss

    # -- the frozen-prefix cache: the frozen blocks run once per window per job -------------------
    tmp = None
    cache: dict[str, Any] = {}
    if plan.cache_rows:
        tmp = tempfile.TemporaryDirectory(prefix="pdm-edge-prefix-", dir=work_dir)
        spill = None if plan.cache_in_memory else Path(tmp.name)

        def store(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> _Rows:
            rows = _Rows(len(x), (n_tok, ecfg.dim), None if spill is None else spill / f"{name}.f32")
            for i in range(0, len(x), NO_GRAD_BATCH):
                rows.put(i, prefix(x[i:i + NO_GRAD_BATCH], None if mask is None else mask[i:i + NO_GRAD_BATCH]))
            return rows

        cache["clean"] = store("clean", xt)
        cache["faults"] = store("faults", xf) if xf is not None else None
        for v in range(tc.cache_views):
            g = torch.Generator().manual_seed(tc.seed + 100 + v)  # fixed draws: the same on resume
            xa = augment(np.arange(len(xt)), xt, np.random.default_rng(tc.seed + 100 + v)) if augment is not None else xt
            m = random_mask(len(xt), n_tok, tc.mask_ratio, g)
            cache[f"mask{v}"] = m
            cache[f"target{v}"] = xa if augment is not None else None
            cache[f"masked{v}"] = store(f"masked{v}", xa, m)
            if oe > 0:
                cache[f"syn{v}"] = store(f"syn{v}", torch.cat([synthetic_anomalies(xa[i:i + NO_GRAD_BATCH], scorer.config.kind, g)
                                                               for i in range(0, len(xa), NO_GRAD_BATCH)]))

    def batch_loss(j: np.ndarray, ep: int) -> float:
        """Forward and backward of one batch (in micro-batches; gradients accumulate); its loss."""
        b = len(j)
        jt = torch.from_numpy(j)
        view = (ep - 1) % tc.cache_views
        if cache:  # the reconstruction target of the view (augmented once when it was cached)
            x = xt[jt] if cache[f"target{view}"] is None else cache[f"target{view}"][jt]
        else:
            x = xt[jt] if augment is None else augment(j, xt[jt], rng)
        mask = cache[f"mask{view}"][jt] if cache else random_mask(b, n_tok, tc.mask_ratio, gen)
        syn = synthetic_anomalies(x, scorer.config.kind, gen) if oe > 0 and not cache else None
        fidx = torch.randint(len(xf), (max(1, b // FAULTS_PER_BATCH),), generator=gen) if oe > 0 and xf is not None else None
        n_pos = b + (0 if fidx is None else len(fidx))
        chunks = list(range(0, b, plan.micro_batch))
        fchunks = np.array_split(np.arange(0 if fidx is None else len(fidx)), len(chunks))
        total = 0.0
        for k, m0 in enumerate(chunks):
            sl = slice(m0, m0 + plan.micro_batch)
            js = j[sl]
            t_in = cache[f"masked{view}"].take(js) if cache else encoder.embed_patches(x[sl], kind, mask[sl])
            loss = masked_error(encoder.reconstruct(top(t_in)), encoder.patchify(x[sl]), mask[sl]).sum() / b
            if oe > 0:
                if cache:
                    parts = [cache["clean"].take(js), cache[f"syn{view}"].take(js)]
                    if fidx is not None and len(fchunks[k]):
                        parts.append(cache["faults"].take(fidx[fchunks[k]].numpy()))
                    t_oe = torch.cat(parts)
                else:
                    parts = [x[sl], syn[sl]]  # type: ignore[index]
                    if fidx is not None and len(fchunks[k]):
                        parts.append(xf[fidx[fchunks[k]]])  # type: ignore[index]
                    t_oe = encoder.embed_patches(torch.cat(parts), kind)
                n_neg = len(js)
                z = adapter.logit(top(t_oe).mean(dim=1))[:, 0]
                y = torch.cat([torch.zeros(n_neg), torch.ones(len(z) - n_neg)])
                loss = loss + oe * bce(z, y, reduction="sum") / (b + n_pos)
            loss.backward()
            total += float(loss.detach())
        return total

    def snapshot(epoch: int, rng_states: tuple[torch.Tensor, dict[str, Any]], steps_done: int) -> dict[str, Any]:
        return {"epoch": epoch, "adapter": copy.deepcopy(adapter.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                "best": best, "best_state": best_state, "bad": bad, "history": list(history),
                "elapsed_s": elapsed0 + time.monotonic() - t0, "steps": steps_done,
                "torch_rng": rng_states[0], "numpy_rng": rng_states[1]}

    def rng_now() -> tuple[torch.Tensor, dict[str, Any]]:
        return gen.get_state(), copy.deepcopy(rng.bit_generator.state)

    # -- start or resume ---------------------------------------------------------------------
    start, elapsed0, steps = 1, 0.0, 0
    if resume is not None:
        adapter.load_state_dict(resume["adapter"])
        opt.load_state_dict(resume["optimizer"])
        best, best_state, bad = float(resume["best"]), resume["best_state"], int(resume["bad"])
        history, start, elapsed0 = list(resume["history"]), int(resume["epoch"]) + 1, float(resume["elapsed_s"])
        # a checkpoint written before steps were counted: every finished epoch was a whole one
        steps = int(resume.get("steps", (start - 1) * -(-len(xt) // tc.batch)))
        if "torch_rng" in resume:
            gen.set_state(resume["torch_rng"])
            rng.bit_generator.state = resume["numpy_rng"]
        else:  # a checkpoint written before the generator states were kept: the same data order
            for _ in range(1, start):
                rng.permutation(len(xt))
    else:
        best, best_state, bad, history = val_loss(), copy.deepcopy(adapter.state_dict()), 0, []
        history.append({"epoch": 0, "train_loss": float("nan"), "val_loss": best})
    t0 = time.monotonic()

    # -- epochs --------------------------------------------------------------------------------
    try:
        stopped = bad >= tc.patience or steps >= tc.max_steps or elapsed0 > tc.max_seconds
        for ep in range(start, tc.max_epochs + 1):
            if stopped:
                break
            epoch_start = copy.deepcopy(adapter.state_dict()), copy.deepcopy(opt.state_dict()), rng_now(), steps
            perm = rng.permutation(len(xt))
            tot, seen = 0.0, 0
            for b in range(0, len(perm), tc.batch):
                if b and (steps >= tc.max_steps or elapsed0 + time.monotonic() - t0 > tc.max_seconds):
                    break  # a spent budget ends the epoch early: it is validated, and training stops
                if should_stop is not None and should_stop():
                    # resume from the last finished epoch: roll back the half-done one
                    adapter.load_state_dict(epoch_start[0])
                    opt.load_state_dict(epoch_start[1])
                    if checkpoint is not None:
                        checkpoint(snapshot(ep - 1, epoch_start[2], epoch_start[3]))
                    raise TrainingInterrupted(f"adapter training stopped at epoch {ep} of {tc.max_epochs} (checkpoint kept)")
                j = perm[b:b + tc.batch]
                opt.zero_grad(set_to_none=True)
                loss = batch_loss(j, ep)
                if anchor is not None:  # FedProx: + the gradient mu * (theta - theta_0) of its proximal term
                    for p, p0 in zip(params, anchor):
                        g = tc.proximal_mu * (p.detach() - p0)
                        p.grad = g if p.grad is None else p.grad.add_(g)
                opt.step()
                steps += 1
                tot, seen = tot + loss * len(j), seen + len(j)
            vl = val_loss()
            history.append({"epoch": ep, "train_loss": tot / seen, "val_loss": vl})
            if vl < best - 1e-5:
                best, best_state, bad = vl, copy.deepcopy(adapter.state_dict()), 0
            else:
                bad += 1
            stopped = bad >= tc.patience or steps >= tc.max_steps or elapsed0 + time.monotonic() - t0 > tc.max_seconds
            if checkpoint is not None:
                checkpoint(snapshot(ep, rng_now(), steps))
    finally:
        for c in cache.values():
            if isinstance(c, _Rows):
                c.close()
        if tmp is not None:
            tmp.cleanup()

    # -- the best state ------------------------------------------------------------------------
    adapter.load_state_dict(best_state)
    return history
