"""Fleet rounds with secure aggregation: Flower's SecAgg+ workflow (Flower 1.42).

With ``secagg`` on, the server never sees one appliance's adapter update, only the sum of all of
them: each appliance adds pairwise masks that cancel in the sum, and shares its mask seeds with
Shamir's secret sharing so that the server can remove the masks of an appliance that drops out
(SecAgg+, Bell et al. 2020, "Secure single-server aggregation with (poly)logarithmic
overhead"; Flower's ``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the appliance).

Flower implements SecAgg+ for its legacy strategy API only, so a class's rounds run here through
Flower's ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as the training step and Flower's
legacy ``FedAvg``; the query before and the prior publication after each round are the same as
without it (:class:`~pdm_edge.fleet.server_app.PriorPublisher`; the prior reaches the nodes in
the same evaluate message). Differences the operator sees:

- every update is weighted equally (the weights would otherwise be in the clear and the
  quantisation coarser; ``max_weight`` 1);
- updates are clipped to ``[-clip_range, clip_range]`` per parameter and quantised to
  ``2**22`` levels before masking (Flower's defaults; adapter deltas are far inside the range);
- the round log has no per-appliance CPU or traffic figures from the clients' metrics beyond
  what each reply carries in the clear (its metadata; never its tensors);
- differential privacy is not combined with it here (Flower's client-side clipping wrapper is
  a Message-API strategy): ``dp-noise`` > 0 with ``secagg`` is refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from pdm_edge.errors import FleetError
from pdm_edge.fleet.client_app import CONFIG, PRIOR_PACKAGE, TENSOR_NAMES

log = logging.getLogger(__name__)

__all__ = ["run_secure_rounds"]


def run_secure_rounds(grid: Any, context: Any, publisher: Any, initial: dict[str, np.ndarray], *, num_rounds: int,
                      min_clients: int, timeout: float, proximal_mu: float = 0.0, num_shares: float = 1.0,
                      reconstruction_threshold: float = 0.67, clip_range: float = 8.0) -> None:
    """Run ``num_rounds`` SecAgg+ rounds of one machine class on ``grid`` (already restricted to
    the class's nodes) starting from ``initial`` (the class's prior, a delta to the base); after
    each round ``publisher.publish`` signs and logs the aggregate, which is sent to the nodes.

    Args:
        num_shares: fraction of the round's participants each appliance shares its mask seeds
            with (Flower's ``num_shares`` as a float).
        reconstruction_threshold: fraction of those shares needed to remove a dropped-out
            appliance's mask (at least 2): a round survives as many dropouts as leave this many.
        clip_range: per-parameter clipping range before quantisation.

    Raises:
        FleetError: fewer than 3 ``min_clients`` (pairwise masks between two appliances would let
            each learn the other's update from the sum).
    """
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from pdm_edge.fleet.server_app import Reply

    if min_clients < 3:
        raise FleetError("SecAgg+ needs at least 3 participants per class (min-clients >= 3)")
    names = list(initial)
    klass = publisher.klass
    replies: list[Reply] = []

    class _Strategy(LegacyFedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            replies.clear()
            replies.extend(Reply.from_metrics(str(res.metrics.get("delta-meta", "")), res.metrics) for _, res in results)
            return super().aggregate_fit(server_round, results, failures)

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"machine-class": klass, "uniform-weights": True, "proximal-mu": float(proximal_mu),
                "server-round": server_round, TENSOR_NAMES: json.dumps(names)}

    strategy = _Strategy(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_clients,
                         min_available_clients=min_clients, on_fit_config_fn=fit_config,
                         initial_parameters=ndarrays_to_parameters([initial[k] for k in names]))

    def publish_and_send(grid: Any, ctx: Any) -> None:
        rnd = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        arrays = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        data = publisher.publish(rnd, dict(zip(names, arrays)), list(replies))
        replies.clear()
        msgs = [Message(RecordDict({CONFIG: ConfigRecord({PRIOR_PACKAGE: data, "server-round": rnd, "machine-class": klass})}),
                        dst_node_id=n, message_type=MessageType.EVALUATE, group_id=str(rnd)) for n in grid.get_node_ids()]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                log.warning("node %s did not store the prior of round %d: %s", reply.metadata.src_node_id, rnd,
                            reply.error.reason)

    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=float(num_shares), reconstruction_threshold=float(reconstruction_threshold),
                                        max_weight=1.0, clipping_range=float(clip_range), timeout=timeout),
        evaluate_workflow=publish_and_send)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
                           strategy=strategy)
    workflow(grid, legacy)
