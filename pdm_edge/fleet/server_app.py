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
Secure aggregation (SecAgg+) is Flower's workflow for the legacy strategy API and is not wired
into this Message-API app; TLS and SuperNode authentication are Flower's own (SuperLink
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
from pdm_edge.fleet.client_app import CONFIG, META, METRICS, PRIOR_PACKAGE, WEIGHT, array_record
from pdm_edge.fleet.delta import DeltaPackage

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "num-rounds": 3, "min-clients": 2, "round-timeout": 600.0, "machine-class": "", "out-dir": "fleet-server",
    "signing-key": "", "proximal-mu": 0.0, "dp-noise": 0.0, "dp-clip": 1.0, "dp-delta": 1e-3, "wait-nodes": 60.0,
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


class FleetFedAvg(FedAvg):
    """``FedAvg`` that publishes every round's aggregate as the class's signed prior and logs
    the round (see the module docstring). Aggregation itself is Flower's, unchanged."""

    def __init__(self, klass: str, template: DeltaPackage, base: dict[str, np.ndarray], out_dir: Path,
                 signing_key: Any | None, privacy: Any = None, **kwargs: Any) -> None:
        super().__init__(train_metrics_aggr_fn=self._train_metrics, **kwargs)
        self.klass, self.template, self.base, self.out_dir, self.signing_key = klass, template, base, out_dir, signing_key
        self.privacy = privacy  # () -> PrivacySpent | None
        self._replies: list[RecordDict] = []
        self._previous: dict[str, np.ndarray] | None = None
        self.rounds: list[dict[str, Any]] = []

    def _train_metrics(self, replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        self._replies = replies
        return aggregate_metricrecords(replies, weighted_by_key)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._replies = []
        if self._previous is None:
            self._previous = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        delta = {k: np.asarray(v, np.float32) for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
        participants, windows, cpu, bytes_out = [], 0, [], []
        for r in self._replies:
            meta = json.loads(str(r[META]["delta-meta"])) if META in r else {}
            m = r[METRICS]
            participants.append(meta.get("device_id", "?"))
            windows += int(meta.get("normal_windows", 0))
            cpu.append(float(m["cpu-seconds"]))
            bytes_out.append(int(m["bytes-out"]))
        changed = float(np.sqrt(sum(float(np.sum((delta[k] - self._previous[k]) ** 2)) for k in delta))) if self._previous else None
        spent = self.privacy() if self.privacy is not None else None
        fields = {k: v for k, v in self.template.meta.to_dict().items() if k not in ("base_sha256", "adapter_sha256")}
        fields.update(round=server_round, created_ns=time.time_ns(), normal_windows=windows, kind="prior",
                      device_id="fleet-server", notes={"participants": participants})
        pkg = DeltaPackage.from_adapter({k: self.base[k] + delta[k] for k in self.base}, self.base, **fields)
        data = pkg.to_bytes(self.signing_key)
        path = self.out_dir / "priors" / f"{self.klass}.pdmdelta"
        atomic_write(path, data)
        rec = {"machine_class": self.klass, "round": server_round, "finished_ns": time.time_ns(),
               "participants": participants, "n_participants": len(participants),
               "prior_version": f"{self.klass}-r{server_round}-{pkg.meta.adapter_sha256[:12]}",
               "aggregated": bool(self._replies), "change_l2": changed, "normal_windows": windows,
               "client_cpu_s_max": max(cpu) if cpu else None, "client_bytes_out_max": max(bytes_out) if bytes_out else None,
               "prior_bytes": len(data), "proximal_mu": float(getattr(self, "proximal_mu", 0.0)),
               "epsilon": None if spent is None else float(spent.epsilon), "delta": None if spent is None else float(spent.delta)}
        with open(self.out_dir / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        self.rounds.append(rec)
        log.info("fleet round %d of %s: %d participants, change %s, epsilon %s", server_round, self.klass, len(participants),
                 changed, rec["epsilon"])
        self._previous = delta
        cfg = ConfigRecord(dict(config))
        cfg[PRIOR_PACKAGE] = data
        cfg["machine-class"] = self.klass
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
        prox: dict[str, Any] = {"proximal_mu": mu} if mu > 0 else {}
        inner = (FleetFedProx if mu > 0 else FleetFedAvg)(
            klass, template, base, out_dir, signing_key, fraction_train=1.0, fraction_evaluate=1.0,
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
