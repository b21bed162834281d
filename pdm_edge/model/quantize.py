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
(it needs no gradients); the adapted blocks and the decoder run float32, because dynamically
quantised linear layers have no backward pass in ``torch.ao``.

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

__all__ = ["INFERENCE_PATHS", "int8_encoder"]

INFERENCE_PATHS = ("float32", "int8")

_cache: weakref.WeakKeyDictionary[Encoder, Encoder] = weakref.WeakKeyDictionary()
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
