"""The appliance side of a federated round: a Flower ``ClientApp`` (Flower 1.42 Message API).

An appliance joins the fleet by running a Flower SuperNode (``pdm-edge fleet join``) whose node
configuration names the appliance's TOML file (``config=...``); the SuperNode runs this app for
every message of a round. It answers three kinds of message:

- ``query``: which machine classes the appliance can train (streams with enough normal windows
  in the replay buffer), and whether it takes part now (``[fleet] enabled``, the UTC
  ``schedule`` window, ``only_when_idle``: no training job of its own running). Metadata only.
- ``train``: the server's global adapter of one machine class arrives as a delta to the base
  (:mod:`pdm_edge.fleet.delta`). For each of the appliance's streams of that class, a scorer
  starts from base + global (:attr:`~pdm_edge.model.scorer.Scorer.prior_adapter`) and is
  calibrated on the stream's replay buffer and labelled windows
  (:func:`pdm_edge.learning.loop.stream_dataset`, :meth:`~pdm_edge.model.scorer.Scorer.calibrate`:
  adapter training with early stopping and a wall-time budget, ``[fleet] max_train_seconds``).
  The reply holds the trained adapter as a delta to the base (the streams' mean when there are
  several), the delta package's metadata (:class:`~pdm_edge.fleet.delta.DeltaMeta`) and
  metrics: nothing else. With differential privacy on, Flower's ``fixedclipping_mod`` clips
  the update to the server's norm before it leaves; with secure aggregation on
  (:mod:`pdm_edge.fleet.secagg`), Flower's ``secaggplus_mod`` masks it so that the server
  only learns the sum over the class's appliances.
- ``evaluate``: the aggregated prior of the round arrives as a signed delta package; it is
  verified (``[fleet] verify_key``) and stored as the class's prior
  (:class:`~pdm_edge.fleet.priors.PriorStore`); the next calibration of a stream of the class
  starts from it and is gated as usual.

The local model version (adapter, baseline, threshold) is never replaced by a round: the
calibration done here only produces the update; personalisation stays local.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pdm_edge._util.sqlite import open_wal
from pdm_edge.fleet.classes import in_schedule
from pdm_edge.fleet.delta import DeltaPackage, data_sha256

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "config"
"""Node-configuration key naming the appliance's TOML file (``--node-config "config='...'"``)."""
ARRAYS, CONFIG, METRICS, META = "arrays", "config", "metrics", "meta"
WEIGHT = "num-examples"
PRIOR_PACKAGE = "prior-package"
TENSOR_NAMES = "tensor-names"
"""Fit-config key of a SecAgg+ round: the adapter tensors' names, in the order of the (unnamed)
legacy parameters the round carries."""
LEGACY_IN, LEGACY_OUT = "fitins", "fitres"


class _Appliance:
    """What a round needs of the appliance, loaded once per process."""

    def __init__(self, config_path: str) -> None:
        from pdm_edge.config import load_config
        from pdm_edge.fleet.priors import PriorStore
        from pdm_edge.model import load_encoder

        self.cfg = load_config(config_path)
        self.encoder, self.sha = load_encoder()
        self.priors = PriorStore.for_config(self.cfg, self.encoder, self.sha)
        self.state_dir = Path(self.cfg.feedback.state_dir)

    def scorer_config(self, stream: str) -> Any:
        from pdm_edge.learning import scorer_config_for
        from pdm_edge.model.scorer import TrainConfig

        return scorer_config_for(self.cfg, TrainConfig(max_seconds=self.cfg.fleet.max_train_seconds))(stream)

    def replay_counts(self) -> dict[str, int]:
        """Training windows per stream in the replay buffer (read-only; {} without a buffer)."""
        path = self.state_dir / "replay.sqlite"
        if not path.exists():
            return {}
        from pdm_edge.learning.replay import ReplayBuffer

        rb = ReplayBuffer.in_dir(self.state_dir, capacity=self.cfg.learning.replay_normal_windows,
                                 gate_fraction=self.cfg.learning.gate_fraction)
        try:
            return {s: rb.counts(s)[0] for s in rb.streams()}
        finally:
            rb.close()

    def classes(self) -> dict[str, list[str]]:
        """Machine class -> the configured streams of it with enough windows to train."""
        counts = self.replay_counts()
        out: dict[str, list[str]] = {}
        for stream in self.cfg.sensors:
            sc = self.scorer_config(stream)
            if sc is not None and counts.get(stream, 0) >= sc.min_windows:
                out.setdefault(self.priors.class_of(sc), []).append(stream)
        return out

    def busy(self) -> bool:
        """Whether the appliance's own training loop has a job running."""
        path = self.state_dir / "learning.sqlite"
        if not path.exists():
            return False
        try:
            con = open_wal(path, readonly=True, timeout_s=5.0)
            try:
                return con.execute("SELECT 1 FROM job WHERE status = 'running' LIMIT 1").fetchone() is not None
            finally:
                con.close()
        except sqlite3.Error:
            return False

    def participation(self) -> tuple[bool, str]:
        fc = self.cfg.fleet
        if not fc.enabled:
            return False, "[fleet] enabled is false (opt-in)"
        if not in_schedule(fc.schedule):
            return False, f"outside the schedule {fc.schedule} UTC"
        if fc.only_when_idle and self.busy():
            return False, "busy: the appliance's own training job is running"
        return True, "ready"

    def train(self, klass: str, global_delta: dict[str, np.ndarray], *,
              proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Train every stream of ``klass`` from base + global (with FedProx's proximal term of
        weight ``proximal_mu`` towards it when > 0); returns the mean delta to the base and the
        delta package metadata (see the module docstring)."""
        from pdm_edge.feedback.labels import LabelBook
        from pdm_edge.feedback.windows import LabelledWindowBuffer
        from pdm_edge.learning.loop import stream_dataset
        from pdm_edge.learning.replay import ReplayBuffer
        from pdm_edge.model.scorer import Scorer

        streams = self.classes().get(klass, [])
        if not streams:
            raise ValueError(f"this appliance has no stream of class {klass} with enough windows")
        rb = ReplayBuffer.in_dir(self.state_dir, capacity=self.cfg.learning.replay_normal_windows,
                                 gate_fraction=self.cfg.learning.gate_fraction)
        book = LabelBook.in_dir(self.state_dir) if (self.state_dir / "labels.sqlite").exists() else None
        lwb = (LabelledWindowBuffer.in_dir(self.state_dir, readonly=True)
               if (self.state_dir / LabelledWindowBuffer.FILENAME).exists() else None)
        deltas, n_norm, n_fault, t0 = [], 0, 0, time.monotonic()
        digests = []
        try:
            for stream in streams:
                sc = self.scorer_config(stream)
                if proximal_mu > 0:
                    sc = dataclasses.replace(sc, train=dataclasses.replace(sc.train, proximal_mu=float(proximal_mu)))
                base = self.priors.base(sc)
                if set(global_delta) != set(base):
                    raise ValueError(f"the server's adapter tensors do not match {stream}'s adapter configuration")
                cand = Scorer(self.encoder, self.sha, sc)
                data = stream_dataset(rb, book, lwb, stream, cand)
                import torch

                cand.prior_adapter = {k: torch.from_numpy(base[k] + global_delta[k]) for k in base}
                cand.learn_features(data["normal"])
                if len(data["fault"]):
                    cand.learn_features(data["fault"], "fault")
                cand.calibrate()
                deltas.append({k: v.detach().numpy().astype(np.float32) - base[k] for k, v in cand.adapter.state_dict().items()})
                n_norm += len(data["normal"])
                n_fault += len(data["fault"])
                digests.append(data_sha256(data["normal"]))
        finally:
            rb.close()
            if book is not None:
                book.close()
            if lwb is not None:
                lwb.close()
        mean = {k: np.mean([d[k] for d in deltas], axis=0).astype(np.float32) for k in deltas[0]}
        sc = self.scorer_config(streams[0])
        base = self.priors.base(sc)
        pkg = DeltaPackage.from_adapter({k: base[k] + mean[k] for k in base}, base, device_id=self.cfg.appliance_id,
                                        stream=",".join(streams), machine_class=klass, kind="update", encoder_sha256=self.sha,
                                        adapter_config=sc.adapter.to_dict(), seed=sc.train.seed,
                                        data_sha256=digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest(),
                                        normal_windows=n_norm, fault_windows=n_fault,
                                        training_seconds=round(time.monotonic() - t0, 3))
        return mean, pkg.meta.to_dict()


_APPLIANCES: dict[str, _Appliance] = {}


def _appliance(context: Context) -> _Appliance:
    path = str(context.node_config.get(NODE_CONFIG_KEY, os.environ.get("PDM_EDGE_CONFIG", "")))
    if not path:
        raise ValueError(f"the SuperNode's node config has no '{NODE_CONFIG_KEY}' (the appliance's TOML file)")
    if path not in _APPLIANCES:
        _APPLIANCES[path] = _Appliance(path)
    return _APPLIANCES[path]


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A Flower ``ArrayRecord`` of named numpy arrays (in the dict's order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def log_round(state_dir: Path, record: dict[str, Any]) -> None:
    """Append one fleet event of this appliance to ``{state_dir}/fleet/rounds.jsonl`` (what
    ``/metrics``, ``pdm-edge fleet status`` and the dashboard's models page show)."""
    path = state_dir / "fleet" / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"ts_ns": time.time_ns(), **record}) + "\n")


def _array_bytes(rec: ArrayRecord) -> int:
    return int(sum(a.nbytes for a in rec.to_numpy_ndarrays()))


def _dp_clipping_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` on train messages whose config carries a clipping norm
    (the server's ``DifferentialPrivacyClientSideFixedClipping``); others pass through."""
    cfgs = list(msg.content.config_records.values())
    if not (msg.metadata.message_type.startswith("train") and cfgs and KEY_CLIPPING_NORM in cfgs[0]):
        return call_next(msg, ctxt)
    replies: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        replies.append(call_next(m, c))
        return replies[-1]

    try:
        return fixedclipping_mod(msg, ctxt, inner)
    except ZeroDivisionError:
        # Flower divides by the update's norm: an update of norm 0 (training kept the global
        # adapter, early stopping) is within any clipping norm and goes out unchanged
        if not replies:
            raise
        return replies[-1]


def _secagg_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` on the train messages of a SecAgg+ round (they carry its
    stage configuration); others pass through."""
    from flwr.client.mod import secaggplus_mod

    if msg.metadata.message_type.startswith("train") and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(mods: list[Any] | None = None) -> ClientApp:
    """The fleet ClientApp; ``mods`` go first (outermost), before the DP clipping mod."""
    app = ClientApp(mods=[*(mods or []), _secagg_when_asked, _dp_clipping_when_asked])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        a = _appliance(context)
        ok, why = a.participation()
        classes = a.classes() if ok else {}
        rec = ConfigRecord({"appliance": a.cfg.appliance_id, "participate": bool(ok and classes),
                            "reason": why if classes or not ok else "no stream with enough windows yet",
                            "classes": json.dumps(sorted(classes)), "encoder-sha256": a.sha})
        return Message(RecordDict({CONFIG: rec}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cpu0, t0 = time.process_time(), time.monotonic()
        a = _appliance(context)
        legacy = f"{LEGACY_IN}.parameters" in msg.content.array_records  # a SecAgg+ round (Flower's legacy records)
        cfg = msg.content[f"{LEGACY_IN}.config" if legacy else CONFIG]
        incoming: ArrayRecord = msg.content[f"{LEGACY_IN}.parameters" if legacy else ARRAYS]
        names = json.loads(str(cfg[TENSOR_NAMES])) if legacy else list(incoming.keys())
        global_delta = dict(zip(names, incoming.to_numpy_ndarrays()))
        mu = float(cfg.get("proximal-mu", 0.0))  # FedProx rounds (Flower's FedProx strategy) send it
        mean, meta = a.train(str(cfg["machine-class"]), global_delta, proximal_mu=mu)
        out = array_record({k: mean[k] for k in names})  # the server's key order (clipping compares it)
        weight = 1 if bool(cfg.get("uniform-weights", False)) else int(meta["normal_windows"])
        metrics = MetricRecord({WEIGHT: weight, "train-seconds": round(time.monotonic() - t0, 3),
                                "cpu-seconds": round(time.process_time() - cpu0, 3),
                                "bytes-in": _array_bytes(incoming), "bytes-out": _array_bytes(out),
                                "normal-windows": int(meta["normal_windows"])})
        log_round(a.state_dir, {"event": "trained", "round": int(cfg.get("server-round", 0)), "machine_class": meta["machine_class"],
                                "streams": meta["stream"], "normal_windows": int(meta["normal_windows"]),
                                "proximal_mu": mu, "secure_aggregation": legacy,
                                "update_l2": float(np.sqrt(sum(float(np.sum(mean[k].astype(np.float64) ** 2)) for k in names))),
                                "cpu_s": metrics["cpu-seconds"],
                                "bytes_in": metrics["bytes-in"], "bytes_out": metrics["bytes-out"]})
        if legacy:  # Flower's FitRes records, which secaggplus_mod masks; the metadata in the clear
            from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
            from flwr.compat.common.recorddict_compat import fitres_to_recorddict

            res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([mean[k] for k in names]), weight,
                         {**{k: v for k, v in metrics.items()}, "delta-meta": json.dumps(meta)})
            return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)
        return Message(RecordDict({ARRAYS: out, METRICS: metrics, META: ConfigRecord({"delta-meta": json.dumps(meta)})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        a = _appliance(context)
        cfg = msg.content[CONFIG]
        stored = 0
        data = cfg.get(PRIOR_PACKAGE)
        if isinstance(data, bytes) and a.cfg.fleet.enabled:
            pkg = a.priors.save(data, f"round-{cfg.get('server-round')}")
            stored = 1
            log_round(a.state_dir, {"event": "prior", "round": pkg.meta.round, "machine_class": pkg.meta.machine_class,
                                    "prior_version": f"{pkg.meta.machine_class}-r{pkg.meta.round}-{pkg.meta.adapter_sha256[:12]}",
                                    "participants": list(pkg.meta.notes.get("participants", [])),
                                    "normal_windows": pkg.meta.normal_windows, "bytes": len(data)})
        return Message(RecordDict({METRICS: MetricRecord({WEIGHT: 1, "prior-stored": stored})}), reply_to=msg)

    return app


app = make_client_app()
