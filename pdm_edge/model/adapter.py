"""The trainable part of a machine's model: LoRA on the frozen encoder plus a bottleneck head.

- **LoRA** (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): for each
  targeted linear layer ``W`` (default: the attention ``qkv`` and the MLP ``fc1`` of every
  block) the adapter adds ``(alpha / rank) * B A x`` with ``A`` of shape ``(rank, in)`` (Kaiming
  init) and ``B`` of shape ``(out, rank)`` (zeros), so a fresh adapter is exactly the frozen
  encoder. The encoder's tensors are never modified: :class:`~pdm_edge.model.encoder.Block`
  hands the adapter each targeted layer's input and output (``add_delta(layer, name, h,
  out)``), and the update is added into the output with one fused ``addmm`` (the rank-r
  product ``A x`` is the only temporary: the ``(tokens, out)`` update is never materialised,
  which made LoRA cost more than the int8 layers it sits on, ``benchmarks/score_throughput.py``).
- **Bottleneck head** (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
  ``t + up(GELU(down(t)))`` on every token state, ``down: dim -> bottleneck``, ``up`` zero-
  initialised. The head's output tokens are pooled into the machine's embedding and decoded by
  the frozen decoder for the self-supervised reconstruction objective.
- **Anomaly logit** (``logit``): a linear layer on the pooled embedding, zero-initialised,
  trained to tell the machine's normal windows from synthetic anomalies made from them
  (outlier exposure, :mod:`pdm_edge.model.synthetic`) and from windows a technician confirmed
  as faults; normal-labelled windows are negatives (Deep SAD-style use of labels, Ruff et al.
  2020).

With the defaults (rank 4, bottleneck 32) the adapter has 22,817 parameters, 4.17 % of the
encoder's 547,072 (decoder excluded); :func:`trainable_fraction` reports the exact figure.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from pdm_edge.model.encoder import Encoder

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of the adapter (saved in every model version).

    Attributes:
        rank: LoRA rank r (>= 1).
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``.
        targets: which linear layers of each block get LoRA (subset of ``LORA_TARGETS``).
        bottleneck: width of the bottleneck head.
        layers: LoRA goes into the last ``layers`` encoder blocks (``None``: every block). The
            blocks before them stay entirely frozen, so training neither stores their
            activations nor back-propagates through them: peak training memory and time fall
            with fewer layers (``benchmarks/train_memory.py``).
    """

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("qkv", "fc1")
    bottleneck: int = 32
    layers: int | None = None

    def __post_init__(self) -> None:
        if self.rank < 1 or self.bottleneck < 1:
            raise ValueError("rank and bottleneck must be >= 1")
        if self.layers is not None and self.layers < 0:
            raise ValueError(f"layers must be >= 0 or None, got {self.layers}")
        bad = set(self.targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
        object.__setattr__(self, "targets", tuple(self.targets))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        return cls(**{**d, "targets": tuple(d.get("targets", cls.targets))})


class Adapter(nn.Module):
    """LoRA matrices for the encoder's blocks plus the bottleneck head; the only trainable tensors."""

    def __init__(self, encoder: Encoder, cfg: AdapterConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AdapterConfig()
        self.scale = cfg.alpha / cfg.rank
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.first = first = 0 if cfg.layers is None else max(0, len(encoder.blocks) - cfg.layers)
        """Index of the first encoder block with LoRA: blocks before it are the frozen prefix."""
        for i, blk in enumerate(encoder.blocks):
            if i < first:
                continue
            for name in cfg.targets:
                lin: nn.Linear = getattr(blk, name)
                a = torch.empty(cfg.rank, lin.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_a[f"{i}_{name}"] = nn.Parameter(a)
                self.lora_b[f"{i}_{name}"] = nn.Parameter(torch.zeros(lin.out_features, cfg.rank))
        dim = encoder.cfg.dim
        self.down = nn.Linear(dim, cfg.bottleneck)
        self.up = nn.Linear(cfg.bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.logit = nn.Linear(dim, 1)
        nn.init.zeros_(self.logit.weight)
        nn.init.zeros_(self.logit.bias)

    def add_delta(self, layer: int, name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the LoRA update ``scale * B A h`` of ``name`` in block ``layer``.

        Args:
            h: the layer's input ``(..., in)``; out: its output ``(..., out)``, contiguous,
                which receives the update in place (autograd records it; the frozen layer's
                backward does not need its output).

        Returns:
            ``out`` (unchanged where ``name`` in block ``layer`` carries no LoRA).
        """
        key = f"{layer}_{name}"
        if key not in self.lora_a:
            return out
        low = nn.functional.linear(h.reshape(-1, h.shape[-1]), self.lora_a[key])  # (tokens, rank)
        out.view(-1, out.shape[-1]).addmm_(low, self.lora_b[key].t(), alpha=self.scale)
        return out

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck on token states ``(B, N, dim)`` -> same shape."""
        return tokens + self.up(nn.functional.gelu(self.down(tokens)))


class StackedAdapters:
    """Several machines' adapters applied in one forward pass of the shared frozen encoder:
    sample ``i`` of the batch goes through ``adapters[index[i]]`` (its LoRA updates and its
    bottleneck head), so windows of many streams are embedded in one batched call instead of
    one small call per stream. Inference only (no gradients).

    The per-sample updates are batched matrix products with each sample's own ``A`` and ``B``
    (``torch.bmm``): the same as :meth:`Adapter.delta` / :meth:`Adapter.head` one adapter at
    a time, to float32 rounding (``tests/test_detection.py``).

    Args:
        adapters: adapters of one configuration (the same LoRA keys and scale).
        index: ``(B,)`` int, which adapter each sample of the batch uses.

    Raises:
        ValueError: adapters of different configurations, or an index out of range.
    """

    def __init__(self, adapters: list[Adapter], index: torch.Tensor) -> None:
        first = adapters[0]
        if any(a.cfg != first.cfg for a in adapters):
            raise ValueError("stacked adapters must share one configuration")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(adapters)):
            raise ValueError("adapter index out of range")
        self.scale = first.scale
        with torch.no_grad():
            def gather(get: Any) -> torch.Tensor:
                return torch.stack([get(a).detach() for a in adapters])[index]

            self.a = {k: gather(lambda a, k=k: a.lora_a[k]).transpose(1, 2) for k in first.lora_a}  # (B, in, r)
            self.b = {k: gather(lambda a, k=k: a.lora_b[k]).transpose(1, 2) for k in first.lora_b}  # (B, r, out)
            self.down_w = gather(lambda a: a.down.weight).transpose(1, 2)  # (B, dim, bottleneck)
            self.down_b = gather(lambda a: a.down.bias)[:, None, :]
            self.up_w = gather(lambda a: a.up.weight).transpose(1, 2)  # (B, bottleneck, dim)
            self.up_b = gather(lambda a: a.up.bias)[:, None, :]

    def add_delta(self, layer: int, name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(B, N, out)`` plus each sample's LoRA update of ``name`` in block ``layer``
        for ``h`` ``(B, N, in)``, added in place (as :meth:`Adapter.add_delta`)."""
        key = f"{layer}_{name}"
        if key not in self.a:
            return out
        return out.baddbmm_(torch.bmm(h, self.a[key]), self.b[key], alpha=self.scale)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each sample's residual bottleneck on token states ``(B, N, dim)`` -> same shape."""
        hidden = nn.functional.gelu(torch.bmm(tokens, self.down_w) + self.down_b)
        return tokens + torch.bmm(hidden, self.up_w) + self.up_b


def trainable_fraction(adapter: Adapter, encoder: Encoder) -> float:
    """Trainable adapter parameters / encoder parameters (decoder excluded)."""
    n_enc = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("decoder"))
    return sum(p.numel() for p in adapter.parameters()) / n_enc
