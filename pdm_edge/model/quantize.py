"""The int8 inference path: the frozen encoder with dynamically quantised linear layers.

:func:`int8_encoder` returns a copy of the frozen encoder whose ``nn.Linear`` layers (patch
embedding, attention and MLP projections of every block, decoder) are replaced by dynamically
quantised ones (``torch.ao.quantization.quantize_dynamic``, qint8 weights per tensor,
activations quantised per batch at run time; Jacob et al. 2018). The LoRA updates and the
bottleneck head stay float32 and are added to the quantised layers' outputs as before
(:class:`pdm_edge.model.encoder.Block`), so one quantised encoder serves every machine's
adapter. A scorer uses it when its ``ScorerConfig.inference`` is ``"int8"``; the model version
records that (its config), and calibration (baseline, held-out scores, threshold) runs through
the same path, so the threshold belongs to the scores the appliance computes.

In training, the frozen prefix below the first LoRA block runs through the int8 encoder too
(it needs no gradients). Dynamically quantised linear layers have no backward pass in
``torch.ao``, so the adapted blocks and the decoder train through :func:`fake_int8_encoder`
(quantisation-aware training, Jacob et al. 2018): the same int8 weights, dequantised, and each
layer's input rounded to the 7-bit unsigned grid that the x86 engine's dynamic quantisation
uses for that batch, with straight-through gradients (``torch.fake_quantize_per_tensor_affine``):
the forward pass the adapter trains on is the one it is scored with, to float rounding, and its
gradients are float.

``torch.ao.quantization`` eager mode is deprecated in favour of torchao (not installed here); it
still ships with torch and its deprecation warning is silenced here.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref

import torch
from torch import nn

from pdm_edge.model.encoder import Encoder

__all__ = ["INFERENCE_PATHS", "fake_int8_encoder", "int8_encoder"]

INFERENCE_PATHS = ("float32", "int8")

_cache: weakref.WeakKeyDictionary[Encoder, Encoder] = weakref.WeakKeyDictionary()
_fake_cache: weakref.WeakKeyDictionary[Encoder, Encoder] = weakref.WeakKeyDictionary()
ACT_QMAX = 127
"""Largest code of a dynamically quantised activation: quint8 with ``reduce_range`` (7 bits),
as the x86 / fbgemm engine quantises a linear layer's input."""
_lock = threading.Lock()


def int8_encoder(encoder: Encoder) -> Encoder:
    """The dynamically quantised copy of ``encoder`` (made once per encoder object and shared;
    eval mode, no gradients). The float encoder is not modified."""
    with _lock:
        q = _cache.get(encoder)
        if q is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder).eval(), {nn.Linear}, dtype=torch.qint8)
            for p in q.parameters():
                p.requires_grad_(False)
            _cache[encoder] = q
        return q


class FakeInt8Linear(nn.Module):
    """A linear layer as the int8 path computes it, differentiable in its input: ``x`` rounded
    per batch to the activation grid (affine, ``[0, ACT_QMAX]``, from the batch's min and max,
    both widened to include 0) times the dequantised int8 weight, plus the float bias. The
    rounding passes gradients straight through; the weight is a frozen buffer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
            scale = ((hi - lo) / ACT_QMAX).clamp(min=1e-8).reshape(1).float()
            zero = torch.round(-lo / scale).clamp(0, ACT_QMAX).reshape(1).to(torch.int32)
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, ACT_QMAX)
        return nn.functional.linear(xq, self.weight, self.bias)


def fake_int8_encoder(encoder: Encoder) -> Encoder:
    """The quantisation-aware training copy of ``encoder`` (made once per encoder object and
    shared; eval mode, no parameter gradients): every ``nn.Linear`` becomes a
    :class:`FakeInt8Linear` with the weights of :func:`int8_encoder`'s layer of the same name,
    so its forward pass matches the int8 path's and gradients flow to an adapter's LoRA
    updates (added to the layers' outputs, :class:`pdm_edge.model.encoder.Block`) and head.
    The float encoder is not modified."""
    q = int8_encoder(encoder)
    with _lock:
        f = _fake_cache.get(encoder)
        if f is None:
            f = copy.deepcopy(encoder).eval()
            qmods = dict(q.named_modules())
            for name, mod in list(f.named_modules()):
                for child, sub in list(mod.named_children()):
                    if isinstance(sub, nn.Linear):
                        ql = qmods[f"{name}.{child}" if name else child]
                        w = ql.weight().dequantize()
                        b = ql.bias()
                        setattr(mod, child, FakeInt8Linear(w.detach().clone(), None if b is None else b.detach().clone()))
            for p in f.parameters():
                p.requires_grad_(False)
            _fake_cache[encoder] = f
        return f
