"""The model registry: every trained adapter of a sensor stream as a versioned, hashed file.

A :class:`Registry` lives in one directory::

    registry.sqlite        the index (SQLite, WAL, full sync): one row per model version
    versions/{id}.pt       the version files (pdm_edge.model.version.save_version, atomic)

Every version belongs to one stream (site/machine/sensor) and has an id
(``{machine}-{sensor}-v{n}``), a parent, a trigger, a creation time, a summary of its training
data, the metrics of the gate, the sha256 and size of its file, and a status:

- ``candidate``: trained (or imported), not yet judged;
- ``active``: the one version that scores the stream (at most one per stream, enforced by a
  unique index, and changed in one transaction);
- ``rejected``: failed the gate (the reason says which check);
- ``retired``: was active, replaced by a newer version or rolled back.

The gate (:func:`gate`, DESIGN.md section 3): a candidate is promoted only if its false-alarm
rate on held-back normal windows is not worse than the active version's by more than a margin
and it scores every labelled fault window above its own threshold. :meth:`Registry.submit`
adds a candidate, gates it, and promotes or rejects it with the reason.

Listeners registered with :meth:`Registry.on_change` get the new active version after every
promotion or rollback, so a running scorer can swap models without a restart.

Export/import (:meth:`Registry.export`, :meth:`Registry.import_package`): one zip holding the
version file and ``manifest.json`` (id, stream, configuration summary, sha256 of every file,
the encoder's sha256, format), plus ``manifest.sig`` (Ed25519 over the manifest's bytes) when
signed. Import verifies the hashes, the signature and the encoder before anything is stored;
imported versions enter as candidates.

Trust comes from the configuration (issue 15): a registry opened with trusted keys
(:meth:`Registry.from_config` reads ``[registry] verify_key``, one key or a list, each a PEM file
path or the PEM text) refuses, on import, a package that is unsigned, tampered with (the
signature no longer verifies) or signed by a key it does not trust, whatever the caller passes.
Version ids are validated like names (:data:`VERSION_ID_RE`: ``[A-Za-z0-9_-]``, at most 160
characters; a package whose manifest id is ``..`` or holds a path separator is refused), and
every manifest field is checked for type and range before it reaches the index (``created_ns``
must fit int64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pdm_edge.alerts.debounce import raises_alert
from pdm_edge.config import NAME_RE as _NAME_RE
from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge.errors import ModelError, RegistryError
from pdm_edge.types import ModelVersion, stream_id

if TYPE_CHECKING:  # torch is imported only where versions are loaded or written, so that
    # reading the index (the dashboard, `pdm-edge models list`) stays light
    from pdm_edge.model.encoder import Encoder
    from pdm_edge.model.scorer import Scorer

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "pdm-edge-model-package/1"
PACKAGE_VERSION_FILE = "version.pt"
PACKAGE_MANIFEST = "manifest.json"
PACKAGE_SIGNATURE = "manifest.sig"
MAX_PACKAGE_MEMBER_BYTES = 64 * 1024 * 1024
"""Largest file accepted inside a package (a version file is ~100 KB; this guards against a
zip bomb)."""

VERSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,160}$")
"""A model version id: the characters of a name (no dots, no separators), at most 160 of them
(``{site}-{machine}-{sensor}-v{n}`` fits)."""
_ID_RE = VERSION_ID_RE
_MAX_TEXT = 500
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    machine TEXT NOT NULL,
    sensor TEXT NOT NULL,
    seq INTEGER NOT NULL,
    parent TEXT,
    trigger TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    encoder_sha256 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'rejected', 'retired')),
    metrics TEXT NOT NULL DEFAULT '{}',
    training_summary TEXT NOT NULL DEFAULT '{}',
    reason TEXT,
    origin TEXT NOT NULL DEFAULT 'local',
    previous_active TEXT,
    changed_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_one_active ON versions(site, machine, sensor) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS versions_stream ON versions(site, machine, sensor, seq);
"""


@dataclasses.dataclass(frozen=True)
class RegisteredVersion(ModelVersion):
    """A :class:`~pdm_edge.types.ModelVersion` as the registry keeps it, with its sensor and
    where it came from.

    Attributes:
        sensor: the sensor of the stream (``ModelVersion`` names only site and machine).
        origin: ``"local"`` (trained here) or ``"import:<package name>"`` with how its
            signature was checked.
        previous_active: the version that was active when this one was promoted (what
            :meth:`Registry.rollback` goes back to), or ``None``.
    """

    sensor: str = ""
    origin: str = "local"
    previous_active: str | None = None

    @property
    def stream(self) -> str:
        """``"{site}/{machine}/{sensor}"``."""
        return stream_id(self.site, self.machine, self.sensor)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["metrics"] = dict(self.metrics)
        d["training_summary"] = dict(self.training_summary)
        return d


# ---------------------------------------------------------------------------------------------
# the gate


@dataclasses.dataclass(frozen=True)
class GateInputs:
    """Held-back data for the gate.

    Attributes:
        normal_windows: feature images ``(B, 2, 64, 32)`` (:meth:`Scorer.features`) of normal
            windows neither version was calibrated on.
        fault_windows: feature images of windows labelled ``fault``, each event's in time order.
        fault_events: the labelled event (label id) of each fault window; every event must be
            detected (see :func:`gate`). ``None``: every window is its own event.
        margin: how much higher (absolute, as a fraction of windows) the candidate's
            false-alarm rate may be than the active version's.
    """

    normal_windows: Sequence[Any] | np.ndarray
    fault_windows: Sequence[Any] | np.ndarray = ()
    margin: float = 0.01
    fault_events: Sequence[str] | None = None
    labelled_normal_windows: Sequence[Any] | np.ndarray = ()
    """Windows technicians labelled ``normal`` that the candidate learnt from (time order), for
    the label rule of :func:`label_rule` (issue 15 row 16)."""
    confirm_far_above: float | None = None
    """Label rule 1: labelled-normal windows that the active version scores above this many
    times its threshold are "far above"; a candidate trained on them needs an engineer's
    confirmation. ``None``: off."""
    confirm_silenced_alerts: bool = False
    """Label rule 2: a candidate that would raise no k-of-n alert on labelled-normal windows on
    which the active version would raise one (it stops alerting on a span it alerted on) needs
    an engineer's confirmation."""


def label_rule(candidate: Scorer, active: Scorer | None, inputs: GateInputs) -> tuple[str | None, dict[str, Any]]:
    """Whether labels could have silently blinded the detector: the two rules of
    :class:`GateInputs` on its ``labelled_normal_windows``. Returns ``(why, metrics)``: ``why``
    is None when neither rule fires (or there is no active version or no labelled window),
    else one line saying which rule fired and on how many windows."""
    lab = inputs.labelled_normal_windows
    if active is None or not len(lab) or (inputs.confirm_far_above is None and not inputs.confirm_silenced_alerts):
        return None, {}
    a_thr, c_thr = float(active.threshold), float(candidate.threshold)  # type: ignore[arg-type]
    a_scores, c_scores = active.score_features(lab), candidate.score_features(lab)
    metrics: dict[str, Any] = {"labelled_normal": len(lab), "active_above": int((a_scores > a_thr).sum()),
                               "candidate_above": int((c_scores > c_thr).sum())}
    why = []
    if inputs.confirm_far_above is not None:
        far = int((a_scores > inputs.confirm_far_above * a_thr).sum())
        metrics["far_above"] = far
        if far:
            why.append(f"{far} of {len(lab)} windows labelled normal score above {inputs.confirm_far_above:g} x the active "
                       f"threshold (max {a_scores.max() / a_thr:.1f} x): they look like a fault, not a false alarm")
    if inputs.confirm_silenced_alerts:
        k, n = active.config.alert_k, active.config.alert_n
        silenced = raises_alert(a_scores > a_thr, k, n) and not raises_alert(c_scores > c_thr, candidate.config.alert_k,
                                                                        candidate.config.alert_n)
        metrics["silenced_alert"] = bool(silenced)
        if silenced:
            why.append(f"the candidate stops alerting on the labelled span the active version alerts on "
                       f"({metrics['active_above']} -> {metrics['candidate_above']} of {len(lab)} windows above threshold)")
    return ("; ".join(why) or None), metrics


def _window_name(windows: Sequence[Any] | np.ndarray, i: int) -> str:
    w = windows[i]
    start = getattr(w, "start_ns", None)
    return f"#{i} (start_ns {start})" if start is not None else f"#{i}"


def _far(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold)) if len(scores) else 0.0


def gate(candidate: Scorer, active: Scorer | None, normal_windows: Sequence[Any] | np.ndarray,
         fault_windows: Sequence[Any] | np.ndarray = (), *, margin: float = 0.01,
         fault_events: Sequence[str] | None = None) -> tuple[bool, dict[str, Any], str]:
    """Judge a candidate against the active version on held-back windows (feature images
    ``(B, 2, 64, 32)``, as :class:`GateInputs`).

    The candidate passes when (1) its false-alarm rate (fraction of ``normal_windows`` scoring
    above its threshold) is at most the active version's plus ``margin`` (no active version:
    this check is skipped), and (2) it detects every labelled fault event: the event's windows
    (``fault_windows`` grouped by ``fault_events``, in time order) would raise an alert under
    the candidate's k-of-n rule (``alert_k`` of ``alert_n`` consecutive windows above its
    threshold; an event of fewer windows needs ``min(k, length)``). Without ``fault_events``
    every fault window is its own event and must score above threshold.

    Returns:
        ``(passed, metrics, reason)``: metrics hold ``candidate_far``, ``active_far`` (``None``
        without an active version), ``margin``, ``fault_detection`` (fraction of fault events
        detected, ``None`` without fault windows), ``n_normal``, ``n_fault`` (windows),
        ``n_fault_events``, ``candidate_threshold``, ``missed_faults`` (events); the reason is
        one line naming every failed check (and the fault events that were missed) or why it
        passed.

    Raises:
        NotCalibratedError: either scorer is not calibrated.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n_normal, n_fault = len(normal_windows), len(fault_windows)
    thr = float(candidate.threshold) if candidate.threshold is not None else float("nan")
    cand_normal = candidate.score_features(normal_windows) if n_normal else np.zeros(0)
    cand_far = _far(cand_normal, thr)
    active_far: float | None = None
    if active is not None:
        act_normal = active.score_features(normal_windows) if n_normal else np.zeros(0)
        active_far = _far(act_normal, float(active.threshold))  # type: ignore[arg-type]
    fault_scores = candidate.score_features(fault_windows) if n_fault else np.zeros(0)
    if fault_events is not None and len(fault_events) != n_fault:
        raise ValueError(f"fault_events names {len(fault_events)} windows, fault_windows has {n_fault}")
    groups: dict[str, list[int]] = {}
    for i in range(n_fault):
        groups.setdefault(str(fault_events[i]) if fault_events is not None else str(i), []).append(i)
    k, n = candidate.config.alert_k, candidate.config.alert_n
    missed_events = [(ev, idx) for ev, idx in groups.items() if not raises_alert(fault_scores[idx] > thr, k, n)]
    missed = [idx[int(np.argmax(fault_scores[idx]))] for _, idx in missed_events]  # each missed event's best window
    metrics: dict[str, Any] = {
        "candidate_far": cand_far, "active_far": active_far, "margin": float(margin),
        "fault_detection": (1.0 - len(missed) / len(groups)) if groups else None,
        "n_normal": n_normal, "n_fault": n_fault, "n_fault_events": len(groups), "candidate_threshold": thr,
        "missed_faults": len(missed),
    }
    failures = []
    if active_far is not None and cand_far > active_far + margin + 1e-12:
        failures.append(f"false-alarm rate {cand_far:.4f} on {n_normal} held-back normal windows exceeds the active "
                        f"version's {active_far:.4f} by more than the margin {margin:g}")
    if missed:
        if fault_events is None:
            shown = ", ".join(f"{_window_name(fault_windows, i)} score {fault_scores[i]:.3f}" for i in missed[:10])
            what = f"{len(missed)} of {n_fault} labelled fault windows not above threshold {thr:.3f}"
        else:
            shown = ", ".join(f"{ev} (best window score {fault_scores[i]:.3f})" for (ev, _), i in zip(missed_events[:10], missed))
            what = f"{len(missed)} of {len(groups)} labelled fault events would raise no {k}-of-{n} alert above threshold {thr:.3f}"
        more = f" and {len(missed) - 10} more" if len(missed) > 10 else ""
        failures.append(f"{what}: {shown}{more}")
    if failures:
        return False, metrics, "gate failed: " + "; ".join(failures)
    far_part = (f"false-alarm rate {cand_far:.4f} vs active {active_far:.4f} (margin {margin:g})" if active_far is not None
                else f"false-alarm rate {cand_far:.4f} (no active version to compare with)")
    fault_part = (f"all {len(groups)} labelled fault events detected above threshold {thr:.3f}" if n_fault
                  else "no labelled fault windows")
    return True, metrics, f"gate passed: {far_part}; {fault_part}"


# ---------------------------------------------------------------------------------------------
# keys


def generate_keypair(directory: str | os.PathLike[str], name: str = "signing_key") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM files ``{name}.pem`` (private, PKCS#8, mode 0600)
    and ``{name}.pub.pem`` (public, SubjectPublicKeyInfo) in ``directory``; returns their paths.

    Raises:
        RegistryError: a file of that name already exists (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{name}.pem", d / f"{name}.pub.pem"
    for p in (priv_path, pub_path):
        if p.exists():
            raise RegistryError(f"key file {p} already exists; not overwriting it")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 private key from an unencrypted PEM file.

    Raises:
        RegistryError: unreadable file or not an Ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise RegistryError(f"cannot read signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 public key from a PEM file.

    Raises:
        RegistryError: unreadable file or not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise RegistryError(f"cannot read public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"public key {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError(f"public key {path} is not an Ed25519 key")
    return key


def key_fingerprint(public_key: Any) -> str:
    """First 16 hex digits of the sha256 of the raw public key (to name a signer)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the registry


def check_version_id(version_id: Any) -> str:
    """Return ``version_id`` if it is a valid version id (:data:`VERSION_ID_RE`).

    Raises:
        RegistryError: otherwise, with the offending value (cut to 64 characters).
    """
    if not isinstance(version_id, str) or not VERSION_ID_RE.match(version_id):
        raise RegistryError(f"version id {str(version_id)[:64]!r} must match {VERSION_ID_RE.pattern}")
    return version_id


def load_trusted_keys(spec: str | Sequence[str] | None) -> list[Any]:
    """Ed25519 public keys from ``[registry] verify_key``: one entry or a list, each a PEM file
    path or the PEM text itself.

    Raises:
        RegistryError: an entry that is not a readable Ed25519 public key.
    """
    if spec is None:
        return []
    entries = [spec] if isinstance(spec, str) else list(spec)
    keys = []
    for e in entries:
        if e.lstrip().startswith("-----BEGIN"):
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            try:
                key = serialization.load_pem_public_key(e.encode())
            except (ValueError, TypeError) as exc:
                raise RegistryError(f"[registry] verify_key is not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise RegistryError("[registry] verify_key is not an Ed25519 key")
            keys.append(key)
        else:
            keys.append(load_public_key(e))
    return keys


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RegistryError(f"{what} must match [A-Za-z0-9_-]+, got {value!r}")


def _version_summary(data: bytes) -> dict[str, Any]:
    """Configuration summary read from a version file's bytes (no encoder needed)."""
    import torch

    try:
        obj = torch.load(io.BytesIO(data), weights_only=True)
        state = obj["state"]
        cfg = state["config"]
        return {
            "encoder_sha256": state["encoder_sha256"],
            "config": {k: cfg[k] for k in ("kind", "sample_rate_hz", "hop_s", "components", "train_adapter",
                                           "target_false_alerts_per_h", "alert_k", "alert_n") if k in cfg}
            | {"adapter": cfg.get("adapter", {}), "features": cfg.get("features", {})},
            "threshold": float(state["threshold"]),
        }
    except Exception as exc:  # torch raises several types for a damaged file
        raise RegistryError(f"version file is not a readable model version: {exc}") from None



def write_package_zip(members: Sequence[tuple[str, bytes]], *, compresslevel: int | None = None) -> bytes:
    """The bytes of a package zip (a model-version or a delta package, read back by
    :func:`read_package_zip`): the members in order, DEFLATE-compressed at ``compresslevel``
    (zlib's default when ``None``), with a fixed date and mode 0644, so that the same members
    always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload, compresslevel=compresslevel)
    return buf.getvalue()


def read_package_zip(what: str, source: str | os.PathLike[str] | bytes, *, required: Sequence[str], optional: Sequence[str],
                     max_member_bytes: int) -> dict[str, bytes]:
    """The members of a package zip (a model-version or a delta package), checked before use:
    only ``required`` and ``optional`` names, every required one present, none over
    ``max_member_bytes``. ``source`` is a path or the zip's bytes.

    Raises:
        RegistryError: an unexpected or missing member, one too large, or not a readable zip.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            unknown = set(infos) - set(required) - set(optional)
            if unknown:
                raise RegistryError(f"{what}: unexpected files {sorted(unknown)}")
            for req in required:
                if req not in infos:
                    raise RegistryError(f"{what}: {req} missing")
            for i in infos.values():
                if i.file_size > max_member_bytes:
                    raise RegistryError(f"{what}: {i.filename} is {i.file_size} bytes, over the {max_member_bytes} limit")
            return {n: zf.read(n) for n in infos}
    except RegistryError:
        raise
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise RegistryError(f"{what} is not a readable zip (damaged or tampered): {exc}") from None


def verify_signature(what: str, manifest_bytes: bytes, sig: bytes | None, keys: Sequence[Any],
                     require_signature: bool) -> str:
    """Check a package's Ed25519 signature of its manifest against trusted public keys.

    Args:
        what: the package, as named in errors (``"package v.zip"``).
        manifest_bytes: the signed bytes; ``sig``: the signature, or None when unsigned.
        keys: trusted Ed25519 public keys (any may have signed).
        require_signature: refuse an unsigned package, or a signed one with no key to verify.

    Returns:
        a note for the import record: ``"unsigned"``, ``"signed by <fingerprint>"`` or
        ``"signature not verified (no trusted key)"``.

    Raises:
        RegistryError: unsigned or unverifiable when required, or a signature no trusted key verifies.
    """
    from cryptography.exceptions import InvalidSignature

    if sig is None:
        if require_signature:
            raise RegistryError(f"{what} is not signed and a signature is required")
        return "unsigned"
    if not keys:
        if require_signature:
            raise RegistryError(f"{what} is signed but no trusted public key was given to verify it")
        return "signature not verified (no trusted key)"
    for k in keys:
        try:
            k.verify(sig, manifest_bytes)
        except InvalidSignature:
            continue
        return f"signed by {key_fingerprint(k)}"
    raise RegistryError(f"{what}: signature does not verify with any of the {len(keys)} trusted public key(s)")

class Registry:
    """The model versions of every stream on the appliance (see the module docstring).

    Args:
        root_dir: the registry directory (created when ``create``).
        create: False raises :class:`RegistryError` when there is no registry there yet.

    Thread-safe: one connection guarded by a lock; status changes are single transactions.
    """

    FILENAME = "registry.sqlite"

    def __init__(self, root_dir: str | os.PathLike[str], *, create: bool = True,
                 trusted_public_keys: Iterable[Any] | None = None) -> None:
        self.root = Path(root_dir)
        self.trusted_public_keys = [load_public_key(k) if isinstance(k, (str, os.PathLike)) else k
                                    for k in (trusted_public_keys or [])]
        """Keys every imported package must be signed with (empty: signatures optional)."""
        self.db_path = self.root / self.FILENAME
        self.versions_dir = self.root / "versions"
        if not create and not self.db_path.is_file():
            raise RegistryError(f"no model registry at {self.root} ({self.FILENAME} missing)")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[RegisteredVersion], None]] = []
        try:
            self._db = open_wal(self.db_path, synchronous="FULL", schema=_SCHEMA, row_factory=sqlite3.Row)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open model registry {self.db_path}: {exc}") from None

    @classmethod
    def from_config(cls, rcfg: Any, *, create: bool = True) -> Registry:
        """The registry of ``[registry]`` (:class:`~pdm_edge.config.RegistryConfig`): its
        directory, and its ``verify_key`` as the keys every import must be signed with.

        Raises:
            RegistryError: a key that cannot be read, or (``create=False``) no registry there.
        """
        return cls(rcfg.dir, create=create, trusted_public_keys=load_trusted_keys(rcfg.verify_key))

    # -- context ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def path(self, version_id: str) -> Path:
        """The version file of ``version_id``.

        Raises:
            RegistryError: an invalid version id (never a path outside the registry)."""
        return self.versions_dir / f"{check_version_id(version_id)}.pt"

    @staticmethod
    def _record(row: sqlite3.Row) -> RegisteredVersion:
        return RegisteredVersion(
            id=row["id"], site=row["site"], machine=row["machine"], parent=row["parent"], trigger=row["trigger"],
            created_ns=row["created_ns"], encoder_sha256=row["encoder_sha256"], sha256=row["sha256"],
            size_bytes=row["size_bytes"], status=row["status"], metrics=json.loads(row["metrics"]),
            training_summary=json.loads(row["training_summary"]), reason=row["reason"], sensor=row["sensor"],
            origin=row["origin"], previous_active=row["previous_active"])

    def _get(self, version_id: str) -> RegisteredVersion | None:
        row = self._db.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
        return self._record(row) if row else None

    def get(self, version_id: str) -> RegisteredVersion:
        """The version ``version_id``.

        Raises:
            RegistryError: no such version.
        """
        with self._lock:
            rec = self._get(version_id)
        if rec is None:
            raise RegistryError(f"no model version {version_id!r} in {self.root}")
        return rec

    def list(self, site: str | None = None, machine: str | None = None, sensor: str | None = None) -> list[RegisteredVersion]:
        """Versions, optionally of one site/machine/sensor, by stream then age (oldest first)."""
        where, args = [], []
        for col, val in (("site", site), ("machine", machine), ("sensor", sensor)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM versions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY site, machine, sensor, seq"
        with self._lock:
            return [self._record(r) for r in self._db.execute(sql, args).fetchall()]

    def active(self, site: str, machine: str, sensor: str) -> RegisteredVersion | None:
        """The active version of the stream, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT * FROM versions WHERE site = ? AND machine = ? AND sensor = ? AND status = 'active'",
                                   (site, machine, sensor)).fetchone()
        return self._record(row) if row else None

    def load(self, version_id: str, encoder: Encoder, encoder_sha256: str) -> Scorer:
        """Rebuild the scorer of ``version_id`` from its file, after checking the file against
        the sha256 recorded when it was added.

        Raises:
            RegistryError: no such version.
            ModelError: missing, corrupt or tampered file (sha256 mismatch), or a version made
                for another encoder.
        """
        rec = self.get(version_id)
        from pdm_edge.model.version import load_version

        return load_version(self.path(rec.id), encoder, encoder_sha256, expected_sha256=rec.sha256)

    def load_active(self, site: str, machine: str, sensor: str, encoder: Encoder, encoder_sha256: str) -> Scorer | None:
        """The active version's scorer, or ``None`` when the stream has none."""
        rec = self.active(site, machine, sensor)
        return None if rec is None else self.load(rec.id, encoder, encoder_sha256)

    # -- adding ----------------------------------------------------------------------------
    def _new_id(self, site: str, machine: str, sensor: str) -> tuple[str, int]:
        row = self._db.execute("SELECT MAX(seq) FROM versions WHERE site = ? AND machine = ? AND sensor = ?",
                               (site, machine, sensor)).fetchone()
        seq = (row[0] or 0) + 1
        while True:
            vid = f"{machine}-{sensor}-v{seq}"
            if self._get(vid) is not None:  # same machine/sensor names on another site
                vid = f"{site}-{machine}-{sensor}-v{seq}"
            if self._get(vid) is None:
                return vid, seq
            seq += 1

    def _insert(self, *, vid: str, seq: int, site: str, machine: str, sensor: str, parent: str | None, trigger: str,
                created_ns: int, encoder_sha256: str, sha256: str, size_bytes: int, training_summary: dict[str, Any],
                metrics: dict[str, Any] | None = None, origin: str = "local") -> RegisteredVersion:
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO versions (id, site, machine, sensor, seq, parent, trigger, created_ns, encoder_sha256, sha256,"
            " size_bytes, status, metrics, training_summary, reason, origin, previous_active, changed_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'candidate', ?, ?, NULL, ?, NULL, ?)",
            (vid, site, machine, sensor, seq, parent, trigger, created_ns, encoder_sha256, sha256, size_bytes,
             json.dumps(metrics or {}), json.dumps(training_summary, default=str), origin, now))
        rec = self._get(vid)
        assert rec is not None
        return rec

    def add_candidate(self, scorer: Scorer, *, site: str, machine: str, sensor: str, parent: str | None = None,
                      trigger: str = "manual", training_summary: dict[str, Any] | None = None) -> RegisteredVersion:
        """Save a calibrated scorer as a new candidate version of the stream.

        Args:
            scorer: a calibrated scorer.
            site, machine, sensor: the stream.
            parent: the version it was trained from (must be in the registry), or ``None``.
            trigger: why it was trained (``"initial_calibration"``, ``"labels"``, ``"manual"``).
            training_summary: what it was trained on (JSON-serialisable: windows, labels, span).

        Raises:
            RegistryError: bad names, unknown parent, or a summary that is not JSON.
            NotCalibratedError: the scorer is not calibrated.
        """
        for what, val in (("site", site), ("machine", machine), ("sensor", sensor)):
            _check_name(what, val)
        summary = dict(training_summary or {})
        try:
            json.dumps(summary)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"training_summary is not JSON-serialisable: {exc}") from None
        with self._lock:
            if parent is not None and self._get(parent) is None:
                raise RegistryError(f"parent version {parent!r} is not in the registry")
            vid, seq = self._new_id(site, machine, sensor)
            created = time.time_ns()
            path = self.path(vid)
            from pdm_edge.model.version import save_version

            sha = save_version(path, scorer, {"id": vid, "site": site, "machine": machine, "sensor": sensor,
                                              "parent": parent, "trigger": trigger, "created_ns": created})
            try:
                return self._insert(vid=vid, seq=seq, site=site, machine=machine, sensor=sensor, parent=parent,
                                    trigger=trigger, created_ns=created, encoder_sha256=scorer.encoder_sha256, sha256=sha,
                                    size_bytes=path.stat().st_size, training_summary=summary)
            except BaseException:
                path.unlink(missing_ok=True)
                raise

    # -- status changes --------------------------------------------------------------------
    def _notify(self, rec: RegisteredVersion) -> None:
        for cb in list(self._listeners):
            try:
                cb(rec)
            except Exception:  # a listener must not break the registry
                log.exception("model registry listener %r failed for %s", cb, rec.id)

    def on_change(self, callback: Callable[[RegisteredVersion], None]) -> Callable[[], None]:
        """Call ``callback(new_active_version)`` after every promotion or rollback (in the thread
        that made it, after the transaction committed). Returns a function that unregisters it."""
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)
        return remove

    def _activate(self, rec: RegisteredVersion, *, reason: str | None, retired_reason: str,
                  metrics: dict[str, Any] | None, set_previous: bool) -> RegisteredVersion:
        """Make ``rec`` the stream's active version in one transaction (lock held)."""
        now = time.time_ns()
        with tx(self._db):
            cur = self._db.execute("SELECT id FROM versions WHERE site = ? AND machine = ? AND sensor = ? AND status = 'active'",
                                   (rec.site, rec.machine, rec.sensor)).fetchone()
            prev = cur["id"] if cur else None
            if prev is not None and prev != rec.id:
                self._db.execute("UPDATE versions SET status = 'retired', reason = ?, changed_ns = ? WHERE id = ?",
                                 (retired_reason.format(new=rec.id), now, prev))
            sets, args = ["status = 'active'", "reason = ?", "changed_ns = ?"], [reason or None, now]
            if set_previous and prev != rec.id:
                sets.append("previous_active = ?")
                args.append(prev)
            if metrics is not None:
                sets.append("metrics = ?")
                args.append(json.dumps(metrics))
            self._db.execute(f"UPDATE versions SET {', '.join(sets)} WHERE id = ?", (*args, rec.id))
        new = self._get(rec.id)
        assert new is not None
        return new

    def promote(self, version_id: str, reason: str = "", *, force: bool = False,
                metrics: dict[str, Any] | None = None) -> RegisteredVersion:
        """Make ``version_id`` its stream's active version; the previous active one becomes
        ``retired`` (reason ``"replaced by {id}"``), in one transaction; then notify listeners.

        A ``candidate`` or ``retired`` version can be promoted; a ``rejected`` one only with
        ``force`` (an operator overriding the gate). Promoting the active version is a no-op.

        Raises:
            RegistryError: no such version, or a rejected version without ``force``.
        """
        with self._lock:
            rec = self._get(version_id)
            if rec is None:
                raise RegistryError(f"no model version {version_id!r} in {self.root}")
            if rec.status == "active":
                return rec
            if rec.status == "rejected" and not force:
                raise RegistryError(f"{version_id} was rejected ({rec.reason}); promote it with force to override the gate")
            new = self._activate(rec, reason=reason, retired_reason="replaced by {new}", metrics=metrics, set_previous=True)
        self._notify(new)
        return new

    def reject(self, version_id: str, reason: str, *, metrics: dict[str, Any] | None = None) -> RegisteredVersion:
        """Mark a candidate ``rejected`` with ``reason`` (kept, never deleted).

        Raises:
            RegistryError: no such version, or it is not a candidate.
        """
        with self._lock:
            rec = self._get(version_id)
            if rec is None:
                raise RegistryError(f"no model version {version_id!r} in {self.root}")
            if rec.status != "candidate":
                raise RegistryError(f"only a candidate can be rejected; {version_id} is {rec.status}")
            sets, args = ["status = 'rejected'", "reason = ?", "changed_ns = ?"], [reason, time.time_ns()]
            if metrics is not None:
                sets.append("metrics = ?")
                args.append(json.dumps(metrics))
            self._db.execute(f"UPDATE versions SET {', '.join(sets)} WHERE id = ?", (*args, version_id))
            new = self._get(version_id)
        assert new is not None
        return new

    def rollback(self, site: str, machine: str, sensor: str) -> RegisteredVersion:
        """Re-activate the version that was active before the current one (else its parent);
        the current one is retired with reason ``"rolled back"``. Returns the re-activated
        version and notifies listeners.

        Raises:
            RegistryError: the stream has no active version or nothing to go back to.
        """
        with self._lock:
            cur = self.active(site, machine, sensor)
            if cur is None:
                raise RegistryError(f"{stream_id(site, machine, sensor)} has no active model version to roll back")
            target = None
            for cand in (cur.previous_active, cur.parent):
                if cand is not None:
                    rec = self._get(cand)
                    if rec is not None and rec.status != "rejected" and (rec.site, rec.machine, rec.sensor) == (site, machine, sensor):
                        target = rec
                        break
            if target is None:
                raise RegistryError(f"{cur.id} has no previous active version or parent to roll back to")
            new = self._activate(target, reason=f"rolled back from {cur.id}", retired_reason="rolled back",
                                 metrics=None, set_previous=False)
        self._notify(new)
        return new

    def submit(self, candidate: Scorer, *, site: str, machine: str, sensor: str, gate_inputs: GateInputs,
               parent: str | None = None, trigger: str = "manual",
               training_summary: dict[str, Any] | None = None) -> tuple[RegisteredVersion, dict[str, Any], str]:
        """Add ``candidate`` as a candidate (parent: ``parent``, else the current active
        version), gate it against the active version and promote or reject it.

        A candidate that passes the gate but fires the label rule (:func:`label_rule`) stays a
        ``candidate`` with the reason "needs engineer confirmation: ..." (an engineer promotes
        it with ``pdm-edge models promote``, or it is left).

        Returns:
            ``(version, metrics, reason)``: the version's final state (``active``, ``rejected``
            or ``candidate`` awaiting confirmation, with the gate's metrics and reason recorded).
        """
        current = self.active(site, machine, sensor)
        rec = self.add_candidate(candidate, site=site, machine=machine, sensor=sensor,
                                 parent=parent if parent is not None else (current.id if current else None),
                                 trigger=trigger, training_summary=training_summary)
        active_scorer = self.load(current.id, candidate.encoder, candidate.encoder_sha256) if current is not None else None
        passed, metrics, reason = gate(candidate, active_scorer, gate_inputs.normal_windows, gate_inputs.fault_windows,
                                       margin=gate_inputs.margin, fault_events=gate_inputs.fault_events)
        if current is not None:
            metrics["active_version"] = current.id
        why, label_metrics = label_rule(candidate, active_scorer, gate_inputs) if passed else (None, {})
        if label_metrics:
            metrics["label_rule"] = label_metrics
        if why is not None:
            reason = f"needs engineer confirmation: {why} ({reason})"
            with self._lock:
                self._db.execute("UPDATE versions SET reason = ?, metrics = ?, changed_ns = ? WHERE id = ?",
                                 (reason, json.dumps(metrics), time.time_ns(), rec.id))
            rec = self.get(rec.id)
        elif passed:
            rec = self.promote(rec.id, reason, metrics=metrics)
        else:
            rec = self.reject(rec.id, reason, metrics=metrics)
        return rec, metrics, reason

    # -- export / import -------------------------------------------------------------------
    def export(self, version_id: str, path: str | os.PathLike[str], signing_key: Any | None = None) -> Path:
        """Write ``version_id`` as one package (zip, :meth:`package`) at ``path``, atomically.

        Raises:
            RegistryError: no such version.
            ModelError: the version file does not match its recorded sha256.
        """
        from pdm_edge._util.fs import atomic_write

        out = Path(path)
        atomic_write(out, self.package(version_id, signing_key))
        return out

    def package(self, version_id: str, signing_key: Any | None = None) -> bytes:
        """``version_id`` as one package (zip bytes, what :meth:`import_package` takes): the
        version file, a manifest and, with ``signing_key`` (an ``Ed25519PrivateKey``), the
        manifest's signature.

        Raises:
            RegistryError: no such version.
            ModelError: the version file does not match its recorded sha256.
        """
        rec = self.get(version_id)
        try:
            data = self.path(rec.id).read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read version file of {rec.id}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ModelError(f"version file of {rec.id} does not match its recorded sha256 (corrupt or tampered); not exporting it")
        summary = _version_summary(data)
        manifest = {
            "format": PACKAGE_FORMAT,
            "id": rec.id, "site": rec.site, "machine": rec.machine, "sensor": rec.sensor,
            "parent": rec.parent, "trigger": rec.trigger, "created_ns": rec.created_ns,
            "status_at_export": rec.status, "encoder_sha256": rec.encoder_sha256,
            "config": summary["config"], "threshold": summary["threshold"],
            "training_summary": dict(rec.training_summary), "metrics": dict(rec.metrics),
            "files": {PACKAGE_VERSION_FILE: {"sha256": rec.sha256, "size_bytes": len(data)}},
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        members = [(PACKAGE_MANIFEST, manifest_bytes), (PACKAGE_VERSION_FILE, data)]
        if signing_key is not None:
            members.append((PACKAGE_SIGNATURE, signing_key.sign(manifest_bytes)))
        return write_package_zip(members)

    def import_package(self, path: str | os.PathLike[str] | bytes, *, encoder_sha256: str,
                       trusted_public_keys: Iterable[Any] | None = None,
                       require_signature: bool = False, name: str | None = None,
                       stream: tuple[str, str, str] | None = None) -> RegisteredVersion:
        """Verify a package (a file, or its bytes as received, named ``name`` in messages) and
        add its version as a candidate.

        Checks, in order (the first failure raises and nothing is stored): the zip is readable
        and holds only the known files; the manifest is a known format; every file's sha256 and
        size match the manifest; the signature (when present and ``trusted_public_keys`` are
        given, it must verify with one of them; when ``require_signature``, a package without a
        signature or with no trusted key to check it against is refused); the version was made
        for ``encoder_sha256`` (manifest and file agree); the manifest's fields have valid types
        and ranges (id, parent, trigger, created_ns within int64); with ``stream`` ``(site,
        machine, sensor)``, the package is of that stream.

        ``trusted_public_keys``: ``Ed25519PublicKey`` objects or paths of PEM files, added to the
        registry's own (from the configuration). When the registry has keys of its own, a
        signature from one of the trusted keys is always required.

        The version keeps its id unless that id is taken by a different file (then it gets the
        stream's next id); re-importing the same file returns the existing version.

        Raises:
            RegistryError: naming the check that failed.
        """
        if not isinstance(path, bytes):
            name = name or Path(path).name
            if not Path(path).exists():
                raise RegistryError(f"package {path} does not exist")
        name = name or "(bytes)"
        files = read_package_zip(f"package {name}", path, required=(PACKAGE_MANIFEST, PACKAGE_VERSION_FILE),
                                 optional=(PACKAGE_SIGNATURE,), max_member_bytes=MAX_PACKAGE_MEMBER_BYTES)
        manifest_bytes = files[PACKAGE_MANIFEST]
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise RegistryError(f"package {name}: manifest.json is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
            raise RegistryError(f"package {name}: unknown manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {PACKAGE_FORMAT}")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or set(listed) != {PACKAGE_VERSION_FILE}:
            raise RegistryError(f"package {name}: manifest must list exactly the file {PACKAGE_VERSION_FILE}")
        for fname, meta in listed.items():
            digest = hashlib.sha256(files[fname]).hexdigest()
            if not isinstance(meta, dict) or digest != meta.get("sha256"):
                raise RegistryError(f"package {name}: sha256 of {fname} does not match the manifest (corrupt or tampered)")
            if len(files[fname]) != meta.get("size_bytes"):
                raise RegistryError(f"package {name}: size of {fname} does not match the manifest")
        # signature
        keys = [*self.trusted_public_keys,
                *(load_public_key(k) if isinstance(k, (str, os.PathLike)) else k for k in (trusted_public_keys or []))]
        if self.trusted_public_keys:
            require_signature = True
        sig_note = verify_signature(f"package {name}", manifest_bytes, files.get(PACKAGE_SIGNATURE), keys, require_signature)
        # encoder compatibility
        if manifest.get("encoder_sha256") != encoder_sha256:
            raise RegistryError(f"package {name} was made for encoder {str(manifest.get('encoder_sha256'))[:12]}..., "
                                f"this appliance runs encoder {encoder_sha256[:12]}... (incompatible)")
        data = files[PACKAGE_VERSION_FILE]
        summary = _version_summary(data)
        if summary["encoder_sha256"] != encoder_sha256:
            raise RegistryError(f"package {name}: version file names encoder {summary['encoder_sha256'][:12]}..., not the manifest's")
        site, machine, sensor = manifest.get("site"), manifest.get("machine"), manifest.get("sensor")
        for what, val in (("site", site), ("machine", machine), ("sensor", sensor)):
            try:
                _check_name(what, val)  # type: ignore[arg-type]
            except RegistryError as exc:
                raise RegistryError(f"package {name}: manifest {exc}") from None
        if stream is not None and (site, machine, sensor) != tuple(stream):
            raise RegistryError(f"package {name} is of {site}/{machine}/{sensor}, not {'/'.join(stream)}")
        src_id = manifest.get("id")
        try:
            check_version_id(src_id)
        except RegistryError as exc:
            raise RegistryError(f"package {name}: manifest {exc}") from None
        parent = manifest.get("parent")
        if parent is not None:
            try:
                check_version_id(parent)
            except RegistryError as exc:
                raise RegistryError(f"package {name}: manifest parent: {exc}") from None
        trigger = manifest.get("trigger", "import")
        if not isinstance(trigger, str) or len(trigger) > 64 or not re.match(r"^[A-Za-z0-9_ .:-]*$", trigger):
            raise RegistryError(f"package {name}: manifest trigger {str(trigger)[:64]!r} must be at most 64 characters "
                                "of letters, digits, space and _ . : -")
        created_ns = manifest.get("created_ns", time.time_ns())
        if isinstance(created_ns, bool) or not isinstance(created_ns, int) or not 0 <= created_ns < 2**63:
            raise RegistryError(f"package {name}: manifest created_ns {str(created_ns)[:40]!r} must be an integer "
                                "of ns in 0 .. 2**63-1")
        for key in ("training_summary", "metrics"):
            if not isinstance(manifest.get(key) or {}, dict):
                raise RegistryError(f"package {name}: manifest {key} must be an object")
        sha = listed[PACKAGE_VERSION_FILE]["sha256"]
        with self._lock:
            existing = self._get(src_id)
            if existing is not None and existing.sha256 == sha:
                return existing
            if existing is None:
                vid = src_id
                row = self._db.execute("SELECT MAX(seq) FROM versions WHERE site = ? AND machine = ? AND sensor = ?",
                                       (site, machine, sensor)).fetchone()
                seq = (row[0] or 0) + 1
            else:
                vid, seq = self._new_id(site, machine, sensor)  # type: ignore[arg-type]
            target = self.path(vid)
            from pdm_edge._util.fs import atomic_write

            atomic_write(target, data)
            try:
                return self._insert(vid=vid, seq=seq, site=site, machine=machine, sensor=sensor,  # type: ignore[arg-type]
                                    parent=parent,
                                    trigger=trigger,
                                    created_ns=created_ns, encoder_sha256=encoder_sha256,
                                    sha256=sha, size_bytes=len(data), training_summary=dict(manifest.get("training_summary") or {}),
                                    metrics=dict(manifest.get("metrics") or {}),
                                    origin=f"import:{name} ({sig_note}; exported as {src_id})")
            except BaseException:
                target.unlink(missing_ok=True)
                raise
