"""Tests of pdm_edge.registry: versions, promote/rollback, the gate, export/import, CLI.

Like tests/test_model.py, these use a randomly initialised encoder with a made-up sha256, the
vibration simulator at 12 kHz (0.25 s windows) and 2 adapter epochs, so the file runs in
seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pdm_edge.cli import main
from pdm_edge.errors import ModelError, RegistryError
from pdm_edge.model.encoder import Encoder, EncoderConfig
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
from pdm_edge.registry import GateInputs, Registry, gate, generate_keypair, load_private_key, load_public_key
from pdm_edge.types import ModelVersion, Window
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12_000.0
WIN_S = 0.25
SEED = 11
ENCODER_SHA = hashlib.sha256(b"pdm-edge tests: randomly initialised encoder, seed 0").hexdigest()
OTHER_SHA = hashlib.sha256(b"another encoder").hexdigest()
STREAM = {"site": "site", "machine": "m1", "sensor": "de"}
MAX_VERSION_BYTES = 256 * 1024


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(sim: VibrationSimulator, count: int, first_index: int = 0) -> list[Window]:
    n = int(FS * WIN_S)
    return [Window("site", "m1", "de", "vibration", i * round(WIN_S * 1e9), FS, "g", sim.generate(n), i)
            for i in range(first_index, first_index + count)]


def _scorer(enc: Encoder, windows: list[Window], seed: int = 0) -> Scorer:
    cfg = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S,
                       train=TrainConfig(max_epochs=2, max_seconds=20.0, seed=seed))
    s = Scorer(enc, ENCODER_SHA, cfg)
    s.learn_many(windows)
    s.calibrate()
    return s


@pytest.fixture(scope="module")
def env() -> types.SimpleNamespace:
    """Encoder, data and three calibrated scorers: v1 (first 40 normal windows), v2 (60 normal
    windows, another seed) and a poisoned one (normal and fault windows interleaved, as if the
    faults had been labelled normal)."""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig())
    sim = VibrationSimulator(sample_rate_hz=FS, seed=SEED)
    calib = _windows(sim, 60)
    held = _windows(sim, 100, first_index=60)
    faulty = VibrationSimulator(sample_rate_hz=FS, seed=SEED, fault=FaultSpec(kind="outer", severity=0.5))
    fault = _windows(faulty, 40)
    gate_fault, poison_fault = fault[:12], fault[12:]
    v1 = _scorer(enc, calib[:40], seed=0)
    v2 = _scorer(enc, calib, seed=1)
    mixed: list[Window] = []
    for i, w in enumerate(calib[:56]):
        mixed.append(w)
        if i % 2 == 1:
            mixed.append(poison_fault[(i // 2) % len(poison_fault)])
    poisoned = _scorer(enc, mixed, seed=2)
    return types.SimpleNamespace(enc=enc, calib=calib, held=held, gate_fault=gate_fault, v1=v1, v2=v2, poisoned=poisoned)


@pytest.fixture()
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as r:
        yield r


def _add(reg: Registry, scorer: Scorer, parent: str | None = None, trigger: str = "manual") -> ModelVersion:
    return reg.add_candidate(scorer, **STREAM, parent=parent, trigger=trigger,
                             training_summary={"windows": 60, "labels": 0, "span_ns": [0, 15_000_000_000]})


# --------------------------------------------------------------------------------------------
# index, promote, rollback


def test_add_list_get(reg: Registry, env: types.SimpleNamespace) -> None:
    a = _add(reg, env.v1, trigger="initial_calibration")
    b = _add(reg, env.v2, parent=a.id, trigger="labels")
    assert isinstance(a, ModelVersion)
    assert (a.id, b.id) == ("m1-de-v1", "m1-de-v2")
    assert a.status == b.status == "candidate"
    assert b.parent == a.id and b.trigger == "labels" and a.encoder_sha256 == ENCODER_SHA
    assert b.training_summary["windows"] == 60 and b.sensor == "de"
    assert reg.path(a.id).is_file()
    assert hashlib.sha256(reg.path(a.id).read_bytes()).hexdigest() == a.sha256
    assert reg.get(b.id) == b
    assert [v.id for v in reg.list()] == [a.id, b.id]
    assert [v.id for v in reg.list(machine="m1", sensor="de")] == [a.id, b.id]
    assert reg.list(machine="other") == []
    assert reg.active(**STREAM) is None
    with pytest.raises(RegistryError, match="no model version"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="parent"):
        _add(reg, env.v1, parent="missing-v9")
    # the WAL index survives a reopen
    root = reg.root
    reg.close()
    with Registry(root, create=False) as again:
        assert [v.id for v in again.list()] == [a.id, b.id]
        assert sqlite3.connect(again.db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_version_file_size(reg: Registry, env: types.SimpleNamespace) -> None:
    v = _add(reg, env.v2)
    size = reg.path(v.id).stat().st_size
    print(f"\nmodel version file: {size} bytes ({size / 1024:.1f} KiB)")
    assert v.size_bytes == size
    assert size < MAX_VERSION_BYTES


def test_promote_rollback_and_hot_swap(reg: Registry, env: types.SimpleNamespace) -> None:
    x = env.held[:20]

    class Running:
        """A running scorer that swaps models on the registry's change events."""

        def __init__(self) -> None:
            self.scorer: Scorer | None = None
            self.events: list[str] = []

        def __call__(self, version: ModelVersion) -> None:
            self.events.append(version.id)
            self.scorer = reg.load(version.id, env.enc, ENCODER_SHA)

    running = Running()
    reg.on_change(running)
    a = _add(reg, env.v1)
    b = _add(reg, env.v2, parent=a.id)
    s1, s2 = env.v1.score_windows(x), env.v2.score_windows(x)
    assert not np.allclose(s1, s2)

    reg.promote(a.id, "first calibration")
    assert reg.active(**STREAM).id == a.id
    np.testing.assert_array_equal(reg.load(reg.active(**STREAM).id, env.enc, ENCODER_SHA).score_windows(x), s1)
    np.testing.assert_array_equal(running.scorer.score_windows(x), s1)

    reg.promote(b.id)
    statuses = {v.id: v.status for v in reg.list()}
    assert statuses == {a.id: "retired", b.id: "active"}
    assert reg.get(a.id).reason == f"replaced by {b.id}"
    assert sum(v.status == "active" for v in reg.list(**STREAM)) == 1
    np.testing.assert_array_equal(reg.load(reg.active(**STREAM).id, env.enc, ENCODER_SHA).score_windows(x), s2)
    np.testing.assert_array_equal(running.scorer.score_windows(x), s2)

    back = reg.rollback(**STREAM)
    assert back.id == a.id and back.status == "active"
    assert reg.get(b.id).status == "retired" and reg.get(b.id).reason == "rolled back"
    assert sum(v.status == "active" for v in reg.list(**STREAM)) == 1
    np.testing.assert_array_equal(reg.load(reg.active(**STREAM).id, env.enc, ENCODER_SHA).score_windows(x), s1)
    np.testing.assert_array_equal(running.scorer.score_windows(x), s1)
    assert running.events == [a.id, b.id, a.id]

    with pytest.raises(RegistryError, match="roll back"):
        reg.rollback(**STREAM)  # a has no previous active version nor parent
    # the database itself refuses a second active version of a stream
    with pytest.raises(sqlite3.IntegrityError):
        reg._db.execute("UPDATE versions SET status = 'active' WHERE id = ?", (b.id,))


def test_reject_and_tampered_file(reg: Registry, env: types.SimpleNamespace) -> None:
    a = _add(reg, env.v1)
    r = reg.reject(a.id, "bad")
    assert r.status == "rejected" and r.reason == "bad"
    with pytest.raises(RegistryError, match="rejected"):
        reg.promote(a.id)
    assert reg.promote(a.id, force=True).status == "active"
    b = _add(reg, env.v2)
    path = reg.path(b.id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        reg.load(b.id, env.enc, ENCODER_SHA)


# --------------------------------------------------------------------------------------------
# the gate


def test_gate_rejects_poisoned_and_passes_good(reg: Registry, env: types.SimpleNamespace) -> None:
    inputs = GateInputs(normal_windows=env.v1.features(env.held), fault_windows=env.v1.features(env.gate_fault), margin=0.05)
    first, metrics, reason = reg.submit(env.v1, **STREAM, gate_inputs=inputs, trigger="initial_calibration")
    assert first.status == "active", reason
    assert metrics["active_far"] is None and metrics["fault_detection"] == 1.0

    bad, metrics, reason = reg.submit(env.poisoned, **STREAM, gate_inputs=inputs, trigger="labels")
    assert bad.status == "rejected"
    assert metrics["missed_faults"] > 0 and metrics["fault_detection"] < 1.0
    # the reason names each missed window (by its index in the gate's fault windows) and its score
    assert "labelled fault windows not above threshold" in reason and re.search(r"#\d+ score [-\d.]+", reason), reason
    assert bad.reason == reason and bad.metrics["missed_faults"] == metrics["missed_faults"]
    assert bad.parent == first.id
    assert reg.active(**STREAM).id == first.id  # the active version is untouched

    good, metrics, reason = reg.submit(env.v2, **STREAM, gate_inputs=inputs, trigger="labels")
    assert good.status == "active", reason
    assert reason.startswith("gate passed")
    assert {"candidate_far", "active_far", "fault_detection", "n_normal", "n_fault"} <= set(metrics)
    assert metrics["n_normal"] == len(env.held) and metrics["n_fault"] == len(env.gate_fault)
    assert reg.get(first.id).status == "retired"


def test_gate_false_alarm_margin(env: types.SimpleNamespace) -> None:
    # a candidate with a threshold lowered far into the normal scores must fail on false alarms
    import copy

    lax = copy.copy(env.v2)
    lax.threshold = float(np.median(env.v2.score_windows(env.held)))
    passed, metrics, reason = gate(lax, env.v1, env.v1.features(env.held), [], margin=0.01)
    assert not passed
    assert metrics["candidate_far"] > metrics["active_far"] + 0.01
    assert "false-alarm rate" in reason
    passed, _, _ = gate(env.v2, env.v1, env.v1.features(env.held), [], margin=1.0)
    assert passed


# --------------------------------------------------------------------------------------------
# export / import


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change[name] if name in change else zin.read(name)
            if data is not None:
                zout.writestr(name, data)


def test_export_import_round_trip(tmp_path: Path, env: types.SimpleNamespace) -> None:
    priv_path, pub_path = generate_keypair(tmp_path / "keys")
    key = load_private_key(priv_path)
    with Registry(tmp_path / "a") as src, Registry(tmp_path / "b") as dst:
        v = _add(src, env.v2)
        pkg = src.export(v.id, tmp_path / "v.zip", signing_key=key)
        assert pkg.stat().st_size < MAX_VERSION_BYTES
        with zipfile.ZipFile(pkg) as zf:
            assert set(zf.namelist()) == {"manifest.json", "version.pt", "manifest.sig"}
            manifest = json.loads(zf.read("manifest.json"))
        assert manifest["encoder_sha256"] == ENCODER_SHA and manifest["id"] == v.id
        assert manifest["files"]["version.pt"]["sha256"] == v.sha256
        assert manifest["config"]["kind"] == "vibration"
        imported = dst.import_package(pkg, encoder_sha256=ENCODER_SHA, trusted_public_keys=[pub_path], require_signature=True)
        assert imported.status == "candidate" and imported.id == v.id and imported.sha256 == v.sha256
        assert "signed by" in imported.origin
        x = env.held[:20]
        np.testing.assert_array_equal(dst.load(imported.id, env.enc, ENCODER_SHA).score_windows(x), env.v2.score_windows(x))
        # importing the same package again is idempotent, also from its bytes (as received over MQTT)
        assert dst.import_package(pkg, encoder_sha256=ENCODER_SHA).id == imported.id
        assert dst.import_package(pkg.read_bytes(), encoder_sha256=ENCODER_SHA, stream=(v.site, v.machine, v.sensor)).id == imported.id
        with pytest.raises(RegistryError, match="is of .* not s/other/x"):  # a package of another stream
            dst.import_package(pkg.read_bytes(), name="pkg", encoder_sha256=ENCODER_SHA, stream=("s", "other", "x"))
        assert len(dst.list()) == 1


def test_bad_packages_refused(tmp_path: Path, env: types.SimpleNamespace) -> None:
    priv_path, pub_path = generate_keypair(tmp_path / "keys")
    _, other_pub = generate_keypair(tmp_path / "keys", name="other")
    key = load_private_key(priv_path)
    with Registry(tmp_path / "a") as src, Registry(tmp_path / "b") as dst:
        v = _add(src, env.v1)
        signed = src.export(v.id, tmp_path / "signed.zip", signing_key=key)
        unsigned = src.export(v.id, tmp_path / "unsigned.zip")

        with zipfile.ZipFile(signed) as zf:
            data = bytearray(zf.read("version.pt"))
        data[len(data) // 2] ^= 0x01
        tampered = tmp_path / "tampered.zip"
        _rewrite(signed, tampered, {"version.pt": bytes(data)})
        with pytest.raises(RegistryError, match="sha256 of version.pt does not match"):
            dst.import_package(tampered, encoder_sha256=ENCODER_SHA, trusted_public_keys=[pub_path])

        with pytest.raises(RegistryError, match="signature does not verify"):
            dst.import_package(signed, encoder_sha256=ENCODER_SHA, trusted_public_keys=[load_public_key(other_pub)])
        forged = tmp_path / "forged.zip"
        _rewrite(signed, forged, {"manifest.sig": bytes(64)})
        with pytest.raises(RegistryError, match="signature does not verify"):
            dst.import_package(forged, encoder_sha256=ENCODER_SHA, trusted_public_keys=[pub_path])

        with pytest.raises(RegistryError, match="not signed and a signature is required"):
            dst.import_package(unsigned, encoder_sha256=ENCODER_SHA, trusted_public_keys=[pub_path], require_signature=True)

        with pytest.raises(RegistryError, match="encoder"):
            dst.import_package(signed, encoder_sha256=OTHER_SHA, trusted_public_keys=[pub_path])

        broken = tmp_path / "broken.zip"
        broken.write_bytes(signed.read_bytes()[:200])
        with pytest.raises(RegistryError, match="not a readable zip"):
            dst.import_package(broken, encoder_sha256=ENCODER_SHA)

        assert dst.list() == []  # nothing refused was stored
        assert list((dst.root / "versions").iterdir()) == []
        # unsigned accepted when no signature is required
        assert dst.import_package(unsigned, encoder_sha256=ENCODER_SHA).origin.endswith(f"unsigned; exported as {v.id})")


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_models(tmp_path: Path, env: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDM_EDGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "reg"
    with Registry(root) as r:
        a = _add(r, env.v1)
        b = _add(r, env.v2, parent=a.id)
    runner = CliRunner()
    reg_opt = ["--registry", str(root)]

    res = runner.invoke(main, ["models", "list", *reg_opt])
    assert res.exit_code == 0, res.output
    assert a.id in res.output and b.id in res.output and "candidate" in res.output

    res = runner.invoke(main, ["models", "promote", a.id, *reg_opt])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["models", "promote", b.id, "--reason", "operator", *reg_opt])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["models", "show", b.id, *reg_opt])
    assert res.exit_code == 0 and json.loads(res.output)["status"] == "active"
    res = runner.invoke(main, ["models", "rollback", "--site", "site", "--machine", "m1", "--sensor", "de", *reg_opt])
    assert res.exit_code == 0, res.output
    assert a.id in res.output
    with Registry(root) as r:
        assert r.active(**STREAM).id == a.id

    res = runner.invoke(main, ["models", "keygen", str(tmp_path / "keys")])
    assert res.exit_code == 0, res.output
    pkg = tmp_path / "pkg.zip"
    res = runner.invoke(main, ["models", "export", b.id, str(pkg), "--sign", str(tmp_path / "keys" / "signing_key.pem"), *reg_opt])
    assert res.exit_code == 0, res.output
    dst = ["--registry", str(tmp_path / "reg2")]
    res = runner.invoke(main, ["models", "import", str(pkg), "--encoder-sha256", OTHER_SHA, *dst])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "encoder" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["models", "import", str(pkg), "--encoder-sha256", ENCODER_SHA, "--require-signature",
                               "--trust", str(tmp_path / "keys" / "signing_key.pub.pem"), *dst])
    assert res.exit_code == 0, res.output
    assert b.id in res.output

    res = runner.invoke(main, ["models", "show", "nope", *reg_opt])
    assert res.exit_code == 1 and "no model version" in res.output
    res = runner.invoke(main, ["models", "list", "--registry", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no model registry" in res.output
