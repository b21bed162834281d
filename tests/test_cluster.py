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
    settings = {"heartbeat_s": 2, "takeover_delay_s": 0, **cluster}
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}\n"
                    for k, v in settings.items())
    text = (f'appliance_id = "{appliance}"\n[mqtt]\nbroker = "{broker}"\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n'
            f'[cluster]\nenabled = true\ngroup = "site1"\n{extra}' + sensors)
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


@pytest.mark.slow  # 7 s of real-time streams; the end-to-end test below checks the same with two services
def test_a_clean_stop_hands_each_stream_over_at_its_next_window(mosquitto, tmp_path: Path) -> None:
    """Make before break, without scoring: six streams published in real time; edge-a leaves
    while they flow; every window (stream, start) is cut exactly once by one of the two
    ingestors, on one hop grid from the first to the last, and edge-b continued each moved
    stream at edge-a's next window."""
    import threading

    from pdm_edge.ingest import Ingestor
    from pdm_edge.runtime.cluster import Cluster
    from sensors.publisher import ChunkPublisher, publish_timed

    cfgs = {name: _cfg(tmp_path, mosquitto.address, name, STREAMS) for name in ("edge-a", "edge-b")}
    ings = {n: Ingestor(c, clustered=True) for n, c in cfgs.items()}
    clusters = {n: Cluster(cfgs[n], ings[n]) for n in cfgs}
    for n in cfgs:
        clusters[n].start()
        ings[n].start()
    seconds, n_chunks = 6.0, 60
    t0 = (time.time_ns() // 100_000_000 + 5) * 100_000_000

    def publish(i: int, stream: str) -> None:
        site, machine, sensor = stream.split("/")
        pub = ChunkPublisher(MqttConfig(broker=mosquitto.address), site, machine, sensor, sample_rate_hz=FS, unit="g",
                             client_id=f"hand-{i}").start()
        try:
            publish_timed(pub, ((t0 + k * 100_000_000, np.full(CHUNK, i, np.float32)) for k in range(n_chunks)), speed=1.0)
        finally:
            pub.close(10)

    try:
        assert wait_until(lambda: all(len(c.status()["members"]) == 2 for c in clusters.values()), 15)
        moved = clusters["edge-a"].owned
        time.sleep(0.3)
        pubs = [threading.Thread(target=publish, args=(i, s), daemon=True) for i, s in enumerate(STREAMS)]
        for t in pubs:
            t.start()
        while time.time_ns() < t0 + 2_000_000_000:
            time.sleep(0.02)
        clusters["edge-a"].release()
        ings["edge-a"].stop()
        for t in pubs:
            t.join(seconds + 20)
        cut: dict[tuple[str, int], list[str]] = {}
        n_windows = int((seconds - 1.0) / 0.5) + 1

        def collect() -> bool:  # the last chunks may still be on their way to edge-b
            for n, ing in ings.items():
                while not ing.windows.empty():
                    w = ing.windows.get_nowait()
                    cut.setdefault((w.stream, w.start_ns), []).append(n)
            return len(cut) >= n_windows * len(STREAMS)

        assert wait_until(collect, 10)
        time.sleep(0.3)
        collect()
        assert all(len(v) == 1 for v in cut.values()), [k for k, v in cut.items() if len(v) > 1]
        for stream in STREAMS:
            starts = sorted(ts for st, ts in cut if st == stream)
            assert starts == [t0 + j * 500_000_000 for j in range(n_windows)], stream  # none lost
            who = [cut[(stream, ts)][0] for ts in starts]
            if stream in moved:
                k = who.index("edge-b")
                assert set(who[:k]) == {"edge-a"} and set(who[k:]) == {"edge-b"} and 0 < k
            else:
                assert set(who) == {"edge-b"}
        assert ings["edge-b"].stats().handed_over == len(moved)
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



def test_the_owner_publishes_its_active_version_and_the_others_verify_and_activate_it(mosquitto, tmp_path: Path) -> None:
    """Model handover: a version the owner makes active reaches the other instance's registry
    as a signed package (verified against its ``verify_key``) and becomes active there; a
    version of a stream the instance does not own is not published; a forged package is
    refused and counted."""
    import hashlib

    import paho.mqtt.client as mqtt
    import torch

    from pdm_edge.ingest import Ingestor
    from pdm_edge.model.encoder import Encoder, EncoderConfig
    from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
    from pdm_edge.registry import Registry, generate_keypair
    from pdm_edge.runtime.cluster import MODELS_TOPIC, Cluster
    from pdm_edge.types import Window
    from sensors.simulator import VibrationSimulator

    torch.manual_seed(0)
    enc, sha = Encoder(EncoderConfig()), hashlib.sha256(b"pdm-edge tests: cluster, random encoder").hexdigest()
    sim = VibrationSimulator(sample_rate_hz=12_000.0, seed=3)
    windows = [Window("site1", "m0", "accel", "vibration", i * 250_000_000, 12_000.0, "g", sim.generate(3000), i)
               for i in range(12)]
    scorer = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=12_000.0, hop_s=0.25, train_adapter=False,
                                           train=TrainConfig(max_epochs=1, max_seconds=10.0), min_windows=10))
    scorer.learn_many(windows)
    scorer.calibrate()
    priv, pub = generate_keypair(tmp_path / "keys")
    cfgs = {"edge-a": _cfg(tmp_path, mosquitto.address, "edge-a", STREAMS, signing_key=str(priv)),
            "edge-b": _cfg(tmp_path, mosquitto.address, "edge-b", STREAMS, signing_key=str(priv))}
    regs = {n: Registry(tmp_path / n / "registry", trusted_public_keys=[pub]) for n in cfgs}
    ings = {n: Ingestor(c, clustered=True) for n, c in cfgs.items()}
    clusters = {n: Cluster(cfgs[n], ings[n], registry=regs[n], encoder_sha256=sha) for n in cfgs}
    for n in cfgs:
        regs[n].on_change(clusters[n].model_changed)
        clusters[n].start()
    try:
        assert wait_until(lambda: all(len(c.status()["members"]) == 2 for c in clusters.values()), 15)
        mine = sorted(clusters["edge-a"].owned)[0]
        theirs = sorted(clusters["edge-b"].owned)[0]
        for stream in (mine, theirs):
            site, machine, sensor = stream.split("/")
            regs["edge-a"].promote(regs["edge-a"].add_candidate(scorer, site=site, machine=machine, sensor=sensor).id, "calibrated")
        site, machine, sensor = mine.split("/")
        assert wait_until(lambda: regs["edge-b"].active(site, machine, sensor) is not None, 15)
        got, sent = regs["edge-b"].active(site, machine, sensor), regs["edge-a"].active(site, machine, sensor)
        assert got.sha256 == sent.sha256 and got.reason.startswith("cluster: ") and "signed by" in got.origin
        assert clusters["edge-b"].status()["models"]["activated"] == 1
        assert clusters["edge-a"].status()["models"]["published"] == 1  # not the stream edge-b owns
        assert regs["edge-b"].active(*theirs.split("/")) is None
        forged = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        host, port = mosquitto.address.rsplit(":", 1)
        forged.connect(host, int(port))
        forged.loop_start()
        forged.publish(MODELS_TOPIC.format(group="site1", stream=theirs), b"PK not a zip", qos=1).wait_for_publish(5)
        forged.loop_stop()
        forged.disconnect()
        assert wait_until(lambda: clusters["edge-b"].status()["models"]["failed"] == 1, 10)
        assert regs["edge-b"].active(*theirs.split("/")) is None
    finally:
        for n in cfgs:
            clusters[n].release()
            regs[n].close()



def test_a_restart_within_the_takeover_delay_moves_no_stream(mosquitto, tmp_path: Path) -> None:
    """Will Delay Interval: an instance that crashes and is back within ``takeover_delay_s``
    resumes its session, its Will is never sent, the other instance sees no change, and its own
    presence of the previous run is not taken for a second process."""
    from pdm_edge.ingest import Ingestor
    from pdm_edge.runtime.cluster import Cluster

    cfgs = {name: _cfg(tmp_path, mosquitto.address, name, STREAMS, takeover_delay_s=2) for name in ("edge-a", "edge-b")}
    clusters = {n: Cluster(cfgs[n], Ingestor(c, clustered=True)).start() for n, c in cfgs.items()}
    restarted = None
    try:
        assert wait_until(lambda: all(len(c.status()["members"]) == 2 for c in clusters.values()), 15)
        client, clusters["edge-a"]._client = clusters["edge-a"]._client, None
        client.loop_stop()
        client._sock_close()  # crash
        restarted = Cluster(cfgs["edge-a"], Ingestor(cfgs["edge-a"], clustered=True)).start()
        assert restarted.wait_settled(10)
        assert restarted.owned == assignment(STREAMS, ["edge-a", "edge-b"])["edge-a"]
        time.sleep(2.5)  # past the takeover delay: the Will of the crashed connection was cancelled
        assert clusters["edge-b"].status()["members"] == ["edge-a", "edge-b"]
        assert clusters["edge-b"].status()["ownership_changes"] == 0
        assert restarted.status()["instance_conflicts"] == 0
    finally:
        for c in (*clusters.values(), restarted):
            if c is not None:
                c.release()


def test_label_listener_leaves_labels_of_machines_it_does_not_own(mosquitto, tmp_path: Path) -> None:
    """``LabelListener(accept=Cluster.owns_label)``: a valid label the instance does not own is
    acknowledged, counted ``not_owned`` and not stored; an owned one is handed on."""
    import functools
    import json

    import paho.mqtt.client as mqtt

    from pdm_edge.feedback.labels import LabelBook, submit_label
    from pdm_edge.feedback.listener import LabelListener, label_topic

    book = LabelBook(tmp_path / "labels.sqlite")
    listener = LabelListener(MqttConfig(broker=mosquitto.address), "edge-x", functools.partial(submit_label, book),
                             accept=lambda site, machine, sensor: machine == "m1").start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    host, port = mosquitto.address.rsplit(":", 1)
    pub.connect(host, int(port))
    pub.loop_start()
    try:
        assert listener.wait_ready(10)
        for machine in ("m1", "m2"):
            body = {"start_ns": 1_000_000_000, "end_ns": 2_000_000_000, "kind": "normal", "author": "j.doe"}
            pub.publish(label_topic("site1", machine), json.dumps(body), qos=1).wait_for_publish(5)
        assert wait_until(lambda: listener.stats().received == 2, 10)
        assert wait_until(lambda: listener.stats().created == 1, 5)
        assert listener.stats().not_owned == 1 and not listener.stats().deadletters
        assert [lab.machine for lab in book.list()] == ["m1"]
    finally:
        pub.loop_stop()
        pub.disconnect()
        listener.stop()
        book.close()


# -- two real `pdm-edge run` processes --------------------------------------------------------

E2E_STREAMS = [f"site1/m{i}/accel" for i in range(6)]
HOP_NS = 500_000_000


def _service_config(work: Path, broker: str, appliance: str, store: Path) -> str:
    sensors = "".join(f'[sensors."{s}"]\nkind = "vibration"\nsample_rate_hz = 25600\nunit = "g"\nwindow_s = 1.0\nhop_s = 0.5\n'
                      for s in E2E_STREAMS)
    return (f'appliance_id = "{appliance}"\nsite = "site1"\nlog_level = "INFO"\n'
            f'[mqtt]\nbroker = "{broker}"\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n'
            f'[store]\nbackend = "sqlite"\nsqlite_path = "{store}"\n'
            f'[spool]\npath = "{work}/spool.sqlite"\nbackoff_min_s = 0.2\nbackoff_max_s = 1.0\n'
            f'[feedback]\nstate_dir = "{work}/state"\n[registry]\ndir = "{work}/registry"\n'
            '[service]\nhttp = "127.0.0.1:0"\ntorch_threads = 1\nscore_batch = 16\n'
            '[cluster]\nenabled = true\ngroup = "site1"\nheartbeat_s = 5\ntakeover_delay_s = 2\n' + sensors)


def _commission(streams_of: dict[Path, frozenset[str]]) -> None:
    """One calibrated version (real encoder, 1 epoch) added and promoted in each registry for
    the streams given (each instance's own, as if it had calibrated them): no calibration in
    the run, and the other instance gets them only through the cluster's model packages."""
    from pdm_edge.model import load_encoder
    from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
    from pdm_edge.registry import Registry
    from pdm_edge.types import Window
    from sensors.simulator import VibrationSimulator

    enc, sha = load_encoder()
    sim = VibrationSimulator(sample_rate_hz=FS, seed=7)
    windows = [Window("site1", "m0", "accel", "vibration", i * HOP_NS, FS, "g", sim.generate(int(FS)), i) for i in range(30)]
    s = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.5,
                                      train=TrainConfig(max_epochs=1, max_seconds=5.0)))
    s.learn_many(windows)
    s.calibrate()
    for d, streams in streams_of.items():
        with Registry(d) as reg:
            for stream in sorted(streams):
                site, machine, sensor = stream.split("/")
                reg.promote(reg.add_candidate(s, site=site, machine=machine, sensor=sensor, trigger="manual").id, "commissioned")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_two_services_score_each_window_once_split_the_streams_and_take_over_on_stop(
        mosquitto, tmp_path: Path, one_torch_thread: None, how: str) -> None:
    """Two `pdm-edge run` instances, one broker, one SQLite store, six real-time 25.6 kHz streams:
    while both run every window is scored (score message) exactly once and stored, each instance
    scores only the streams it owns and both own some; each instance starts with versions of its
    own streams only and gets the other's through the group's model packages; SIGTERM to one,
    and the other subscribes to its streams and scores their new windows at once with those
    versions (no calibration), continuing each at edge-a's next window: no window lost, none
    twice. SIGKILL instead (a crash, a power cut): the broker sends edge-a's Will after the
    keep-alive (1.5 x heartbeat_s) and the Will Delay (takeover_delay_s), and edge-b takes the
    streams then: the windows in between are lost (counted, printed), none is scored twice.
    The handover figures are printed."""
    import json
    import sqlite3
    import threading

    from pdm_edge._util.procs import ServiceProcess
    from sensors.publisher import ChunkPublisher, publish_timed

    import paho.mqtt.client as mqtt

    store = tmp_path / "store.sqlite"
    works = {n: tmp_path / n for n in ("edge-a", "edge-b")}
    for w in works.values():
        w.mkdir()
    expected = assignment(E2E_STREAMS, list(works))
    assert all(expected[n] for n in works)
    _commission({works[n] / "registry": expected[n] for n in works})
    procs = {n: ServiceProcess(w, _service_config(w, mosquitto.address, n, store)) for n, w in works.items()}
    got: list[tuple[str, int, str, float]] = []  # (stream, window start ns, model version, received at)
    scores = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    scores.on_connect = lambda c, u, f, rc, p: c.subscribe("pdm/v1/+/+/+/score", qos=0)
    scores.on_message = lambda c, u, m: got.append(("/".join(m.topic.split("/")[2:5]), json.loads(m.payload)["ts_ns"],
                                                    json.loads(m.payload)["model_version"], time.time()))
    host, port = mosquitto.address.rsplit(":", 1)
    scores.connect(host, int(port))
    scores.loop_start()
    try:
        for p in procs.values():
            p.start()
        assert wait_until(lambda: all(p.health()["cluster"]["owned"] == sorted(expected[n]) and
                                      p.health()["cluster"]["members"] == sorted(works) for n, p in procs.items()), 60)
        # each got the other's versions (verified, imported, active) through the group
        assert wait_until(lambda: all(p.health()["cluster"]["models"]["activated"] == len(expected[o])
                                      for (n, p), o in zip(procs.items(), ("edge-b", "edge-a"))), 30)
        duration_s, stop_at_s = (24.0 if how == "sigterm" else 28.0), 11.0
        n_chunks = int(duration_s * FS) // CHUNK
        t0 = (time.time_ns() // HOP_NS + 2) * HOP_NS
        stop = threading.Event()

        def publish(i: int, stream: str) -> None:
            site, machine, sensor = stream.split("/")
            rng = np.random.default_rng(i)
            base = (0.05 * rng.standard_normal(10 * CHUNK)).astype(np.float32)
            pub = ChunkPublisher(MqttConfig(broker=mosquitto.address), site, machine, sensor, sample_rate_hz=FS, unit="g",
                                 client_id=f"e2e-pub-{i}").start()
            try:
                publish_timed(pub, ((t0 + k * 100_000_000, base[(k % 10) * CHUNK:(k % 10 + 1) * CHUNK]) for k in range(n_chunks)),
                              speed=1.0, stop=stop)
            finally:
                pub.close(30)

        pubs = [threading.Thread(target=publish, args=(i, s), daemon=True) for i, s in enumerate(E2E_STREAMS)]
        for t in pubs:
            t.start()
        while time.time_ns() < t0 + int(stop_at_s * 1e9):
            time.sleep(0.05)
        scored_a = {(lab["site"], lab["machine"], lab["sensor"]): v for n, lab, v in procs["edge-a"].metrics()
                    if n == "pdm_edge_windows_scored_total" and v > 0}
        stop_wall = time.time()
        stop_ns = time.time_ns()
        if how == "sigterm":
            assert procs["edge-a"].terminate(60) == 0
        else:
            procs["edge-a"].kill()
        for t in pubs:
            t.join(duration_s + 30)
        b = procs["edge-b"]
        assert wait_until(lambda: b.health()["queues"]["windows"] == 0 and b.health()["spool"]["depth"] == 0, 30)
        time.sleep(1.0)
        health_b = b.health()
        scored_b = {(lab["site"], lab["machine"], lab["sensor"]): v for n, lab, v in b.metrics()
                    if n == "pdm_edge_windows_scored_total" and v > 0}
        assert b.terminate(60) == 0
    finally:
        stop_ev = locals().get("stop")
        if stop_ev is not None:
            stop_ev.set()
        scores.disconnect()
        scores.loop_stop()
        for p in procs.values():
            p.kill()

    # while both run: each instance scored only (and all of) its own streams
    assert {"/".join(k) for k in scored_a} == expected["edge-a"]
    scored_b = {"/".join(k): int(v) for k, v in scored_b.items()}
    assert set(scored_b) == set(E2E_STREAMS)
    for stream in expected["edge-a"]:  # edge-b scores the moved streams with edge-a's versions, no calibration
        assert health_b["streams"][stream]["state"] == "scoring"
        assert health_b["streams"][stream]["version"] == f"{stream.split('/')[1]}-accel-v1"
    assert health_b["cluster"]["models"]["failed"] == 0
    assert health_b["cluster"]["owned"] == sorted(E2E_STREAMS) and health_b["cluster"]["members"] == ["edge-b"]
    assert health_b["cluster"]["ownership_changes"] == len(expected["edge-a"])
    # every window scored once: no (stream, window start) in two score messages, and stored
    by: dict[tuple[str, int], int] = {}
    for stream, ts, _, _ in got:
        by[(stream, ts)] = by.get((stream, ts), 0) + 1
    dup = {k: v for k, v in by.items() if v > 1}
    assert not dup, f"windows scored twice: {sorted(dup.items())[:10]}"
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as con:
        rows = {(f"{s}/{m}/{x}", ts) for s, m, x, ts in con.execute("SELECT site, machine, sensor, start_ns FROM anomaly_score")}
    unstored = set(by) - rows  # SIGKILL: scores edge-a published but had not written yet (in its spool)
    assert rows <= set(by) and (how == "sigkill" or not unstored)  # every scored window stored (one row per key)
    lost_total, takeover_s, coverage_s = 0, [], []
    for stream in E2E_STREAMS:
        starts = sorted(ts for st, ts in rows if st == stream)
        assert starts[0] == t0  # from the first window of every stream...
        assert starts[-1] >= t0 + int((duration_s - 1.5) * 1e9)  # ...to the last ones
        if stream in expected["edge-b"]:
            assert scored_b[stream] == len(starts)
            assert all(b_ - a_ == HOP_NS for a_, b_ in zip(starts, starts[1:])), f"{stream} (never moved) lost windows"
            continue
        # a moved stream: edge-a's windows, then edge-b's (its last scored_b[stream], all after the stop)
        k = len(starts) - scored_b[stream]
        assert 0 < k < len(starts)
        # edge-a scored until it handed the stream over, [cluster] grace after SIGTERM (1 s window + 0.5 s)
        assert starts[k - 1] < stop_ns + 3_000_000_000 and (how == "sigkill" or stop_ns - 1_000_000_000 < starts[k - 1])
        assert all(b_ - a_ == HOP_NS for a_, b_ in zip(starts[:k], starts[1:k]))
        assert all(b_ - a_ == HOP_NS for a_, b_ in zip(starts[k:], starts[k + 1:]))
        lost_total += round((starts[k] - starts[k - 1]) / HOP_NS) - 1  # hop-grid windows between the two owners
        first_b = min(t for st, ts, v, t in got if st == stream and ts == starts[k])
        takeover_s.append(first_b - stop_wall)  # SIGTERM -> first score of the new owner published
        coverage_s.append((starts[k] - starts[k - 1]) / 1e9)
    n_moved = len(expected["edge-a"])
    print(f"\ncluster handover ({how}): {n_moved} streams moved; windows lost {lost_total} ({lost_total / n_moved:.1f} per "
          f"stream at 1 s window / 0.5 s hop; gap between the two owners' window starts {min(coverage_s):.2f}-"
          f"{max(coverage_s):.2f} s); new owner's first score {min(takeover_s):.2f}-{max(takeover_s):.2f} s after "
          f"{how.upper()}; windows scored {len(by)}, each once"
          + (f", {len(unstored)} of them not stored (left in the killed instance's spool)" if how == "sigkill" else ""))
    if how == "sigkill":  # the broker sees the socket close at once: Will after takeover_delay_s (2 s); a
        assert max(takeover_s) < 15.0  # silent link (power cut) after the keep-alive, 1.5 x heartbeat_s (7.5 s), too
        return
    assert max(takeover_s) < 10.0
    assert lost_total == 0  # the clean handover: edge-b continues at edge-a's next window
    assert health_b["ingest"]["handed_over"] == n_moved
