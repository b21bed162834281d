"""Fleet priors on the appliance: where they are kept, how a calibration starts from one, and
how a delta package is imported through the gate.

A *fleet prior* is the adapter that a federated round aggregated for one machine class
(:mod:`pdm_edge.fleet.server_app`), stored as a delta package (:mod:`pdm_edge.fleet.delta`) in
``{state_dir}/fleet/priors/{machine class}.pdmdelta``. It changes only where a calibration
*starts*: the learning loop (:class:`pdm_edge.learning.LearningLoop`, ``prior_for``) sets
:attr:`pdm_edge.model.scorer.Scorer.prior_adapter`, the adapter trains on the stream's own
windows from there, and the machine's standardisation, baseline and threshold are always fitted
on its own data. The result is a candidate like any other: :meth:`pdm_edge.registry.Registry.submit`
gates it against the active version on the stream's held-back windows (personalisation stays
local, and a prior that does not fit a machine never becomes its active version).

Importing a package from elsewhere (``pdm-edge fleet import``, over-the-air updates) verifies it
(hashes, signature with ``[fleet] verify_key`` or ``[registry] verify_key``, encoder), stores it
as its class's prior and queues a training job for every configured stream of that class; the
running appliance trains it from the prior and the gate decides (:func:`import_delta_package`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pdm_edge.errors import RegistryError
from pdm_edge.fleet.classes import machine_class
from pdm_edge.fleet.delta import DeltaPackage, base_adapter

if TYPE_CHECKING:
    from pdm_edge.model.encoder import Encoder
    from pdm_edge.model.scorer import ScorerConfig

log = logging.getLogger(__name__)

SUFFIX = ".pdmdelta"


class PriorStore:
    """The fleet priors of one appliance (``{state_dir}/fleet/priors``).

    Args:
        state_dir: the appliance's state directory.
        tag: ``[fleet] machine_class``.
        encoder, encoder_sha256: the frozen encoder (the base adapters are built on it).
        trusted_public_keys: keys a prior must be signed with (PEM paths or key objects);
            empty: signatures are not required.
    """

    def __init__(self, state_dir: str | os.PathLike[str], tag: str, encoder: Encoder, encoder_sha256: str,
                 trusted_public_keys: Iterable[Any] = ()) -> None:
        self.dir = Path(state_dir) / "fleet" / "priors"
        self.tag = tag
        self.encoder, self.sha = encoder, encoder_sha256
        self.keys = list(trusted_public_keys)
        self._bases: dict[str, dict[str, np.ndarray]] = {}
        self._cache: dict[str, tuple[float, dict[str, Any], str]] = {}

    @classmethod
    def for_config(cls, cfg: Any, encoder: Encoder, encoder_sha256: str) -> PriorStore:
        """The store of an :class:`~pdm_edge.config.AppConfig` (``[feedback] state_dir``,
        ``[fleet]``)."""
        key = cfg.fleet.verify_key or cfg.registry.verify_key
        return cls(cfg.feedback.state_dir, cfg.fleet.machine_class, encoder, encoder_sha256, [key] if key else [])

    def class_of(self, config: ScorerConfig) -> str:
        """The machine class of a stream with this scorer configuration."""
        return machine_class(config.kind, config.sample_rate_hz, self.tag)

    def path(self, klass: str) -> Path:
        return self.dir / f"{klass}{SUFFIX}"

    def base(self, config: ScorerConfig) -> dict[str, np.ndarray]:
        """The base adapter of a scorer configuration (cached)."""
        key = repr((config.adapter.to_dict(), config.train.seed))
        if key not in self._bases:
            self._bases[key] = base_adapter(self.encoder, config.adapter, config.train.seed)
        return self._bases[key]

    def save(self, data: bytes, name: str = "package") -> DeltaPackage:
        """Verify package bytes and store them as the prior of their machine class (atomic).

        Raises:
            RegistryError: a failed check (:meth:`DeltaPackage.from_bytes`).
        """
        from pdm_edge._util.fs import atomic_write

        pkg, note = DeltaPackage.from_bytes(data, name=name, trusted_public_keys=self.keys,
                                            require_signature=bool(self.keys), encoder_sha256=self.sha)
        atomic_write(self.path(pkg.meta.machine_class), data)
        log.info("fleet prior for %s stored (round %s, %s)", pkg.meta.machine_class, pkg.meta.round, note)
        return pkg

    def load(self, klass: str) -> DeltaPackage | None:
        """The stored prior of a class, verified, or ``None`` when there is none.

        Raises:
            RegistryError: the stored file fails a check.
        """
        p = self.path(klass)
        if not p.exists():
            return None
        pkg, _ = DeltaPackage.read(p, trusted_public_keys=self.keys, require_signature=bool(self.keys), encoder_sha256=self.sha)
        return pkg

    def adapter_for(self, stream: str, config: ScorerConfig) -> tuple[dict[str, Any], str] | None:
        """The prior adapter ``state_dict`` for a stream and a one-line description, or ``None``
        when its class has no prior or the prior does not fit (logged, never raised: a stream
        then calibrates from scratch)."""
        klass = self.class_of(config)
        p = self.path(klass)
        try:
            mtime = p.stat().st_mtime
        except OSError:
            return None
        hit = self._cache.get(klass)
        if hit is not None and hit[0] == mtime:
            return hit[1], hit[2]
        try:
            pkg = self.load(klass)
            if pkg is None:
                return None
            if pkg.meta.adapter_config != config.adapter.to_dict() or pkg.meta.seed != config.train.seed:
                raise RegistryError(f"prior adapter configuration {pkg.meta.adapter_config} (seed {pkg.meta.seed}) differs from "
                                    f"the stream's {config.adapter.to_dict()} (seed {config.train.seed})")
            state = pkg.apply(self.base(config))
        except RegistryError as exc:
            log.error("%s: fleet prior %s not used: %s", stream, p.name, exc)
            return None
        desc = f"{klass} round {pkg.meta.round} ({pkg.meta.adapter_sha256[:12]})"
        self._cache[klass] = (mtime, state, desc)
        return state, desc


def import_delta_package(path: str | os.PathLike[str], cfg: Any, encoder: Encoder, encoder_sha256: str) -> tuple[DeltaPackage, list[str]]:
    """Import a delta package into an appliance: verify, store as its class's prior, and queue a
    training job (``manual``) for every configured stream of that class, which the running
    appliance trains from the prior and gates like any local candidate.

    Returns:
        the package and the streams whose training was queued.

    Raises:
        RegistryError: a failed check, or the appliance has ``[fleet] enabled = false``.
    """
    from pdm_edge.learning import request_training, scorer_config_for

    if not cfg.fleet.enabled:
        raise RegistryError("[fleet] enabled is false: this appliance does not take fleet priors (opt-in)")
    store = PriorStore.for_config(cfg, encoder, encoder_sha256)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read delta package {path}: {exc.strerror}") from None
    pkg = store.save(data, Path(path).name)
    make = scorer_config_for(cfg)
    queued = []
    for stream in cfg.sensors:
        sc = make(stream)
        if sc is not None and store.class_of(sc) == pkg.meta.machine_class:
            if store.adapter_for(stream, sc) is None:
                raise RegistryError(f"{stream}: the imported prior does not fit its adapter configuration")
            if request_training(cfg.feedback.state_dir, stream, "manual") is not None:
                queued.append(stream)
    return pkg, queued
