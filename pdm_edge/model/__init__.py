"""The model: frozen pretrained encoder (``models/encoder.pt``), adapter, scorer, model versions.

:func:`load_encoder` is the one way to get the frozen encoder: it checks the weights file's
sha256 against the one recorded beside it in ``models/encoder.json`` before loading it with
``torch.load(weights_only=True)``, and returns it in eval mode with gradients off.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from pdm_edge.errors import ModelError
from pdm_edge.model.encoder import Encoder, EncoderConfig

MODELS_DIR = Path(os.environ.get("PDM_EDGE_MODELS", Path(__file__).resolve().parents[2] / "models"))
DEFAULT_ENCODER = MODELS_DIR / "encoder.pt"


def load_encoder(path: str | os.PathLike[str] | None = None) -> tuple[Encoder, str]:
    """Load the frozen encoder and return ``(encoder, sha256 of its weights file)``.

    Args:
        path: the weights file; its card ``<stem>.json`` must lie beside it.

    Raises:
        ModelError: missing file or card, sha256 mismatch, or weights that do not fit the
            architecture in the card.
    """
    path = Path(path or DEFAULT_ENCODER)
    card_path = path.with_suffix(".json")
    try:
        data = path.read_bytes()
        card = json.loads(card_path.read_text())
    except OSError as exc:
        raise ModelError(f"cannot read encoder {path} or its card {card_path.name}: {exc.strerror}; run models/pretrain.py") from None
    except ValueError as exc:
        raise ModelError(f"encoder card {card_path} is not valid JSON: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.get("sha256"):
        raise ModelError(f"encoder {path} sha256 {digest[:12]}... does not match its card ({str(card.get('sha256'))[:12]}...)")
    try:
        enc = Encoder(EncoderConfig.from_dict(card["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"encoder card {card_path} has no valid architecture: {exc!r}") from None
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # the weights-only unpickler raises several types for a non-torch file
        raise ModelError(f"encoder {path} is not a readable torch weights file: {exc!r}") from None
    try:
        enc.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"encoder {path} does not fit its card's architecture: {exc}") from None
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc, digest
