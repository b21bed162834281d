"""The command line end to end: configuration errors, replay of every format, simulate, demo."""

from __future__ import annotations

import queue
import re
import time
from pathlib import Path

import numpy as np
import pytest

from pdm_edge.config import load_config
from pdm_edge.ingest import Ingestor
from sample_data.loaders import load_recording
from tests.conftest import REPO, run_cli

CONFIG = """
appliance_id = "cli-test"
site = "lab"
[mqtt]
broker = "{broker}"
[sensors."lab/Bearing3_1/accel"]
kind = "vibration"
sample_rate_hz = 25600
unit = "g"
window_s = 0.1
hop_s = 0.1
[sensors."lab/cwru/accel"]
kind = "vibration"
sample_rate_hz = 12000
unit = "g"
window_s = 0.25
hop_s = 0.125
[sensors."lab/valve/mic"]
kind = "acoustic"
sample_rate_hz = 16000
unit = "FS"
window_s = 1.0
hop_s = 0.5
[sensors."lab/arr/accel"]
kind = "vibration"
sample_rate_hz = 1000
unit = "m/s2"
window_s = 1.0
hop_s = 1.0
[sensors."lab/sim/accel"]
kind = "vibration"
sample_rate_hz = 25600
unit = "g"
window_s = 1.0
hop_s = 0.5
[sensors."lab/sim/mic"]
kind = "acoustic"
sample_rate_hz = 16000
unit = "Pa"
window_s = 1.0
hop_s = 1.0
[sensors."lab/sample/accel"]
kind = "vibration"
sample_rate_hz = 25600
unit = "g"
window_s = 1.0
hop_s = 0.5
"""


@pytest.fixture
def cfg_path(tmp_path: Path, mosquitto) -> Path:
    p = tmp_path / "pdm-edge.toml"
    p.write_text(CONFIG.format(broker=mosquitto.address))
    return p


@pytest.fixture
def ingestor(cfg_path: Path):
    ing = Ingestor(load_config(cfg_path, environ={}), windows=queue.Queue())  # unbounded for the tests
    ing.start()
    assert ing.wait_ready(10)
    yield ing
    ing.stop()


def _collect(ing: Ingestor, settle_s: float = 1.0) -> list:
    """Every window the ingestor emits, until nothing new arrived for ``settle_s``."""
    out, last = [], time.monotonic()
    while time.monotonic() - last < settle_s:
        try:
            out.append(ing.windows.get(timeout=0.05))
            last = time.monotonic()
        except queue.Empty:
            pass
    assert ing.wait_idle(5)
    return out


def _ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- configuration errors -------------------------------------------------------------------
@pytest.mark.parametrize("content, key, words", [
    ('[mqtt]\nbroker = "h:1"\nbrokr = "x"\n', "mqtt.brokr", "unknown key"),
    ('[mqtt]\nbroker = "h:1"\nkeepalive_s = "30"\n', "mqtt.keepalive_s", "valid integer"),
    ('site = "plant1"\n', "mqtt", "required key is missing"),
    ('[mqtt]\nport = 1883\n', "mqtt.broker", "required key is missing"),
    ('[mqtt]\nbroker = "h:70000"\n', "mqtt.broker", "outside 1..65535"),
    ('[mqtt]\nbroker = "h:1"\n[sensors."a/b"]\nkind = "vibration"\nsample_rate_hz = 100\nunit = "g"\n', "sensors", "site/machine/sensor"),
    ('[mqtt]\nbroker = "h:1"\n[sensors."a/b/c"]\nkind = "vibration"\nsample_rate_hz = 100\nunit = "g"\nwindow_s = 0.0125\n', "sensors.a/b/c", "whole number of samples"),
    ('[mqtt]\nbroker = "h:1"\n[ingest]\nunknown_streams = "maybe"\n', "ingest.unknown_streams", "'reject' or 'accept'"),
    ('[mqtt\nbroker = "h:1"\n', "", "not valid TOML"),
])
def test_config_errors_are_one_clear_line(tmp_path, content, key, words):
    p = tmp_path / "bad.toml"
    p.write_text(content)
    r = run_cli("--config", str(p), "config", "check")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"configuration error: {key}") and words in lines[0]


def test_every_command_has_help_and_both_module_entry_points_work():
    """One module per command group (pdm_edge/cli/): every command is registered and documented,
    and `python -m pdm_edge` is the same command as `python -m pdm_edge.cli` (the entry point)."""
    import subprocess
    import sys

    import click
    from click.testing import CliRunner

    from pdm_edge.cli import main

    def walk(cmd, path):
        yield path
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                yield from walk(cmd.commands[name], [*path, name])

    paths = list(walk(main, []))
    groups = {p[0] for p in paths if p}
    assert groups == {"bench", "config", "demo", "eval", "fleet", "ingest", "label", "models", "replay", "report", "run",
                      "simulate", "store"}
    assert len(paths) >= 30
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(main, [*path, "--help"], prog_name="pdm-edge")
        assert r.exit_code == 0 and r.output.startswith(f"Usage: pdm-edge {' '.join(path)}".rstrip()), (path, r.output)
    top = subprocess.run([sys.executable, "-m", "pdm_edge", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert top.returncode == 0 and top.stdout == run_cli("--help").stdout
    assert top.stdout.startswith("Usage: pdm-edge ")


def test_missing_config_file_and_env_override(tmp_path):
    r = run_cli("--config", str(tmp_path / "nope.toml"), "config", "check")
    assert r.returncode == 2 and "configuration file not found" in r.stderr
    r = run_cli("--config", str(REPO / "deploy" / "pdm-edge.toml"), "config", "check",
                env={"PDM_EDGE__MQTT__BROKER": "10.0.0.5:1884", "PDM_EDGE__INGEST__QUEUE_SIZE": "17"})
    _ok(r)
    assert "broker 10.0.0.5:1884" in r.stdout
    assert load_config(REPO / "deploy" / "pdm-edge.toml", environ={"PDM_EDGE__INGEST__QUEUE_SIZE": "17"}).ingest.queue_size == 17
    r = run_cli("--config", str(REPO / "deploy" / "pdm-edge.toml"), "config", "check", env={"PDM_EDGE__MQTT__QOS": "2"})
    assert r.returncode == 2 and r.stderr.startswith("configuration error: mqtt.qos")


def test_ingest_without_a_broker_says_so(tmp_path):
    from pdm_edge.broker import free_port

    r = run_cli("ingest", "--broker", f"127.0.0.1:{free_port()}", "--wait-broker", "1", timeout=60, cwd=tmp_path,
                env={"PDM_EDGE_CONFIG": ""})
    assert r.returncode == 1 and "cannot reach the MQTT broker at 127.0.0.1:" in r.stderr, r.stderr
    assert "ingesting from" not in r.stderr and "Traceback" not in r.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path):
    from pdm_edge.broker import free_port

    r = run_cli("replay", str(REPO / "sample_data" / "sim_outer_race.npz"), "--broker", f"127.0.0.1:{free_port()}", timeout=60)
    assert r.returncode == 1 and "cannot connect to MQTT broker" in r.stderr and "Traceback" not in r.stderr


# -- replay of every format through a real broker ---------------------------------------------
def test_replay_femto_delivers_all_515_snapshots_in_order(cfg_path, ingestor, datasets_dir):
    folder = datasets_dir / "femto_pronostia" / "Learning_set" / "Bearing3_1"
    _ok(run_cli("--config", str(cfg_path), "replay", str(folder), "--speed", "max", "--site", "lab", "--sensor", "accel"))
    wins = _collect(ingestor)
    rec = load_recording(folder)
    assert len(wins) == 515 == len(rec.segments)
    starts = [w.start_ns for w in wins]
    assert starts == sorted(starts)
    gaps = np.diff(starts) / 1e9
    assert np.all((gaps > 9.0) & (gaps < 11.5)), "snapshots are ~10 s apart"
    for w, seg in zip(wins, rec.segments):
        np.testing.assert_array_equal(w.samples, seg.samples)
    # the spacing is the files' own: shift back to the first snapshot
    np.testing.assert_array_equal(np.array(starts) - starts[0], [s.start_ns - rec.segments[0].start_ns for s in rec.segments])
    st = ingestor.stats()
    assert st.deadlettered == 0 and st.events["gap_time"] == 514


def test_replay_cwru_12k(cfg_path, ingestor, datasets_dir):
    path = datasets_dir / "cwru" / "de_12k" / "12k_Drive_End_IR007_0_105.mat"
    _ok(run_cli("--config", str(cfg_path), "replay", str(path), "--speed", "max", "--site", "lab", "--machine", "cwru", "--sensor", "accel"))
    wins = _collect(ingestor)
    x = load_recording(path).concatenated()
    expected = (x.size - 3000) // 1500 + 1
    assert len(wins) == expected
    np.testing.assert_array_equal(wins[7].samples, x[7 * 1500:7 * 1500 + 3000])


def test_replay_wav_dcase_valve(cfg_path, ingestor, datasets_dir):
    path = sorted((datasets_dir / "dcase2023_task2" / "valve" / "test").glob("*anomaly*.wav"))[0]
    _ok(run_cli("--config", str(cfg_path), "replay", str(path), "--speed", "max", "--site", "lab", "--machine", "valve", "--sensor", "mic",
                "--encoding", "int16"))
    wins = _collect(ingestor)
    assert len(wins) == 19  # 10 s, 1 s windows, 0.5 s hop
    assert all(w.kind == "acoustic" and w.unit == "FS" and w.sample_rate_hz == 16000 for w in wins)


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_replay_csv_and_npy(cfg_path, ingestor, tmp_path, suffix):
    x = np.sin(2 * np.pi * 50 * np.arange(5000) / 1000).astype(np.float32) * 9.8
    path = tmp_path / f"signal{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    else:
        np.savetxt(path, x, fmt="%.9g")
    _ok(run_cli("--config", str(cfg_path), "replay", str(path), "--fs", "1000", "--unit", "m/s2", "--speed", "max",
                "--site", "lab", "--machine", "arr", "--sensor", "accel", "--encoding", "values"))
    wins = _collect(ingestor)
    assert len(wins) == 5
    np.testing.assert_allclose(np.concatenate([w.samples for w in wins]), x, rtol=1e-6)


def test_replay_sample_and_csv_without_fs_is_an_error(cfg_path, ingestor, tmp_path):
    _ok(run_cli("--config", str(cfg_path), "replay", str(REPO / "sample_data" / "sim_outer_race.npz"), "--speed", "max",
                "--site", "lab", "--machine", "sample", "--sensor", "accel"))
    assert len(_collect(ingestor)) == 119
    p = tmp_path / "x.csv"
    p.write_text("1\n2\n3\n")
    r = run_cli("--config", str(cfg_path), "replay", str(p))
    assert r.returncode == 1 and "sample" in r.stderr.lower() and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind, sensor, n_windows", [("vibration", "accel", 5), ("acoustic", "mic", 3)])
def test_simulate(cfg_path, ingestor, kind, sensor, n_windows):
    _ok(run_cli("--config", str(cfg_path), "simulate", "--kind", kind, "--machine", "sim", "--sensor", sensor,
                "--fault", "outer", "--onset", "1", "--growth", "1", "--duration", "3", "--speed", "max"))
    wins = _collect(ingestor)
    assert len(wins) == n_windows
    assert all(w.kind == kind and np.isfinite(w.samples).all() for w in wins)


# -- the README's main command ---------------------------------------------------------------
def test_demo_runs_end_to_end_on_the_embedded_broker(tmp_path, monkeypatch):
    r = run_cli("demo", "--speed", "max", "--state-dir", str(tmp_path / "demo"), timeout=240)
    _ok(r)
    out = r.stdout
    assert "embedded MQTT broker on 127.0.0.1:" in out
    assert "demo/pump-01/de-accel" in out
    summary = {}
    for line in out.split("\nsummary\n", 1)[1].splitlines():
        key, _, value = line.strip().partition("  ")
        summary[key.strip()] = value.strip()
    assert summary["chunks published"] == summary["chunks received"] == summary["chunks windowed"] == "600"
    assert summary["windows"] == "119"
    kurt = [float(m) for m in re.findall(r"kurtosis\s+([-\d.]+)", out)]
    assert len(kurt) == 119
    assert np.mean(kurt[-10:]) > 3 * np.mean(kurt[:10]), "the growing outer-race fault shows in the kurtosis"
    # calibrated on the first 20 s (41 windows), the 78 later windows scored and stored
    assert "calibrated: 41 windows (9 held back for the gate)" in summary["calibration"]
    assert summary["scores stored"].startswith("78 ")
    # the fault (onset 30 s) raises an alert, and nothing is raised before it
    m = re.match(r"(\d+), first from ([\d.]+) s into the recording", summary["alerts raised"])
    assert m and int(m.group(1)) >= 1
    assert 29.0 <= float(m.group(2)) <= 40.0
    from pdm_edge.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "demo" / "store.sqlite")
    try:
        assert len(store.query_scores("demo", "pump-01", 0, 2**62)) == 78
        conds = store.query_conditions("demo", "pump-01", 0, 2**62)
        assert len(conds) == 78 and all(c.zone in "ABCD" and c.velocity_rms_mm_s > 0 for c in conds)
        assert np.mean([c.kurtosis for c in conds[-10:]]) > 3 * np.mean([c.kurtosis for c in conds[:5]])  # the fault's impacts
        assert [a.state for a in store.query_alerts("demo", "pump-01", 0, 2**62)] == ["raised"]
        assert [e.event for e in store.query_model_events("demo", "pump-01", 0, 2**62)] == ["training_queued", "calibrated"]
    finally:
        store.close()
    # why 119 windows gave 78 scores is said, and adds up
    m = re.match(r"119: (\d+) calibration baseline \(not scored\), (\d+) waited while the model trained \(scored after it\), "
                 r"(\d+) scored on arrival", summary["window outcomes"])
    assert m and int(m.group(1)) == 41 and int(m.group(2)) + int(m.group(3)) == 78, summary["window outcomes"]
    assert "(collecting): the first 20 s of windows are the machine's normal baseline" in out
    # the demo's configuration: the simulated bearing (SKF 6205 at 25 Hz) for the BPFO marks, local accounts,
    # and the service's real port for the dashboard's health page
    from dashboard import data
    from dashboard.auth import load_users, verify_password
    from pdm_edge.config import load_config

    cfg = load_config(tmp_path / "demo" / "pdm-edge.toml", environ={})
    marks = data.defect_frequencies(cfg.sensor("demo", "pump-01", "de-accel"))
    assert abs(marks["BPFO"] - 89.6) < 0.5 and "6205" in cfg.sensors["demo/pump-01/de-accel"].bearing.name
    assert "BPFO 89.6 Hz" in out
    assert not cfg.service.http.endswith(":0")
    users = load_users(cfg.dashboard.users_file)
    assert {u.role for u in users.values()} == {"technician", "engineer"}
    creds = dict(re.findall(r"(\w+) / (\S+) \((?:technician|engineer)\)", out))
    assert creds and all(verify_password(users[n], p) for n, p in creds.items())
    # the machine report: one command, HTML and CSV
    r = run_cli("--config", str(tmp_path / "demo" / "pdm-edge.toml"), "report", "demo/pump-01", "--out", str(tmp_path / "rep"))
    _ok(r)
    html = next((tmp_path / "rep").glob("report-demo-pump-01-*.html")).read_text()
    assert "Machine report: demo/pump-01" in html and "Defect frequencies: BPFO 89.6 Hz" in html and "B · 2." in html
    assert len(next((tmp_path / "rep").glob("scores-*.csv")).read_text().splitlines()) == 79
    # every dashboard page renders on the demo's own configuration without an exception (AppTest; the real
    # browser does the same in tests/test_dashboard_browser.py, slow suite)
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PDM_EDGE_CONFIG", str(tmp_path / "demo" / "pdm-edge.toml"))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    for page in ("pages/fleet.py", "pages/machine.py", "pages/labels.py", "pages/models.py", "pages/health.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
    assert any("Service not reachable" in e.value for e in at.error)  # the demo's appliance has ended: a reason
    monkeypatch.delenv("PDM_EDGE_CONFIG")
    # the registry is found through the demo's configuration, and a bare `models list` next to the demo says where it is
    r = run_cli("--config", str(tmp_path / "demo" / "pdm-edge.toml"), "models", "list", cwd=tmp_path)
    _ok(r)
    assert "demo/pump-01/de-accel" in r.stdout and "active" in r.stdout
    (tmp_path / "var").mkdir()
    (tmp_path / "demo").rename(tmp_path / "var" / "demo")
    r = run_cli("models", "list", cwd=tmp_path, env={"PDM_EDGE_CONFIG": ""})
    assert r.returncode == 2 and "the demo's is var/demo/registry" in r.stderr, r.stderr
