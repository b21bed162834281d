"""The fleet server's round logic: a Flower ``ServerApp`` (Flower 1.42 Message API).

``pdm-edge fleet server`` runs a Flower SuperLink and submits this app (``flwr run``) on a
schedule; appliances' SuperNodes run :mod:`pdm_edge.fleet.client_app`. One run:

1. **Query** every connected node: its machine classes and whether it takes part now
   (opt-in, schedule window, idle). Nodes that do not are left out of the run.
2. **Per machine class** with at least ``min-clients`` participants, Flower's ``FedAvg``
   (McMahan et al. 2017; weighted by normal windows, or uniformly with differential privacy)
   runs ``num-rounds`` rounds on a grid restricted to that class's nodes (:class:`ClassGrid`).
   The global model is the adapter as a delta to its base (:mod:`pdm_edge.fleet.delta`); it
   starts from the class's previous prior when ``out-dir`` holds one. A round waits at most
   ``round-timeout`` seconds for replies; a node that dies mid-round sends none (or an error
   reply from the SuperLink) and the round aggregates the others (``FedAvg`` skips failures).
3. **Differential privacy** (``dp-noise`` > 0): Flower's
   ``DifferentialPrivacyClientSideFixedClipping`` wrapper. Each client clips its update to
   ``dp-clip`` (L2 norm) with Flower's ``fixedclipping_mod`` before sending; the server adds
   Gaussian noise of standard deviation ``dp-noise * dp-clip / n`` to the average (central DP
   with client-side clipping, McMahan et al. 2018, "Learning differentially private recurrent
   language models"). The privacy budget is tracked per round with Flower's ``RdpAccountant``
   (Rényi DP of the Gaussian mechanism, Google's ``dp-accounting``) at ``dp-delta``, client-level
   add-or-remove-one adjacency, no sampling amplification (every participant of the class is
   in every round); epsilon is logged per round. The accountant requires every sampled client
   to reply: with DP on, a round that loses a client is not released (no aggregation, no
   epsilon spent) and the next round tries again.
4. **Publish**: after each round the aggregate becomes the class's fleet prior, a delta package
   (``kind="prior"``) signed with ``signing-key`` (Ed25519, ``pdm-edge models keygen``) written to
   ``{out-dir}/priors/{class}.pdmdelta`` and sent to the class's nodes in the evaluate message;
   each appliance verifies and stores it (:mod:`pdm_edge.fleet.priors`). Every round is appended
   to ``{out-dir}/rounds.jsonl``: class, round, participants, prior version, what changed
   (L2 norm of the change, participants' windows, CPU and traffic), epsilon.

**FedProx** (Li et al. 2020) as an option (``proximal-mu`` > 0): Flower's ``FedProx`` strategy
sends ``proximal-mu`` with every round's training instruction and each client adds the proximal
term ``mu/2 * ||theta - theta_global||^2`` to its adapter training
(:attr:`pdm_edge.model.scorer.TrainConfig.proximal_mu`); aggregation stays FedAvg's.
**Secure aggregation** as an option (``secagg``): Flower's SecAgg+ workflow, so that the server
only ever sees the sum of the class's updates (:mod:`pdm_edge.fleet.secagg`; not together with
differential privacy). TLS and SuperNode authentication are Flower's own (SuperLink
``--ssl-*`` and ``--enable-supernode-auth``; SuperNode ``--root-certificates`` and
``--auth-supernode-*``), set up by ``pdm-edge fleet server`` / ``join``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx

from pdm_edge._util.fs import atomic_write
from pdm_edge.errors import FleetError
from pdm_edge.fleet.client_app import CONFIG, META, METRICS, PRIOR_PACKAGE, WEIGHT, array_record
from pdm_edge.fleet.delta import DeltaPackage

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "num-rounds": 3, "min-clients": 2, "round-timeout": 600.0, "machine-class": "", "out-dir": "fleet-server",
    "signing-key": "", "proximal-mu": 0.0, "dp-noise": 0.0, "dp-clip": 1.0, "dp-delta": 1e-3, "wait-nodes": 60.0,
    "secagg": False, "secagg-shares": 1.0, "secagg-threshold": 0.67,
}
"""Run configuration (``[tool.flwr.app.config]`` of the app, overridden by ``flwr run -c``)."""


class ClassGrid(Grid):
    """A Flower grid that shows a strategy only the nodes of one machine class."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid, self._ids = grid, set(node_ids)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n in self._ids]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class Reply:
    """What the round log keeps of one participant's training reply: its delta package's metadata
    (a dict of :class:`~pdm_edge.fleet.delta.DeltaMeta` fields), CPU seconds and bytes sent."""

    __slots__ = ("meta", "cpu_s", "bytes_out")

    def __init__(self, meta: dict[str, Any], cpu_s: float, bytes_out: int) -> None:
        self.meta, self.cpu_s, self.bytes_out = meta, float(cpu_s), int(bytes_out)

    @classmethod
    def from_metrics(cls, meta_json: str, metrics: Any) -> Reply:
        return cls(json.loads(meta_json) if meta_json else {}, float(metrics["cpu-seconds"]), int(metrics["bytes-out"]))


class PriorPublisher:
    """Publishes every round's aggregate of one machine class as the class's signed prior and
    appends the round to ``{out_dir}/rounds.jsonl`` (see the module docstring). One per class
    and run, whichever aggregation (FedAvg, FedProx, SecAgg+) produced the aggregate."""

    def __init__(self, klass: str, template: DeltaPackage, base: dict[str, np.ndarray], out_dir: Path,
                 signing_key: Any | None, *, proximal_mu: float = 0.0, secure_aggregation: bool = False) -> None:
        self.klass, self.template, self.base, self.out_dir, self.signing_key = klass, template, base, out_dir, signing_key
        self.proximal_mu, self.secure_aggregation = float(proximal_mu), secure_aggregation
        self.previous = {k: np.asarray(v, np.float32) for k, v in template.delta.items()}  # the run starts from it

    def publish(self, server_round: int, delta: dict[str, np.ndarray], replies: list[Reply], spent: Any = None) -> bytes:
        """Sign and write the prior of ``delta`` (the round's aggregate, a delta to ``base``),
        log the round; returns the package's bytes. ``replies`` empty: the round aggregated
        nothing (the prior is the previous one). ``spent``: Flower's privacy spent, or None."""
        delta = {k: np.asarray(v, np.float32) for k, v in delta.items()}
        changed = float(np.sqrt(sum(float(np.sum((delta[k] - self.previous[k]) ** 2)) for k in delta)))
        participants = [r.meta.get("device_id", "?") for r in replies]
        windows = sum(int(r.meta.get("normal_windows", 0)) for r in replies)
        fields = {k: v for k, v in self.template.meta.to_dict().items() if k not in ("base_sha256", "adapter_sha256")}
        fields.update(round=server_round, created_ns=time.time_ns(), normal_windows=windows, kind="prior",
                      device_id="fleet-server", notes={"participants": participants})
        pkg = DeltaPackage.from_adapter({k: self.base[k] + delta[k] for k in self.base}, self.base, **fields)
        data = pkg.to_bytes(self.signing_key)
        atomic_write(self.out_dir / "priors" / f"{self.klass}.pdmdelta", data)
        rec = {"machine_class": self.klass, "round": server_round, "finished_ns": time.time_ns(),
               "participants": participants, "n_participants": len(participants),
               "prior_version": f"{self.klass}-r{server_round}-{pkg.meta.adapter_sha256[:12]}",
               "aggregated": bool(replies), "change_l2": changed, "normal_windows": windows,
               "client_cpu_s_max": max((r.cpu_s for r in replies), default=None),
               "client_bytes_out_max": max((r.bytes_out for r in replies), default=None),
               "prior_bytes": len(data), "proximal_mu": self.proximal_mu, "secure_aggregation": self.secure_aggregation,
               "epsilon": None if spent is None else float(spent.epsilon), "delta": None if spent is None else float(spent.delta)}
        with open(self.out_dir / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("fleet round %d of %s: %d participants, change %s, epsilon %s", server_round, self.klass, len(participants),
                 changed, rec["epsilon"])
        self.previous = delta
        return data


class FleetFedAvg(FedAvg):
    """``FedAvg`` whose every round's aggregate goes to a :class:`PriorPublisher` and is sent
    to the class's nodes in the evaluate message. Aggregation itself is Flower's, unchanged."""

    def __init__(self, publisher: PriorPublisher, privacy: Any = None, **kwargs: Any) -> None:
        super().__init__(train_metrics_aggr_fn=self._train_metrics, **kwargs)
        self.publisher = publisher
        self.privacy = privacy  # () -> PrivacySpent | None
        self._replies: list[RecordDict] = []

    def _train_metrics(self, replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        self._replies = replies
        return aggregate_metricrecords(replies, weighted_by_key)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._replies = []
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        replies = [Reply.from_metrics(str(r[META]["delta-meta"]) if META in r else "", r[METRICS]) for r in self._replies]
        data = self.publisher.publish(server_round, dict(zip(arrays.keys(), arrays.to_numpy_ndarrays())), replies,
                                      self.privacy() if self.privacy is not None else None)
        cfg = ConfigRecord(dict(config))
        cfg[PRIOR_PACKAGE] = data
        cfg["machine-class"] = self.publisher.klass
        return super().configure_evaluate(server_round, arrays, cfg, grid)


class FleetFedProx(FleetFedAvg, FedProx):
    """:class:`FleetFedAvg` with Flower's ``FedProx``: every round's training instruction carries
    ``proximal-mu``, which the clients' training uses (see the module docstring)."""


def query_nodes(grid: Grid, timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every connected node whether it takes part and in which classes."""
    ids = list(grid.get_node_ids())
    msgs = [Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
    out = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log.warning("node %s did not answer the query: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        c = reply.content[CONFIG]
        out[reply.metadata.src_node_id] = {"appliance": str(c["appliance"]), "participate": bool(c["participate"]),
                                           "reason": str(c["reason"]), "classes": json.loads(str(c["classes"])),
                                           "encoder_sha256": str(c["encoder-sha256"])}
    return out


def _template(klass: str, out_dir: Path, verify: Any) -> tuple[DeltaPackage, dict[str, np.ndarray]]:
    """The class's current prior (from ``out_dir``) or a zero delta on the default adapter, and
    its base adapter (the server's encoder, ``models/encoder.pt``, which every participant runs)."""
    from pdm_edge.fleet.delta import base_adapter
    from pdm_edge.model import load_encoder
    from pdm_edge.model.adapter import AdapterConfig

    encoder, sha = load_encoder()
    path = out_dir / "priors" / f"{klass}.pdmdelta"
    if path.exists():
        pkg, _ = DeltaPackage.read(path, trusted_public_keys=verify, encoder_sha256=sha)
        cfg = AdapterConfig.from_dict(pkg.meta.adapter_config)
        return pkg, base_adapter(encoder, cfg, pkg.meta.seed)
    cfg = AdapterConfig()
    base = base_adapter(encoder, cfg, 0)
    pkg = DeltaPackage.from_adapter(base, base, device_id="fleet-server", stream="", machine_class=klass, kind="prior",
                                    encoder_sha256=sha, adapter_config=cfg.to_dict(), seed=0)
    return pkg, base


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One fleet run (see the module docstring)."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from pdm_edge.registry import load_private_key

    rc = {**DEFAULTS, **dict(context.run_config)}
    if bool(rc["secagg"]) and float(rc["dp-noise"]) > 0:
        raise FleetError("secure aggregation (secagg) and differential privacy (dp-noise > 0) are not offered together")
    out_dir = Path(str(rc["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    min_clients, timeout = int(rc["min-clients"]), float(rc["round-timeout"])
    deadline = time.monotonic() + float(rc["wait-nodes"])
    while len(list(grid.get_node_ids())) < min_clients and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = query_nodes(grid, timeout)
    classes: dict[str, list[int]] = {}
    from pdm_edge.model import load_encoder

    _, sha = load_encoder()
    for nid, info in nodes.items():
        if not info["participate"]:
            log.info("node %s (%s) sits this run out: %s", nid, info["appliance"], info["reason"])
            continue
        if info["encoder_sha256"] != sha:
            log.warning("node %s (%s) runs encoder %s..., the server %s...; left out", nid, info["appliance"],
                        info["encoder_sha256"][:12], sha[:12])
            continue
        for k in info["classes"]:
            if not rc["machine-class"] or k == rc["machine-class"]:
                classes.setdefault(k, []).append(nid)
    signing_key = load_private_key(str(rc["signing-key"])) if rc["signing-key"] else None
    verify = [signing_key.public_key()] if signing_key is not None else None
    for klass, ids in sorted(classes.items()):
        if len(ids) < min_clients:
            log.warning("class %s: %d participant(s), fewer than min-clients %d; skipped", klass, len(ids), min_clients)
            continue
        template, base = _template(klass, out_dir, verify)
        dp_noise = float(rc["dp-noise"])
        mu = float(rc["proximal-mu"])
        secure = bool(rc["secagg"])
        publisher = PriorPublisher(klass, template, base, out_dir, signing_key, proximal_mu=mu, secure_aggregation=secure)
        if secure:
            from pdm_edge.fleet.secagg import run_secure_rounds

            run_secure_rounds(ClassGrid(grid, ids), context, publisher, template.delta, num_rounds=int(rc["num-rounds"]),
                              min_clients=min_clients, timeout=timeout, proximal_mu=mu,
                              num_shares=float(rc["secagg-shares"]), reconstruction_threshold=float(rc["secagg-threshold"]))
            continue
        prox: dict[str, Any] = {"proximal_mu": mu} if mu > 0 else {}
        inner = (FleetFedProx if mu > 0 else FleetFedAvg)(
            publisher, fraction_train=1.0, fraction_evaluate=1.0,
            min_train_nodes=min_clients, min_evaluate_nodes=min_clients, min_available_nodes=min_clients,
            weighted_by_key=WEIGHT, **prox)
        strategy: Any = inner
        if dp_noise > 0:
            accountant = RdpAccountant(PrivacyConfig(target_delta=float(rc["dp-delta"]), population_size=len(ids),
                                                     neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                     sampling_method=SamplingMethod.NO_AMPLIFICATION))
            strategy = DifferentialPrivacyClientSideFixedClipping(inner, dp_noise, float(rc["dp-clip"]), len(ids),
                                                                  accountant=accountant)
            inner.privacy = strategy.privacy_spent
        train_cfg = ConfigRecord({"machine-class": klass, "uniform-weights": dp_noise > 0})
        strategy.start(grid=ClassGrid(grid, ids), initial_arrays=array_record(template.delta),
                       num_rounds=int(rc["num-rounds"]), timeout=timeout, train_config=train_cfg,
                       evaluate_config=ConfigRecord({}))
