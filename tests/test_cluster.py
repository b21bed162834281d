"""Several ``pdm-edge run`` instances sharing one site's streams (``[cluster]``, issue 16):
rendezvous ownership, membership over a real Mosquitto, and (slow) two real services."""

from __future__ import annotations

import statistics
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from pdm_edge.config import MqttConfig, config_from_dict
from pdm_edge.errors import ConfigError
from pdm_edge.runtime.cluster import assignment, owner, weight

from .conftest import wait_until

FS = 25600.0
CHUNK = 2560


# -- rendezvous hashing -------------------------------------------------------------------------

def _keys(n: int) -> list[str]:
    return [f"plant1/pump-{i:03d}/de-accel" for i in range(n)]


def test_weight_is_stable_and_owner_deterministic() -> None:
    # sha256-based: the same number in every process (Python's hash() is salted per process)
    assert weight("edge-a", "plant1/pump-000/de-accel") == 0xC43C3B1D57630736
    assert weight("edge-a", "x") != weight("edge-b", "x")
    assert owner("x", ["a", "b", "c"]) == owner("x", ["c", "b", "a"])  # member order does not matter
    assert owner("x", []) is None
    assert owner("x", ["only"]) == "only"


def test_assignment_splits_keys_evenly() -> None:
    keys, members = _keys(2000), ["edge-a", "edge-b", "edge-c", "edge-d"]
    a = assignment(keys, members)
    assert sorted(k for v in a.values() for k in v) == sorted(keys)  # every key exactly once
    sizes = [len(v) for v in a.values()]
    assert all(abs(n - 500) < 75 for n in sizes), sizes  # within 15 % of an even share
    assert statistics.pstdev(sizes) < 50


def test_a_joining_member_takes_only_its_share_and_a_leaving_one_moves_only_its_keys() -> None:
    keys, members = _keys(2000), ["edge-a", "edge-b", "edge-c"]
    before = assignment(keys, members)
    owner_before = {k: m for m, ks in before.items() for k in ks}
    after = assignment(keys, [*members, "edge-d"])
    moved = {k for k in keys if k not in before[owner_before[k]] or k in after["edge-d"]}
    assert moved == set(after["edge-d"])  # only keys the new member wins move, all to it
    assert 400 < len(moved) < 600  # about 1/4 of them
    gone = assignment(keys, ["edge-a", "edge-c"])  # edge-b leaves
    for m in ("edge-a", "edge-c"):
        assert before[m] <= gone[m]  # nobody else's keys move
    assert gone["edge-a"] | gone["edge-c"] == set(keys)


# -- configuration ------------------------------------------------------------------------------

def _cfg(tmp: Path, broker: str, appliance: str, streams: list[str], **cluster: object) -> object:
    sensors = "".join(f'[sensors."{s}"]\nkind = "vibration"\nsample_rate_hz = 25600\nunit = "g"\nwindow_s = 1.0\nhop_s = 0.5\n'
                      for s in streams)
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}\n"
                    for k, v in cluster.items())
    text = (f'appliance_id = "{appliance}"\n[mqtt]\nbroker = "{broker}"\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n'
            f'[cluster]\nenabled = true\ngroup = "site1"\nheartbeat_s = 2\ntakeover_delay_s = 0\n{extra}' + sensors)
    return config_from_dict(tomllib.loads(text), environ={}, base_dir=tmp)


def test_cluster_config_defaults_and_refusals(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.0.1:1883", "edge-a", ["s/m1/x"])
    assert cfg.cluster.enabled and cfg.cluster_instance == "edge-a"  # the appliance id by default
    assert _cfg(tmp_path, "127.0.0.1:1883", "edge-a", ["s/m1/x"], instance="n1").cluster_instance == "n1"
    base = {"mqtt": {"broker": "127.0.0.1:1883"}, "cluster": {"enabled": True},
            "sensors": {"s/m/x": {"kind": "vibration", "sample_rate_hz": 100.0, "unit": "g"}}}
    for change, word in ((lambda d: d["mqtt"].update(protocol="3.1.1"), "protocol"),
                         (lambda d: d.update(ingest={"unknown_streams": "accept"}), "unknown_streams"),
                         (lambda d: d.pop("sensors"), "sensors"),
                         (lambda d: d["cluster"].update(instance="a/b"), "instance")):
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        change(data)
        with pytest.raises(ConfigError, match=word):
            config_from_dict(data, environ={})


# -- membership and subscriptions over a real broker (two ingestors, no scoring) -----------------

STREAMS = [f"site1/m{i}/accel" for i in range(6)]


def _publish_one_chunk_each(address: str, streams: list[str], t_ns: int, seq: int) -> None:
    from sensors.publisher import ChunkPublisher

    for s in streams:
        site, machine, sensor = s.split("/")
        pub = ChunkPublisher(MqttConfig(broker=address), site, machine, sensor, sample_rate_hz=FS, unit="g",
                             first_seq=seq, client_id=f"t-{machine}").start()
        try:
            pub.publish(np.zeros(CHUNK, np.float32), t_ns)
        finally:
            pub.close(10)


def test_two_instances_split_streams_by_exact_subscription_and_one_takes_over_when_the_other_stops(
        mosquitto, tmp_path: Path) -> None:
    """Each configured stream reaches exactly its rendezvous owner; a clean stop moves the
    leaver's streams to the other at once; the members, ownership and counters are reported."""
    from pdm_edge.ingest import Ingestor
    from pdm_edge.runtime.cluster import Cluster

    cfgs = {name: _cfg(tmp_path, mosquitto.address, name, STREAMS) for name in ("edge-a", "edge-b")}
    ings = {n: Ingestor(c, clustered=True) for n, c in cfgs.items()}
    clusters = {n: Cluster(cfgs[n], ings[n]) for n in cfgs}
    try:
        for n in cfgs:
            clusters[n].start()
            ings[n].start()
        expected = assignment(STREAMS, ["edge-a", "edge-b"])
        assert all(expected[n] for n in cfgs), "test streams must be split between both"
        assert wait_until(lambda: all(clusters[n].owned == expected[n] for n in cfgs), 15)
        assert all(c.status()["members"] == ["edge-a", "edge-b"] for c in clusters.values())
        time.sleep(0.5)  # the subscriptions are acknowledged
        t0 = time.time_ns()
        _publish_one_chunk_each(mosquitto.address, STREAMS, t0, 0)
        assert wait_until(lambda: sum(i.stats().received for i in ings.values()) == len(STREAMS), 10)
        for n, ing in ings.items():
            assert ing.wait_idle(5)
            assert set(ing.stats().streams) == expected[n]  # exact subscriptions: only its own streams
            assert ing.stats().not_owned == 0
        # a label of a machine goes to the owner of its streams only
        m_a = next(iter(expected["edge-a"])).split("/")[1]
        assert clusters["edge-a"].owns_label("site1", m_a, None) and not clusters["edge-b"].owns_label("site1", m_a, None)
        assert clusters["edge-a"].owns_label("site1", "unconfigured", None) != clusters["edge-b"].owns_label(
            "site1", "unconfigured", None)
        clusters["edge-a"].release()
        ings["edge-a"].stop()
        assert wait_until(lambda: clusters["edge-b"].owned == frozenset(STREAMS), 10)
        status = clusters["edge-b"].status()
        assert status["members"] == ["edge-b"] and status["ownership_changes"] == len(expected["edge-a"])
        time.sleep(0.5)
        _publish_one_chunk_each(mosquitto.address, STREAMS, t0 + 100_000_000, 1)
        assert wait_until(lambda: set(ings["edge-b"].stats().streams) == set(STREAMS), 10)
    finally:
        for n in cfgs:
            clusters[n].release()
            ings[n].stop()


def test_a_crashed_instance_is_removed_by_its_will(mosquitto, tmp_path: Path) -> None:
    """The broker publishes the empty retained Will of an instance whose connection dies (here:
    its socket closed without DISCONNECT), and the survivor takes its streams."""
    from pdm_edge.ingest import Ingestor
    from pdm_edge.runtime.cluster import Cluster

    cfgs = {name: _cfg(tmp_path, mosquitto.address, name, STREAMS) for name in ("edge-a", "edge-b")}
    ings = {n: Ingestor(c, clustered=True) for n, c in cfgs.items()}
    clusters = {n: Cluster(cfgs[n], ings[n]).start() for n in cfgs}
    try:
        assert wait_until(lambda: all(len(c.status()["members"]) == 2 for c in clusters.values()), 15)
        victim = clusters["edge-a"]
        client, victim._client = victim._client, None
        client.loop_stop()
        client._sock_close()  # a crash: no DISCONNECT, no cleared presence
        assert wait_until(lambda: clusters["edge-b"].owned == frozenset(STREAMS), 10)
        assert clusters["edge-b"].status()["members"] == ["edge-b"]
    finally:
        for n in cfgs:
            clusters[n].release()
