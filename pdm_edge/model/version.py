"""Model-version files: a calibrated scorer's state, written atomically and hashed.

A model version holds the adapter (LoRA + head), the scorer configuration (features, adapter,
training, threshold rule), the per-machine standardisation, the embedding baseline, the score
standardisation, the threshold and the encoder's sha256 (DESIGN.md section 3). It is one file
written with ``torch.save`` and read with ``torch.load(weights_only=True)`` (tensors and plain
values only, no pickled code). Writing is atomic (:func:`pdm_edge._util.fs.atomic_write`: a
temporary file in the same directory, fsync, rename, fsync of the directory), so a crash or
power loss leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from pdm_edge._util.fs import atomic_write
from pdm_edge.errors import ModelError
from pdm_edge.model.encoder import Encoder
from pdm_edge.model.scorer import Scorer

FORMAT = "pdm-edge-model-version/1"


def save_version(path: str | os.PathLike[str], scorer: Scorer, metadata: dict[str, Any] | None = None) -> str:
    """Save a calibrated scorer as a model-version file; returns the file's sha256 (hex).

    Raises:
        NotCalibratedError: the scorer has not been calibrated.
    """
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state": scorer.state(), "metadata": dict(metadata or {})}, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_version(path: str | os.PathLike[str], encoder: Encoder, encoder_sha256: str, expected_sha256: str | None = None) -> Scorer:
    """Rebuild the scorer saved at ``path``.

    Args:
        path: the model-version file.
        encoder, encoder_sha256: the loaded frozen encoder and its file's sha256.
        expected_sha256: when given, the file's sha256 must match (registry integrity check).

    Raises:
        ModelError: missing or unreadable file, hash mismatch, unknown format, or a version made
            for another encoder.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model version {path}: {exc.strerror}") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ModelError(f"model version {path} does not match its recorded sha256 (corrupt or tampered)")
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ModelError(f"model version {path} is not readable: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelError(f"{path} is not a {FORMAT} file")
    return Scorer.from_state(encoder, encoder_sha256, obj["state"])
