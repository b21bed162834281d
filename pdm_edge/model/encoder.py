"""The frozen pretrained encoder: a small transformer over spectrogram patches.

Architecture (``EncoderConfig`` defaults; 547 k encoder + 141 k decoder parameters, shipped in
``models/``):

- Input: the standardised feature image of :mod:`pdm_edge.features`, shape ``(B, 2, 64, 32)``
  (channels x bands x frames), already z-scored per machine (per channel and band, with the
  statistics of the machine's own normal windows) so the encoder sees *deviation from this
  machine's normal*, whatever the sensor's absolute level. A learned embedding of the sensor
  kind (vibration / acoustic) is added to every token, because the second channel means
  different things for the two kinds (envelope spectrum vs. delta log-mel).
- Patches of 8 bands x 4 frames x 2 channels (64 values) -> 64 tokens, linear patch embedding
  to ``dim`` = 128, learned position embedding.
- ``depth`` = 4 pre-norm transformer blocks (4 heads, MLP ratio 2), final LayerNorm.
- Embedding: mean of the token states, ``(B, 128)``.
- Pretraining head (kept frozen with the encoder and used on the device as the self-supervised
  objective of the adapter): a 1-block decoder that reconstructs masked patches (SimMIM, Xie et
  al. 2022: masked tokens are replaced by a learned mask token and the loss is the MSE on the
  masked patches only; the masking follows MAE / AudioMAE, He et al. 2022, Huang et al. 2022).

Why a transformer over patches rather than a CNN: LoRA (Hu et al. 2021) applies directly to its
attention and MLP projections, so the on-device adapter is a handful of low-rank matrices
(with its bottleneck head, about 4 % of the encoder's parameters), and the patch tokens give the masked-reconstruction
objective a natural unit. At 64 tokens it costs well under a millisecond per window on one core.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from pdm_edge.features import INPUT_SHAPE

KINDS = ("vibration", "acoustic")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of the encoder; saved beside the weights so a file always rebuilds its network."""

    in_channels: int = INPUT_SHAPE[0]
    n_bands: int = INPUT_SHAPE[1]
    n_frames: int = INPUT_SHAPE[2]
    patch_bands: int = 8
    patch_frames: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    decoder_depth: int = 1

    @property
    def n_tokens(self) -> int:
        return (self.n_bands // self.patch_bands) * (self.n_frames // self.patch_frames)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_bands * self.patch_frames

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        return cls(**d)


class Block(nn.Module):
    """Pre-norm transformer block.

    ``qkv``, ``proj``, ``fc1`` and ``fc2`` are plain ``nn.Linear`` layers. An adapter (LoRA)
    adds its low-rank update to their outputs through ``add_delta(layer, name, x, out)``
    without touching their tensors, so one frozen encoder is shared by every machine's adapter.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, adapter: Any = None, layer: int = 0) -> torch.Tensor:
        def lin(name: str, h: torch.Tensor) -> torch.Tensor:
            out = getattr(self, name)(h)
            return out if adapter is None else adapter.add_delta(layer, name, h, out)

        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = lin("qkv", h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + lin("proj", a.transpose(1, 2).reshape(b, n, d))
        return x + lin("fc2", self.act(lin("fc1", self.norm2(x))))


class Encoder(nn.Module):
    """Patch transformer encoder with its masked-reconstruction decoder.

    ``forward(x, kind)``: ``x`` of shape ``(B, 2, 64, 32)`` float32 (standardised features),
    ``kind`` a ``LongTensor`` of shape ``(B,)`` (0 = vibration, 1 = acoustic) or an int; returns
    ``(B, dim)`` embeddings.
    """

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.dim))
        self.kind_embed = nn.Embedding(len(KINDS), cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.decoder = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.dim)
        self.decoder_out = nn.Linear(cfg.dim, cfg.patch_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- patches ---------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, T)`` -> ``(B, n_tokens, C * pf * pt)``."""
        c = self.cfg
        b = x.shape[0]
        x = x.reshape(b, c.in_channels, c.n_bands // c.patch_bands, c.patch_bands, c.n_frames // c.patch_frames, c.patch_frames)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, c.n_tokens, c.patch_dim)

    def _kind(self, kind: torch.Tensor | int, b: int, device: torch.device) -> torch.Tensor:
        if isinstance(kind, int):
            kind = torch.full((b,), kind, dtype=torch.long, device=device)
        return self.kind_embed(kind)[:, None, :]

    def tokens(self, x: torch.Tensor, kind: torch.Tensor | int, mask: torch.Tensor | None = None,
               adapter: Any = None) -> torch.Tensor:
        """Token states after the encoder blocks, ``(B, n_tokens, dim)``.

        Args:
            x: ``(B, 2, 64, 32)`` standardised features.
            kind: 0 (vibration) / 1 (acoustic), an int or a ``(B,)`` LongTensor.
            mask: optional ``(B, n_tokens)`` bool, True where a patch is hidden (replaced by the
                mask token) for the masked-reconstruction objective.
            adapter: optional object with ``add_delta(layer, name, h, out)`` (see :class:`Block`).
        """
        return self.norm(self.run_blocks(self.embed_patches(x, kind, mask), 0, adapter))

    def embed_patches(self, x: torch.Tensor, kind: torch.Tensor | int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states before the first block, ``(B, n_tokens, dim)``: patch embedding, mask
        token where ``mask`` is True, position and kind embeddings (arguments as :meth:`tokens`)."""
        t = self.patch_embed(self.patchify(x))
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.expand_as(t), t)
        return t + self.pos + self._kind(kind, t.shape[0], t.device)

    def run_blocks(self, t: torch.Tensor, start: int = 0, adapter: Any = None, stop: int | None = None,
                   checkpoint: bool = False) -> torch.Tensor:
        """Blocks ``start`` to ``stop`` (exclusive; None: the last) on token states ``t``
        ``(B, n_tokens, dim)``, without the final norm. ``checkpoint``: each block's activations
        are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``; less
        memory, one more forward per block)."""
        for i in range(start, len(self.blocks) if stop is None else stop):
            blk = self.blocks[i]
            if checkpoint and torch.is_grad_enabled():
                t = torch.utils.checkpoint.checkpoint(blk, t, adapter, i, use_reentrant=False)
            else:
                t = blk(t, adapter, i)
        return t

    def forward(self, x: torch.Tensor, kind: torch.Tensor | int) -> torch.Tensor:
        return self.tokens(x, kind).mean(dim=1)

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode token states to patches, ``(B, n_tokens, patch_dim)``."""
        t = tokens
        for blk in self.decoder:
            t = blk(t)
        return self.decoder_out(self.decoder_norm(t))

    def masked_loss(self, x: torch.Tensor, kind: torch.Tensor | int, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE on the masked patches, ``(B,)`` (the pretraining objective)."""
        return masked_error(self.reconstruct(self.tokens(x, kind, mask)), self.patchify(x), mask)


def masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches of each sample: ``(B, N, P)`` x2, ``(B, N)`` -> ``(B,)``."""
    err = (pred - target).pow(2).mean(dim=-1)
    m = mask.float()
    return (err * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def random_mask(b: int, n_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(b, n_tokens)`` bool with exactly ``round(ratio * n_tokens)`` True per row, uniformly placed."""
    k = max(1, int(math.floor(ratio * n_tokens + 0.5)))
    scores = torch.rand(b, n_tokens, generator=generator)
    idx = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(b, n_tokens, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def kind_index(kind: str) -> int:
    """0 for ``"vibration"``, 1 for ``"acoustic"``; ``ValueError`` otherwise."""
    try:
        return KINDS.index(kind)
    except ValueError:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}") from None
