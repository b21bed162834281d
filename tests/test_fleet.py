"""Tests of pdm_edge.fleet: the delta package, fleet priors through the gate, the Flower apps
(privacy of what a client sends), and a loopback federation of real Flower processes (slow).

Like tests/test_registry.py, the fast tests use a randomly initialised encoder with a made-up
sha256, the vibration simulator at 12 kHz (0.25 s windows) and 2 adapter epochs.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pdm_edge.broker import free_port
from pdm_edge.config import config_from_dict
from pdm_edge.errors import RegistryError
from pdm_edge.fleet.classes import in_schedule, machine_class, parse_schedule, rate_band
from pdm_edge.fleet.delta import DeltaPackage, base_adapter, data_sha256
from pdm_edge.fleet.priors import PriorStore, import_delta_package
from pdm_edge.learning import build_learning
from pdm_edge.model.adapter import AdapterConfig
from pdm_edge.model.encoder import Encoder, EncoderConfig
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
from pdm_edge.registry import Registry, generate_keypair, load_private_key
from pdm_edge.types import Window
from sensors.simulator import VibrationSimulator

FS = 12_000.0
WIN_S = 0.25
ENCODER_SHA = hashlib.sha256(b"pdm-edge tests: randomly initialised encoder, seed 0").hexdigest()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def enc() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig()).eval()


def _windows(count: int, seed: int = 1, first: int = 0) -> list[Window]:
    sim = VibrationSimulator(sample_rate_hz=FS, seed=seed)
    n = int(FS * WIN_S)
    return [Window("site", "m1", "de", "vibration", i * round(WIN_S * 1e9), FS, "g", sim.generate(n), i)
            for i in range(first, first + count)]


def _cfg(**train) -> ScorerConfig:
    return ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, train=TrainConfig(max_epochs=2, max_seconds=20.0, **train))


@pytest.fixture(scope="module")
def trained(enc: Encoder) -> Scorer:
    s = Scorer(enc, ENCODER_SHA, _cfg())
    s.learn_many(_windows(40))
    s.calibrate()
    return s


def _package(enc: Encoder, scorer: Scorer, **meta) -> DeltaPackage:
    base = base_adapter(enc, scorer.config.adapter, scorer.config.train.seed)
    fields = dict(device_id="app-1", stream="site/m1/de", machine_class=machine_class("vibration", FS, "pump"), kind="update",
                  encoder_sha256=ENCODER_SHA, adapter_config=scorer.config.adapter.to_dict(), seed=scorer.config.train.seed,
                  data_sha256=data_sha256(np.zeros((1, 2, 64, 32), np.float32)), normal_windows=40, training_seconds=1.5)
    fields.update(meta)
    return DeltaPackage.from_adapter(scorer.adapter.state_dict(), base, **fields)


# -- machine classes and schedule ----------------------------------------------------------------
def test_machine_class_bands_and_schedule() -> None:
    assert rate_band(25_600) == "16-32k" and rate_band(12_000) == "8-16k" and rate_band(48_000) == "32-64k"
    assert machine_class("vibration", 25_600, "pump-a") == "vibration-16-32k-pump-a"
    with pytest.raises(ValueError):
        rate_band(0)
    import datetime as dt

    night = dt.datetime(2026, 1, 1, 2, 30, tzinfo=dt.timezone.utc)
    noon = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert in_schedule("22:00-06:00", night) and not in_schedule("22:00-06:00", noon)
    assert in_schedule("00:00-24:00", noon)
    for bad in ("25:00-01:00", "1:00-2:00", "00:00-24:30"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_fleet_config_is_opt_in_and_validated() -> None:
    cfg = config_from_dict({"mqtt": {"broker": "localhost:1883"}}, environ={})
    assert cfg.fleet.enabled is False
    with pytest.raises(Exception, match="schedule"):
        config_from_dict({"mqtt": {"broker": "localhost:1883"}, "fleet": {"schedule": "soon"}}, environ={})


# -- the delta package ------------------------------------------------------------------------------
def test_delta_package_round_trip_signed_and_small(enc: Encoder, trained: Scorer, tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    pkg = _package(enc, trained)
    path = pkg.write(tmp_path / "u.pdmdelta", load_private_key(priv))
    size = path.stat().st_size
    n_params = sum(v.size for v in pkg.delta.values())
    assert size <= 256 * 1024, size
    assert size < n_params * 4  # compressed below the raw float32 bytes
    back, note = DeltaPackage.read(path, trusted_public_keys=[pub], require_signature=True, encoder_sha256=ENCODER_SHA)
    assert note.startswith("signed by ")
    assert back.meta == pkg.meta
    state = back.apply(base_adapter(enc, trained.config.adapter, 0))
    for k, v in trained.adapter.state_dict().items():
        assert torch.allclose(state[k], v, rtol=0, atol=1e-6), k  # float32 rounding of (a - b) + b
    # the members are exactly the manifest, the arrays and the signature; arrays have adapter shapes only
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["delta.npz", "manifest.json", "manifest.sig"]
        meta = json.loads(zf.read("manifest.json"))["meta"]
    assert {"device_id", "stream", "machine_class", "data_sha256", "normal_windows", "fault_windows",
            "training_seconds", "encoder_sha256"} <= set(meta)


def test_delta_package_refuses_tampering_wrong_key_encoder_and_base(enc: Encoder, trained: Scorer, tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k1")
    _, other_pub = generate_keypair(tmp_path / "k2")
    pkg = _package(enc, trained)
    data = pkg.to_bytes(load_private_key(priv))
    with pytest.raises(RegistryError, match="does not verify"):
        DeltaPackage.from_bytes(data, trusted_public_keys=[other_pub])
    with pytest.raises(RegistryError, match="not signed"):
        DeltaPackage.from_bytes(pkg.to_bytes(), require_signature=True)
    with pytest.raises(RegistryError, match="incompatible"):
        DeltaPackage.from_bytes(data, encoder_sha256="0" * 64)
    # a changed array: the manifest's sha256 no longer matches
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(buf, "w") as zout:
        for n in zin.namelist():
            payload = zin.read(n)
            if n == "delta.npz":
                arrays = dict(np.load(io.BytesIO(payload)))
                k = sorted(arrays)[0]
                arrays[k] = arrays[k] + 1.0
                b = io.BytesIO()
                np.savez(b, **arrays)
                payload = b.getvalue()
            zout.writestr(n, payload)
    with pytest.raises(RegistryError, match="sha256"):
        DeltaPackage.from_bytes(buf.getvalue(), trusted_public_keys=[pub])
    with pytest.raises(RegistryError, match="not a readable zip"):
        DeltaPackage.from_bytes(b"not a zip")
    # another base (adapter rank) is refused before anything is applied
    other_base = base_adapter(enc, AdapterConfig(rank=4), seed=1)
    with pytest.raises(RegistryError, match="another base"):
        pkg.apply(other_base)


def test_delta_package_of_the_shipped_encoder_is_under_256_kb(tmp_path: Path) -> None:
    from pdm_edge.model import load_encoder

    encoder, sha = load_encoder()
    cfg = ScorerConfig(kind="vibration", sample_rate_hz=25_600.0, hop_s=1.0)
    base = base_adapter(encoder, cfg.adapter, 0)
    rng = np.random.default_rng(0)  # a trained adapter: every tensor moved away from the base
    adapter = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    pkg = DeltaPackage.from_adapter(adapter, base, device_id="a", stream="s/m/x", machine_class="vibration-16-32k-default",
                                    kind="update", encoder_sha256=sha, adapter_config=cfg.adapter.to_dict(), seed=0)
    size = len(pkg.to_bytes())
    assert size <= 256 * 1024, size


# -- priors: a calibration starts from the prior; import goes through the gate ---------------------------
def test_scorer_calibration_starts_from_the_prior(enc: Encoder, trained: Scorer) -> None:
    prior = {k: v.clone() for k, v in trained.adapter.state_dict().items()}
    s = Scorer(enc, ENCODER_SHA, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, train_adapter=False))
    s.prior_adapter = prior
    s.learn_many(_windows(30, seed=5))
    s.calibrate()
    for k, v in s.adapter.state_dict().items():
        assert torch.equal(v, prior[k]), k
    fresh = Scorer(enc, ENCODER_SHA, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, train_adapter=False))
    assert not all(torch.equal(v, prior[k]) for k, v in fresh.adapter.state_dict().items())


def _app_config(tmp_path: Path, **fleet) -> object:
    return config_from_dict({
        "mqtt": {"broker": "localhost:1883"},
        "feedback": {"state_dir": str(tmp_path / "var")},
        "registry": {"dir": str(tmp_path / "var" / "registry")},
        "learning": {"calibration_s": 5.0, "max_train_seconds": 20.0, "replay_normal_windows": 100},
        "fleet": {"enabled": True, "machine_class": "pump", **fleet},
        "sensors": {"site/m1/de": {"kind": "vibration", "sample_rate_hz": FS, "unit": "g", "window_s": WIN_S, "hop_s": WIN_S}},
    }, environ={})


def test_fedprox_keeps_the_adapter_near_the_prior(enc: Encoder, trained: Scorer) -> None:
    """TrainConfig.proximal_mu (FedProx, Li et al. 2020): training from a prior on another
    machine's windows moves the adapter less from the prior with the proximal term. Plain SGD,
    as in the paper: with AdamW every step has about the same size, whatever the gradient."""
    prior = {k: v.clone() for k, v in trained.adapter.state_dict().items()}
    moved = {}
    for mu in (0.0, 50.0):
        tc = TrainConfig(max_epochs=6, patience=10, max_seconds=60.0, optimizer="sgd", lr=0.01, proximal_mu=mu)
        s = Scorer(enc, ENCODER_SHA, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, train=tc))
        s.prior_adapter = prior
        s.learn_many(_windows(40, seed=9))
        s.calibrate()
        st = s.adapter.state_dict()
        moved[mu] = float(torch.sqrt(sum(((st[k].float() - prior[k].float()) ** 2).sum() for k in prior)))
    assert 0 < moved[50.0] < 0.5 * moved[0.0], moved
    with pytest.raises(ValueError, match="proximal_mu"):
        TrainConfig(proximal_mu=-1.0)


def test_imported_delta_package_becomes_prior_and_passes_the_gate(enc: Encoder, trained: Scorer, tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    cfg = _app_config(tmp_path, verify_key=str(pub))
    klass = machine_class("vibration", FS, "pump")
    # trained with the appliance's own adapter configuration (rank from [learning])
    pkg = _package(enc, trained, kind="prior", device_id="fleet-server", stream="", machine_class=klass, round=3)
    unsigned = pkg.write(tmp_path / "unsigned.pdmdelta")
    with pytest.raises(RegistryError, match="not signed"):
        import_delta_package(unsigned, cfg, enc, ENCODER_SHA)
    signed = pkg.write(tmp_path / "prior.pdmdelta", load_private_key(priv))
    got, queued = import_delta_package(signed, cfg, enc, ENCODER_SHA)
    assert got.meta.round == 3 and queued == ["site/m1/de"]
    assert PriorStore.for_config(cfg, enc, ENCODER_SHA).path(klass).exists()
    # the appliance's learning loop trains the queued job from the prior; the registry's gate judges it
    reg = Registry(cfg.registry.dir)
    loop = build_learning(cfg, reg, enc, ENCODER_SHA, train=TrainConfig(max_epochs=1, max_seconds=10.0))
    try:
        ws = _windows(60, seed=7)
        feats = loop.template("site/m1/de").features(ws)
        loop.offer("site/m1/de", [w.start_ns for w in ws], feats)
        jobs = loop.run_pending()
    finally:
        loop.close()
    assert len(jobs) == 1 and jobs[0].status == "done", jobs
    rec = reg.get(jobs[0].version)
    assert rec.status in ("active", "rejected") and rec.reason.startswith("gate ")
    assert rec.training_summary["fleet_prior"].startswith(f"{klass} round 3")
    reg.close()


def test_prior_of_another_adapter_configuration_is_not_used(enc: Encoder, trained: Scorer, tmp_path: Path) -> None:
    cfg = _app_config(tmp_path)
    store = PriorStore.for_config(cfg, enc, ENCODER_SHA)
    klass = machine_class("vibration", FS, "pump")
    pkg = _package(enc, trained, kind="prior", machine_class=klass)
    store.save(pkg.to_bytes())
    sc = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, adapter=AdapterConfig(rank=2))
    assert store.adapter_for("site/m1/de", sc) is None  # logged, falls back to a fresh adapter
    assert store.adapter_for("site/m1/de", _cfg()) is not None


# -- the Flower client app: what leaves the appliance -------------------------------------------------------
@pytest.fixture
def appliance(tmp_path: Path) -> Path:
    """An appliance's TOML and state directory whose replay buffer holds 60 windows of one stream."""
    return _appliance(tmp_path, 1, seed=3)


def _message(kind: str, content, node_id: int = 7):
    """A message as the SuperLink delivers it to a node (metadata set by the server side)."""
    import time as _time
    import uuid

    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=node_id, reply_to_message_id="",
                  group_id="1", created_at=_time.time(), ttl=3600.0, message_type=kind)
    return make_message(md, content)


def test_client_sends_only_adapter_tensors_and_metadata(appliance: Path) -> None:
    """Every message the client app sends (query, train with and without DP clipping, a SecAgg+
    round's training step before Flower masks it, evaluate)
    is captured by an outermost Flower mod; it holds only the adapter's tensors, under their
    names and shapes, and scalar metadata: no window, feature image or embedding batch."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from pdm_edge.fleet.client_app import array_record, make_client_app
    from pdm_edge.fleet.delta import DeltaMeta
    from pdm_edge.model import load_encoder

    sent = []

    def capture(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        sent.append(reply)
        return reply

    app = make_client_app(mods=[capture])
    ctx = Context(run_id=1, node_id=7, node_config={"config": str(appliance)}, state=RecordDict(), run_config={})
    encoder, sha = load_encoder()
    sc = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S)
    base = base_adapter(encoder, sc.adapter, 0)
    adapter_shapes = {k: v.shape for k, v in base.items()}
    klass = machine_class("vibration", FS, "pump")

    q = app(_message("query", RecordDict({"config": ConfigRecord({})})), ctx)
    assert q.content["config"]["participate"] is True and json.loads(q.content["config"]["classes"]) == [klass]
    zero = array_record({k: np.zeros_like(v) for k, v in base.items()})
    for cfg in ({"machine-class": klass}, {"machine-class": klass, KEY_CLIPPING_NORM: 0.05, "uniform-weights": True}):
        r = app(_message("train", RecordDict({"arrays": zero, "config": ConfigRecord(cfg)})), ctx)
        assert not r.has_error(), r.error
        update = r.content["arrays"].to_numpy_ndarrays()
        if KEY_CLIPPING_NORM in cfg:  # Flower's fixedclipping_mod clipped the update
            assert np.sqrt(sum(float(np.sum(u ** 2)) for u in update)) <= 0.05 + 1e-6
    # a SecAgg+ round's training step (Flower's legacy records, which secaggplus_mod masks before they leave)
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    names = list(base)
    fitins = FitIns(ndarrays_to_parameters([np.zeros_like(base[k]) for k in names]),
                    {"machine-class": klass, "tensor-names": json.dumps(names), "uniform-weights": True})
    r = app(_message("train", fitins_to_recorddict(fitins, keep_input=True)), ctx)
    assert not r.has_error(), r.error
    assert r.content.metric_records["fitres.num_examples"]["num_examples"] == 1
    prior = DeltaPackage.from_adapter(base, base, device_id="fleet-server", stream="", machine_class=klass, kind="prior",
                                      encoder_sha256=sha, adapter_config=sc.adapter.to_dict(), seed=0, round=1)
    e = app(_message("evaluate", RecordDict({"arrays": zero, "config": ConfigRecord({"prior-package": prior.to_bytes(),
                                                                                       "server-round": 1})})), ctx)
    assert e.content["metrics"]["prior-stored"] == 1

    assert len(sent) == 5
    meta_fields = {f for f in DeltaMeta.__dataclass_fields__}
    n_arrays = 0
    for msg in sent:
        for rec_name, rec in msg.content.array_records.items():
            for name, arr in zip(names if rec_name == "fitres.parameters" else rec.keys(), rec.to_numpy_ndarrays()):
                assert name in adapter_shapes and arr.shape == adapter_shapes[name], (name, arr.shape)
                assert arr.shape[-3:] != (2, 64, 32) and arr.shape[-1] != int(FS * WIN_S)
                n_arrays += 1
        for rec in msg.content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in rec.values())
        for rec in msg.content.config_records.values():
            for key, v in rec.items():
                assert isinstance(v, (str, bool, int, float)), (key, type(v))  # no bytes, no lists of numbers
                if key == "delta-meta":
                    meta = json.loads(v)
                    assert set(meta) <= meta_fields
                    assert all(not isinstance(x, list) for x in meta.values())
    assert n_arrays == 3 * len(adapter_shapes)


# -- command line ------------------------------------------------------------------------------------------
def test_fleet_cli_join_needs_opt_in_and_status_shows_priors(appliance: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pdm_edge.cli import main

    off = tmp_path / "off.toml"
    off.write_text(appliance.read_text().replace("enabled = true", "enabled = false"))
    r = CliRunner().invoke(main, ["--config", str(off), "fleet", "join", "--print"])
    assert r.exit_code == 1 and "opted in" in r.output
    r = CliRunner().invoke(main, ["--config", str(appliance), "fleet", "join", "--print"])
    assert r.exit_code == 1 and "root_certificates" in r.output  # no TLS configured and not marked insecure
    with_tls = tmp_path / "tls.toml"
    with_tls.write_text(appliance.read_text().replace('machine_class = "pump"', 'machine_class = "pump"\nroot_certificates = "/etc/ca.pem"'))
    r = CliRunner().invoke(main, ["--config", str(with_tls), "fleet", "join", "--print"])
    assert r.exit_code == 0 and "--root-certificates /etc/ca.pem" in r.output and "--superlink 127.0.0.1:8000" in r.output
    r = CliRunner().invoke(main, ["--config", str(appliance), "fleet", "status"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["enabled"] is True and doc["priors"] == {} and doc["rounds"] == []
    # SuperNode authentication: the appliance's key pair, its private key named in [fleet]
    key = tmp_path / "keys" / "id_ecdsa"
    r = CliRunner().invoke(main, ["fleet", "keygen", str(key)])
    assert r.exit_code == 0, r.output
    assert key.stat().st_mode & 0o777 == 0o600 and key.with_name("id_ecdsa.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert CliRunner().invoke(main, ["fleet", "keygen", str(key)]).exit_code == 1  # never overwritten
    with_auth = tmp_path / "auth.toml"
    with_auth.write_text(with_tls.read_text().replace('machine_class = "pump"', f'machine_class = "pump"\nauth_private_key = "{key}"'))
    r = CliRunner().invoke(main, ["--config", str(with_auth), "fleet", "join", "--print"])
    assert r.exit_code == 0 and f"--auth-supernode-private-key {key}" in r.output
    r = CliRunner().invoke(main, ["fleet", "server", "--insecure", "--supernode-auth"])
    assert r.exit_code == 1 and "needs TLS" in r.output


# -- a federation of real Flower processes on loopback ----------------------------------------------------
def _appliance(tmp_path: Path, i: int, port: int | None = None, verify_key: Path | None = None, fleet_extra: str = "",
               seed: int | None = None) -> Path:
    """Appliance ``app-{i}`` in ``{tmp_path}/app{i}``: its configuration (``[fleet]`` opted in,
    class ``pump``, plus ``fleet_extra``; the server on ``port`` and ``verify_key`` when given)
    and a replay buffer of 60 simulated windows of ``site/m{i}/de``; returns the TOML's path."""
    from pdm_edge.learning.replay import ReplayBuffer
    from pdm_edge.model import load_encoder

    encoder, sha = load_encoder()
    state = tmp_path / f"app{i}" / "var"
    toml = tmp_path / f"app{i}" / "pdm-edge.toml"
    toml.parent.mkdir(parents=True)
    fleet = [fleet_extra] if fleet_extra else []
    fleet += [f'server = "127.0.0.1:{port}"'] if port is not None else []
    fleet += [f'verify_key = "{verify_key}"'] if verify_key is not None else []
    fleet_lines = "\n".join(fleet)
    toml.write_text(f"""appliance_id = "app-{i}"
[mqtt]
broker = "localhost:1883"
[feedback]
state_dir = "{state}"
[registry]
dir = "{state / 'registry'}"
[learning]
replay_normal_windows = 100
[fleet]
enabled = true
machine_class = "pump"
max_train_seconds = 3.0
{fleet_lines}
[sensors."site/m{i}/de"]
kind = "vibration"
sample_rate_hz = {FS}
unit = "g"
window_s = {WIN_S}
hop_s = {WIN_S}
""")
    ws = _windows(60, seed=20 + i if seed is None else seed)
    rb = ReplayBuffer.in_dir(state, capacity=100)
    rb.offer(f"site/m{i}/de", [w.start_ns for w in ws], Scorer(encoder, sha, _cfg()).features(ws))
    rb.close()
    return toml


def _join(tmp_path: Path, toml: Path) -> "subprocess.Popen[bytes]":
    """``pdm-edge fleet join`` of an appliance, its output in ``{tmp_path}/{app dir}.log``."""
    import os
    import subprocess
    import sys

    log = open(tmp_path / f"{toml.parent.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "pdm_edge.cli", "--config", str(toml), "fleet", "join",
                             "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_loopback_federation_three_appliances_survives_a_killed_client(tmp_path: Path) -> None:
    """A Flower SuperLink and three appliances (``pdm-edge fleet join`` -> flower-supernode, each
    with its own state directory) on loopback: a run of two rounds where one appliance is killed
    during round 1 still completes round 2 with the other two (Flower's minimum-clients rule);
    the killed appliance rejoins and takes part in the next run, with differential privacy on
    and epsilon reported per round. Every appliance stores the signed prior."""
    import subprocess
    import threading

    from pdm_edge.fleet.runner import FleetServer, read_rounds, stop_group
    from pdm_edge.model import load_encoder

    from .conftest import wait_until

    port = free_port()
    priv, pub = generate_keypair(tmp_path / "keys")
    encoder, sha = load_encoder()
    tomls = [_appliance(tmp_path, i, port, pub, "insecure = true") for i in range(3)]

    def join(i: int) -> subprocess.Popen:
        return _join(tmp_path, tomls[i])

    klass = machine_class("vibration", FS, "pump")
    nodes = [join(i) for i in range(3)]
    srv = FleetServer(tmp_path / "server", f"127.0.0.1:{port}", insecure=True).start()
    try:
        out: dict[str, object] = {}
        run = threading.Thread(target=lambda: out.update(rounds=srv.submit(
            num_rounds=2, min_clients=2, round_timeout_s=240, signing_key=str(priv), timeout_s=1200)))
        run.start()
        # kill appliance 2 while round 1 is still going (its prior is being published)
        assert wait_until(lambda: len(read_rounds(tmp_path / "server")) >= 1, timeout=600)
        stop_group(nodes[2])
        run.join(1200)
        rounds = out["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["n_participants"] == 3 and rounds[0]["aggregated"]
        assert rounds[1]["aggregated"] and sorted(rounds[1]["participants"]) == ["app-0", "app-1"]
        assert rounds[1]["client_bytes_out_max"] <= 1_000_000 and rounds[0]["prior_bytes"] <= 256 * 1024
        # the killed appliance rejoins; the next run has three participants again, with DP
        nodes[2] = join(2)
        dp_rounds = srv.submit(num_rounds=2, min_clients=3, round_timeout_s=240, signing_key=str(priv), dp_noise=1.0,
                               dp_clip=0.5, timeout_s=1200)
        assert [r["n_participants"] for r in dp_rounds] == [3, 3]
        eps = [r["epsilon"] for r in dp_rounds]
        assert eps[0] > 0 and eps[1] > eps[0]
    finally:
        for n in nodes:
            stop_group(n)
        srv.stop()
    for i in range(3):
        store = PriorStore(tmp_path / f"app{i}" / "var", "pump", encoder, sha, [pub])
        pkg = store.load(klass)
        assert pkg is not None and pkg.meta.kind == "prior"
        events = read_rounds(tmp_path / f"app{i}" / "var" / "fleet")
        assert any(e["event"] == "trained" for e in events) and any(e["event"] == "prior" for e in events)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_secagg_federation_server_sees_only_the_sum(tmp_path: Path) -> None:
    """Flower's SecAgg+ on loopback (three appliances, two rounds): every client's update goes
    out masked (Flower's ``secaggplus_mod``), the server unmasks only the sum, publishes it as the signed prior and every appliance stores
    it. Differential privacy together with it, or fewer than three clients, is refused."""
    from pdm_edge.errors import FleetError
    from pdm_edge.fleet.runner import FleetServer, read_rounds, stop_group
    from pdm_edge.model import load_encoder

    port = free_port()
    priv, pub = generate_keypair(tmp_path / "keys")
    encoder, sha = load_encoder()
    tomls = [_appliance(tmp_path, i, port, pub, "insecure = true") for i in range(3)]
    srv = FleetServer(tmp_path / "server", f"127.0.0.1:{port}", insecure=True).start()
    nodes = []
    try:
        with pytest.raises(FleetError, match="not offered together"):
            srv.submit(min_clients=3, secagg=True, dp_noise=1.0)
        with pytest.raises(FleetError, match="3 or more"):
            srv.submit(min_clients=2, secagg=True)
        nodes = [_join(tmp_path, t) for t in tomls]
        rounds = srv.submit(num_rounds=2, min_clients=3, round_timeout_s=240, signing_key=str(priv), secagg=True,
                            wait_nodes_s=120, timeout_s=900)
    finally:
        for n in nodes:
            stop_group(n)
        srv.stop()
    run_log = (tmp_path / "server" / "last-run.log").read_text()
    assert run_log.count("Secure aggregation completed") == 2, run_log[-3000:]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["secure_aggregation"] and r["aggregated"] and r["n_participants"] == 3 for r in rounds), rounds
    assert sorted(rounds[0]["participants"]) == ["app-0", "app-1", "app-2"]
    assert rounds[1]["change_l2"] is not None and rounds[1]["client_bytes_out_max"] <= 1_000_000
    klass = machine_class("vibration", FS, "pump")
    # the unmasked aggregate is the mean of the appliances' updates (each logs its own norm, as a delta
    # to the base): never longer than the longest, zero only when every update is (early stopping can
    # keep the prior), where masks that failed to cancel would give values across the +-8 clipping range
    norms = []
    for i in range(3):
        pkg = PriorStore(tmp_path / f"app{i}" / "var", "pump", encoder, sha, [pub]).load(klass)
        assert pkg is not None and pkg.meta.round == 2
        aggregate = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in pkg.delta.values())))
        trained = [e for e in read_rounds(tmp_path / f"app{i}" / "var" / "fleet") if e["event"] == "trained"]
        assert [e["secure_aggregation"] for e in trained] == [True, True]
        norms += [e["update_l2"] for e in trained if e["round"] == 2]
    assert len(norms) == 3
    assert aggregate <= max(norms) + 1e-3, (aggregate, norms)
    assert (aggregate > 1e-4) == (max(norms) > 1e-3), (aggregate, norms)


def _tls_certificates(d: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (PEM files in ``d``):
    ``(certfile, keyfile, ca_certfile)``, as an operator's PKI would issue them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdm-edge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                       x509.DNSName("localhost")]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(srv.public_bytes(pem))
    (d / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(d / "server.pem"), str(d / "server.key"), str(d / "ca.pem")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tls_federation_admits_only_registered_appliances(tmp_path: Path) -> None:
    """TLS to the SuperLink (the appliances verify its certificate against the CA in
    ``[fleet] root_certificates``) and Flower's SuperNode authentication: of two appliances
    with their own key pairs, only the one whose public key the operator registered joins the
    run; the other is refused by the SuperLink. The round runs with FedProx."""
    from pdm_edge.fleet.runner import FleetServer, generate_node_key, read_rounds, stop_group

    port = free_port()
    certfile, keyfile, ca = _tls_certificates(tmp_path / "pki")
    _, pub = generate_keypair(tmp_path / "keys")
    priv_sign = tmp_path / "keys" / "signing_key.pem"
    keys = [generate_node_key(tmp_path / f"node{i}" / "id_ecdsa") for i in range(2)]
    with pytest.raises(Exception, match="already exists"):
        generate_node_key(keys[0][0])
    tomls = [_appliance(tmp_path, i, port, pub, f'root_certificates = "{ca}"\nauth_private_key = "{keys[i][0]}"')
             for i in range(2)]
    srv = FleetServer(tmp_path / "server", f"127.0.0.1:{port}", ssl=(certfile, keyfile, ca), supernode_auth=True).start()
    nodes = []
    try:
        srv.register_node(keys[0][1], name="app-0")
        nodes = [_join(tmp_path, t) for t in tomls]
        rounds = srv.submit(num_rounds=1, min_clients=1, round_timeout_s=240, signing_key=str(priv_sign),
                            wait_nodes_s=60, timeout_s=900, proximal_mu=0.1)
        assert [r["round"] for r in rounds] == [1]
        assert rounds[0]["participants"] == ["app-0"] and rounds[0]["aggregated"]
        assert rounds[0]["proximal_mu"] == 0.1  # a FedProx round (Flower's FedProx strategy) ...
        trained_events = [e for e in read_rounds(tmp_path / "app0" / "var" / "fleet") if e["event"] == "trained"]
        assert [e["proximal_mu"] for e in trained_events] == [0.1]  # ... whose client trained with the proximal term
    finally:
        for n in nodes:
            stop_group(n)
        srv.stop()
    refused = (tmp_path / "app1.log").read_text()
    assert "app-1" not in str(rounds[0]["participants"])
    assert "Failed to activate SuperNode" in refused, refused[-2000:]  # Flower's exit code 305: the SuperLink refused it


def test_fleet_metrics_from_the_appliance_round_log(tmp_path: Path) -> None:
    from pdm_edge.fleet.client_app import log_round
    from pdm_edge.metrics import FLEET_METRIC_NAMES, Metrics

    m = Metrics()
    m.add_fleet(tmp_path)
    assert b"pdm_edge_fleet_prior_round{" not in m.render()  # nothing yet: families without samples
    log_round(tmp_path, {"event": "trained", "round": 1, "machine_class": "c", "cpu_s": 4.5, "bytes_in": 90_000, "bytes_out": 90_000})
    log_round(tmp_path, {"event": "prior", "round": 1, "machine_class": "c", "participants": ["a", "b", "c"], "bytes": 80_000})
    log_round(tmp_path, {"event": "trained", "round": 2, "machine_class": "c", "cpu_s": 5.0, "bytes_in": 90_000, "bytes_out": 91_000})
    text = m.render().decode()
    for name in FLEET_METRIC_NAMES:
        assert name in text, name
    assert 'pdm_edge_fleet_rounds_total{event="trained",machine_class="c"} 2.0' in text
    assert 'pdm_edge_fleet_prior_round{machine_class="c"} 1.0' in text
    assert 'pdm_edge_fleet_last_round_participants{machine_class="c"} 3.0' in text
    assert 'pdm_edge_fleet_last_round_bytes{direction="out",machine_class="c"} 91000.0' in text


def test_models_page_shows_fleet_rounds_priors_and_versions_from_a_prior(dashboard_demo, monkeypatch, enc, trained) -> None:
    """The dashboard's models page (Streamlit AppTest) shows the rounds this appliance took part
    in, the priors it holds and what they changed."""
    from streamlit.testing.v1 import AppTest

    from pdm_edge.config import load_config
    from pdm_edge.fleet.client_app import log_round

    cfg_path = Path(dashboard_demo.config_path)
    cfg_path.write_text(cfg_path.read_text() + '\n[fleet]\nenabled = true\nmachine_class = "pump"\ninsecure = true\n')
    cfg = load_config(cfg_path)
    state = Path(cfg.feedback.state_dir)
    klass = machine_class("vibration", FS, "pump")
    pkg = _package(enc, trained, kind="prior", device_id="fleet-server", stream="", machine_class=klass, round=2,
                   notes={"participants": ["app-0", "app-1", "app-2"]})
    pkg.write(state / "fleet" / "priors" / f"{klass}.pdmdelta")
    log_round(state, {"event": "trained", "round": 2, "machine_class": klass, "streams": "plant1/fan-1/de", "normal_windows": 48,
                      "cpu_s": 6.2, "bytes_in": 90_752, "bytes_out": 90_752})
    log_round(state, {"event": "prior", "round": 2, "machine_class": klass, "prior_version": f"{klass}-r2-abc",
                      "participants": ["app-0", "app-1", "app-2"], "normal_windows": 144, "bytes": 76_000})
    monkeypatch.setenv("PDM_EDGE_CONFIG", str(cfg_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    assert any(m.value == "#### Fleet rounds" for m in at.markdown)
    tables = [df.value for df in at.dataframe]
    rounds = next(t for t in tables if "what it changed" in t.columns)
    assert rounds["event"].tolist() == ["prior", "trained"] and rounds["round"].tolist() == [2, 2]
    assert rounds["participants"].iloc[0] == "app-0, app-1, app-2"
    priors = next(t for t in tables if "adapter sha256" in t.columns)
    assert priors["round"].tolist() == [2] and priors["machine class"].tolist() == [klass]


@pytest.mark.slow
def test_femto_leave_one_out_fold_on_simulated_runs_to_failure() -> None:
    """The leave-one-out fold logic (prior from the others through Flower's FedAvg aggregation,
    three calibrations of the left-out bearing, alarms and lead time) on three short simulated
    runs to failure at 25.6 kHz; the real figures come from ``pdm-edge fleet eval-femto``."""
    from pdm_edge.fleet.femto import Bearing, FleetEval
    from sensors.simulator import FaultSpec

    bearings = {}
    for i in range(3):
        healthy = VibrationSimulator(sample_rate_hz=25_600.0, seed=40 + i)
        faulty = VibrationSimulator(sample_rate_hz=25_600.0, seed=40 + i, fault=FaultSpec(kind="outer", severity=2.0))
        x = np.stack([healthy.generate(2560) for _ in range(120)] + [faulty.generate(2560) for _ in range(20)])
        bearings[f"B{i}"] = Bearing(f"B{i}", np.arange(140) * 10.0, x.astype(np.float32))
    ev = FleetEval(bearings, rounds=2, max_epochs=1, max_seconds=5.0, dp_noise=1.0, dp_clip=0.5)
    fold = ev.fold("B0")
    assert [r["round"] for r in fold["prior_rounds"]] == [1, 2]
    assert fold["prior_rounds"][0]["participants"] == ["B1", "B2"]
    assert 0 < fold["prior_rounds"][0]["epsilon"] < fold["prior_rounds"][1]["epsilon"]
    m = fold["methods"]
    assert set(m) == {"prior_2min", "scratch_10pct", "prior_alone_2min"}
    assert m["prior_2min"]["calibration_windows"] == 12 and m["scratch_10pct"]["calibration_windows"] == 14
    for row in m.values():
        # the fault fills the last 20 snapshots (200 s), after half-life: an alarm is raised after
        # half-life, before the end (detection quality on real bearings is pdm-edge fleet eval-femto's)
        assert row["first_alarm_after_half_s"] is not None and 0 < row["lead_time_s"] <= 700.0
    assert isinstance(fold["prior_2min_at_least_as_good"], bool)


def test_mosquitto_shared_subscription_splits_one_streams_chunks(mosquitto) -> None:
    """Why ``pdm-edge run`` instances do not share streams through ``$share/...`` on Mosquitto
    (deploy/README.md section 11): Mosquitto hands the messages of ONE topic to the members of a
    shared subscription in turn, so both instances would get parts of every stream."""
    import paho.mqtt.client as mqtt

    from .conftest import wait_until

    host, port = mosquitto.address.split(":")
    got: dict[str, list[int]] = {"a": [], "b": []}
    subscribed: list[str] = []
    clients = []
    for name in got:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"share-{name}", protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, ud, msg, name=name: got[name].append(int(msg.payload))
        c.on_subscribe = lambda cl, ud, mid, rc, props, name=name: subscribed.append(name)
        c.connect(host, int(port))
        c.subscribe("$share/pdm/pdm/v1/site/m1/de/waveform", qos=1)
        c.loop_start()
        clients.append(c)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="share-pub", protocol=mqtt.MQTTv5)
    pub.connect(host, int(port))
    pub.loop_start()
    try:
        assert wait_until(lambda: len(subscribed) == 2, timeout=10)
        for i in range(20):
            pub.publish("pdm/v1/site/m1/de/waveform", str(i), qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(got["a"]) + len(got["b"]) == 20, timeout=10)
    finally:
        for c in (*clients, pub):
            c.loop_stop()
            c.disconnect()
    assert sorted(got["a"] + got["b"]) == list(range(20))  # each chunk once...
    assert got["a"] and got["b"]  # ...but one stream's chunks are split between the two members


def test_fleet_export_of_an_active_version_imports_elsewhere_as_prior(appliance: Path, tmp_path: Path) -> None:
    """Over the air: ``pdm-edge fleet export`` writes a stream's active version as a signed delta
    package; ``pdm-edge fleet import`` on another appliance stores it as its class's prior and
    queues a training job of its stream of that class (which the gate will judge)."""
    from click.testing import CliRunner

    from pdm_edge.cli import main
    from pdm_edge.config import load_config
    import sqlite3

    from pdm_edge.model import load_encoder

    cfg = load_config(appliance)
    encoder, sha = load_encoder()
    s = Scorer(encoder, sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S,
                                          train=TrainConfig(max_epochs=1, max_seconds=5.0)))
    s.learn_many(_windows(30, seed=9))
    s.calibrate()
    with Registry(cfg.registry.dir) as reg:
        rec = reg.add_candidate(s, site="site", machine="m1", sensor="de", parent=None, trigger="manual")
        reg.promote(rec.id, "test")
    priv, pub = generate_keypair(tmp_path / "keys")
    out = tmp_path / "ota.pdmdelta"
    r = CliRunner().invoke(main, ["--config", str(appliance), "fleet", "export", "site/m1/de", str(out), "--key", str(priv)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size <= 256 * 1024
    other = tmp_path / "other.toml"
    other.write_text(appliance.read_text().replace(str(cfg.feedback.state_dir), str(tmp_path / "other-var"))
                     .replace('max_train_seconds = 3.0', f'max_train_seconds = 3.0\nverify_key = "{pub}"'))
    r = CliRunner().invoke(main, ["--config", str(other), "fleet", "import", str(out)])
    assert r.exit_code == 0, r.output
    assert "training queued for: site/m1/de" in r.output
    con = sqlite3.connect(tmp_path / "other-var" / "learning.sqlite")
    assert con.execute("SELECT stream, trigger, status FROM job").fetchall() == [("site/m1/de", "manual", "queued")]
    con.close()
    # a package signed by another key is refused, nothing stored
    _, other_pub = generate_keypair(tmp_path / "k2")
    third = tmp_path / "third.toml"
    third.write_text(other.read_text().replace(str(pub), str(other_pub)).replace(str(tmp_path / "other-var"), str(tmp_path / "third-var")))
    r = CliRunner().invoke(main, ["--config", str(third), "fleet", "import", str(out)])
    assert r.exit_code == 1 and "does not verify" in r.output
    assert not (tmp_path / "third-var" / "fleet" / "priors").exists()
