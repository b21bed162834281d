"""The delta package: one signed, compressed file carrying an adapter, for federation and OTA.

An adapter (:class:`pdm_edge.model.adapter.Adapter`: LoRA matrices and the bottleneck head) is
shipped as its **difference to a base**: the fresh adapter that the stream's adapter
configuration and seed produce on the frozen encoder (:func:`base_adapter`; LoRA ``A`` from the
seeded Kaiming initialisation, ``B`` and the head's ``up`` zero). Every appliance with the same
encoder rebuilds the same base bit for bit, so the receiver needs nothing but the package; the
base's sha256 travels in the metadata and is checked before the delta is applied.

File layout (a zip, every member DEFLATE-compressed, fixed timestamps so the same content gives
the same bytes)::

    manifest.json   format, metadata (below), sha256 and size of every other member
    delta.npz       one float32 array per adapter tensor (numpy ``.npy`` members, no pickle)
    manifest.sig    Ed25519 signature of manifest.json's bytes (when signed)

Metadata (:class:`DeltaMeta`): device id, stream, machine class, kind (``update``: one
appliance's training result; ``prior``: a fleet aggregate), sha256 of the training data
(feature images in time order), normal / fault window counts, training duration, encoder
sha256, adapter configuration, base sha256, sha256 of the reconstructed adapter, creation
time, the federated round (priors), free-form notes.

Signing reuses the registry's key handling (:func:`pdm_edge.registry.load_private_key`,
:func:`~pdm_edge.registry.load_public_key`, :func:`~pdm_edge.registry.key_fingerprint`, keys from
``pdm-edge models keygen``) and the same rule as model packages: a signature must verify with
one of the trusted keys; ``require_signature`` refuses unsigned packages.

A delta package never holds windows, feature images or embeddings: only adapter tensors and the
metadata above (``tests/test_fleet.py`` checks it). Importing one into an appliance goes through
the same gate as a local candidate (:func:`pdm_edge.fleet.priors.import_delta_package`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pdm_edge.errors import RegistryError

if TYPE_CHECKING:
    from pdm_edge.model.adapter import AdapterConfig
    from pdm_edge.model.encoder import Encoder

FORMAT = "pdm-edge-delta-package/1"
MANIFEST = "manifest.json"
DELTA = "delta.npz"
SIGNATURE = "manifest.sig"
MAX_MEMBER_BYTES = 16 * 1024 * 1024
"""Largest member accepted (a default adapter's delta is ~90 KB; guards against zip bombs)."""
KINDS = ("update", "prior")


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over ``name, dtype, shape, bytes`` of every tensor in name order (numpy arrays or
    torch tensors, compared as float32), so the same adapter always gives the same digest."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(_numpy(tensors[name]), dtype=np.float32)
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_sha256(feature_images: np.ndarray) -> str:
    """sha256 of training data, ``(B, 2, 64, 32)`` float32 feature images in time order (names
    what an update was trained on without revealing it)."""
    return hashlib.sha256(np.ascontiguousarray(feature_images, dtype=np.float32).tobytes()).hexdigest()


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def base_adapter(encoder: Encoder, adapter_config: AdapterConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The base every delta is taken against: the fresh adapter of ``adapter_config`` on
    ``encoder`` from ``seed`` (what :class:`~pdm_edge.model.scorer.Scorer` builds without a prior),
    as ``{name: float32 array}``."""
    import torch

    from pdm_edge.model.adapter import Adapter

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        a = Adapter(encoder, adapter_config)
    return {k: v.detach().numpy().astype(np.float32) for k, v in a.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class DeltaMeta:
    """What a delta package says about its adapter (all JSON values).

    Attributes:
        device_id: the appliance (``appliance_id``) or ``"fleet-server"`` for a prior.
        stream: ``site/machine/sensor`` it was trained on (``""`` for a prior).
        machine_class: :func:`pdm_edge.fleet.classes.machine_class` of the stream.
        kind: ``"update"`` or ``"prior"``.
        encoder_sha256: sha256 of the frozen encoder it was trained on.
        adapter_config: :meth:`AdapterConfig.to_dict` of the adapter.
        seed: seed of the base adapter.
        base_sha256: :func:`tensors_sha256` of the base.
        adapter_sha256: :func:`tensors_sha256` of base + delta (checked after applying).
        data_sha256: :func:`data_sha256` of the training windows (``""`` for a prior).
        normal_windows, fault_windows: windows trained on (a prior: summed over participants).
        training_seconds: wall time of the training, s.
        created_ns: creation time, ns since the epoch (UTC).
        round: federated round that produced it (priors), else ``None``.
        notes: free-form JSON (participants, epsilon, ...).
    """

    device_id: str
    stream: str
    machine_class: str
    kind: str
    encoder_sha256: str
    adapter_config: dict[str, Any]
    seed: int
    base_sha256: str
    adapter_sha256: str
    data_sha256: str = ""
    normal_windows: int = 0
    fault_windows: int = 0
    training_seconds: float = 0.0
    created_ns: int = 0
    round: int | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeltaMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RegistryError(f"delta package metadata has unknown fields {sorted(unknown)}")
        try:
            meta = cls(**dict(d))
        except TypeError as exc:
            raise RegistryError(f"delta package metadata incomplete: {exc}") from None
        if meta.kind not in KINDS:
            raise RegistryError(f"delta package kind must be one of {KINDS}, got {meta.kind!r}")
        return meta


@dataclasses.dataclass(frozen=True)
class DeltaPackage:
    """An adapter as a delta to its base, with its metadata.

    Attributes:
        meta: :class:`DeltaMeta`.
        delta: ``{tensor name: float32 array}``, adapter minus base, same shapes as the adapter.
    """

    meta: DeltaMeta
    delta: dict[str, np.ndarray]

    @classmethod
    def from_adapter(cls, adapter_state: Mapping[str, Any], base: Mapping[str, np.ndarray], **meta: Any) -> DeltaPackage:
        """Package ``adapter_state`` (an adapter ``state_dict`` or ``{name: array}``) as its
        difference to ``base``; ``meta`` fills :class:`DeltaMeta` (``base_sha256``,
        ``adapter_sha256`` and ``created_ns`` are computed here).

        Raises:
            ValueError: the adapter's tensors do not match the base's names or shapes.
        """
        names, bnames = set(adapter_state), set(base)
        if names != bnames:
            raise ValueError(f"adapter and base differ in tensors: {sorted(names ^ bnames)[:6]}")
        delta = {}
        for k in sorted(names):
            a = _numpy(adapter_state[k]).astype(np.float32)
            if a.shape != base[k].shape:
                raise ValueError(f"adapter tensor {k} has shape {a.shape}, base has {base[k].shape}")
            delta[k] = a - base[k]
        meta.setdefault("created_ns", time.time_ns())
        m = DeltaMeta(base_sha256=tensors_sha256(base), adapter_sha256=tensors_sha256({k: base[k] + delta[k] for k in delta}), **meta)
        return cls(m, delta)

    def apply(self, base: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The adapter ``state_dict`` (torch tensors) = ``base + delta`` (equal to the packaged
        adapter up to float32 rounding of the difference, about 1e-8 absolute for these weights).

        Raises:
            RegistryError: ``base`` is not the base this delta was taken against, or the result
                does not match the recorded adapter sha256.
        """
        import torch

        if tensors_sha256(base) != self.meta.base_sha256:
            raise RegistryError("delta package was made against another base adapter (encoder, adapter configuration "
                                "or seed differ); not applying it")
        out = {k: base[k] + self.delta[k] for k in self.delta}
        if tensors_sha256(out) != self.meta.adapter_sha256:
            raise RegistryError("delta package: the rebuilt adapter does not match its recorded sha256")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def to_bytes(self, signing_key: Any | None = None) -> bytes:
        """The package file's bytes (see the module docstring); ``signing_key``: an
        ``Ed25519PrivateKey`` (:func:`pdm_edge.registry.load_private_key`)."""
        buf = io.BytesIO()
        np.savez(buf, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.delta.items()})
        delta_bytes = buf.getvalue()
        manifest = {"format": FORMAT, "meta": self.meta.to_dict(),
                    "files": {DELTA: {"sha256": hashlib.sha256(delta_bytes).hexdigest(), "size_bytes": len(delta_bytes)}}}
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        members = [(MANIFEST, manifest_bytes), (DELTA, delta_bytes)]
        if signing_key is not None:
            members.append((SIGNATURE, signing_key.sign(manifest_bytes)))
        from pdm_edge.registry import write_package_zip

        return write_package_zip(members, compresslevel=9)

    def write(self, path: str | os.PathLike[str], signing_key: Any | None = None) -> Path:
        """Write the package atomically at ``path``; returns the path."""
        from pdm_edge._util.fs import atomic_write

        out = Path(path)
        atomic_write(out, self.to_bytes(signing_key))
        return out

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "package", trusted_public_keys: Iterable[Any] | None = None,
                   require_signature: bool = False, encoder_sha256: str | None = None) -> tuple[DeltaPackage, str]:
        """Verify and read a package; returns it and how its signature was checked
        (``"unsigned"``, ``"signed by {fingerprint}"``, ``"signature not verified (no trusted key)"``).

        Checks in order (the first failure raises): readable zip with only the known members,
        each under :data:`MAX_MEMBER_BYTES`; known format; sha256 and size of ``delta.npz``;
        signature (as :meth:`pdm_edge.registry.Registry.import_package`); encoder sha256 (when
        ``encoder_sha256`` is given); metadata fields; the arrays (no pickled objects, float32,
        finite, exactly the adapter's tensors).

        ``trusted_public_keys``: ``Ed25519PublicKey`` objects or paths of PEM files.

        Raises:
            RegistryError: naming the check that failed.
        """
        from pdm_edge.registry import load_public_key, read_package_zip, verify_signature

        files = read_package_zip(f"delta package {name}", data, required=(MANIFEST, DELTA), optional=(SIGNATURE,),
                                 max_member_bytes=MAX_MEMBER_BYTES)
        manifest_bytes = files[MANIFEST]
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise RegistryError(f"delta package {name}: manifest.json is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise RegistryError(f"delta package {name}: unknown format, expected {FORMAT}")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or set(listed) != {DELTA} or not isinstance(listed[DELTA], dict):
            raise RegistryError(f"delta package {name}: manifest must list exactly {DELTA}")
        if hashlib.sha256(files[DELTA]).hexdigest() != listed[DELTA].get("sha256") or len(files[DELTA]) != listed[DELTA].get("size_bytes"):
            raise RegistryError(f"delta package {name}: sha256 or size of {DELTA} does not match the manifest (corrupt or tampered)")
        keys = [load_public_key(k) if isinstance(k, (str, os.PathLike)) else k for k in (trusted_public_keys or [])]
        sig = files.get(SIGNATURE)
        note = verify_signature(f"delta package {name}", manifest_bytes, sig, keys, require_signature)
        meta = DeltaMeta.from_dict(manifest.get("meta") or {})
        if encoder_sha256 is not None and meta.encoder_sha256 != encoder_sha256:
            raise RegistryError(f"delta package {name} was made for encoder {meta.encoder_sha256[:12]}..., this appliance runs "
                                f"encoder {encoder_sha256[:12]}... (incompatible)")
        try:
            with np.load(io.BytesIO(files[DELTA]), allow_pickle=False) as z:
                delta = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise RegistryError(f"delta package {name}: {DELTA} is not a plain array file: {exc}") from None
        for k, v in delta.items():
            if v.dtype != np.float32 or not np.all(np.isfinite(v)):
                raise RegistryError(f"delta package {name}: tensor {k} is not finite float32")
        return cls(meta, delta), note

    @classmethod
    def read(cls, path: str | os.PathLike[str], **kwargs: Any) -> tuple[DeltaPackage, str]:
        """:meth:`from_bytes` of a file.

        Raises:
            RegistryError: unreadable file or a failed check.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read delta package {path}: {exc.strerror}") from None
        return cls.from_bytes(data, name=Path(path).name, **kwargs)
