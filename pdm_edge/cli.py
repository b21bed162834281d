"""The ``pdm-edge`` command line (click).

Every command that talks to MQTT takes ``--broker HOST:PORT``; its default comes from the
configuration file: ``--config``, else ``$PDM_EDGE_CONFIG``, else ``./pdm-edge.toml``, else
``/etc/pdm-edge/pdm-edge.toml``. Errors that pdm-edge raises on purpose
(:class:`~pdm_edge.errors.PdmEdgeError`) are printed as one line and exit with status 2
(configuration) or 1 (anything else), never as a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np

from pdm_edge import __version__
from pdm_edge.config import PRIVATE_UMASK, AppConfig, MqttConfig, config_from_dict, load_config
from pdm_edge.errors import ConfigError, PdmEdgeError
from pdm_edge.types import Window

log = logging.getLogger("pdm_edge")

CONFIG_SEARCH = ("pdm-edge.toml", "/etc/pdm-edge/pdm-edge.toml")
BROKER_WAIT_S = 10.0
"""How long ``pdm-edge ingest`` waits for the broker before saying it cannot be reached."""


def _find_config(path: str | None) -> str | None:
    if path:
        return path
    if os.environ.get("PDM_EDGE_CONFIG"):
        return os.environ["PDM_EDGE_CONFIG"]
    for candidate in CONFIG_SEARCH:
        if Path(candidate).is_file():
            return candidate
    return None


class _Ctx:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = _find_config(config_path)

    def config(self, overrides: dict[str, Any] | None = None, *, required: bool = True) -> AppConfig:
        """The configuration with command-line overrides applied (nested dict, like the TOML)."""
        overrides = overrides or {}
        if self.config_path is None:
            if required and "mqtt" not in overrides:
                raise ConfigError("", "no configuration file: pass --config PATH or set PDM_EDGE_CONFIG")
            return config_from_dict(overrides)
        base = load_config(self.config_path)
        data = base.model_dump(exclude_unset=True)
        for section, values in overrides.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        return config_from_dict(data, environ={})

    def mqtt(self, broker: str | None, protocol: str | None) -> MqttConfig:
        """Broker settings: flags first, then the configuration file, then 127.0.0.1:1883."""
        overrides: dict[str, Any] = {}
        if broker:
            overrides["broker"] = broker
        if protocol:
            overrides["protocol"] = protocol
        if self.config_path is not None:
            return self.config({"mqtt": overrides}).mqtt
        overrides.setdefault("broker", "127.0.0.1:1883")
        return config_from_dict({"mqtt": overrides}).mqtt


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            click.echo(f"configuration error: {err}", err=True)
            sys.exit(2)
        except PdmEdgeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default=None,
                      help="MQTT protocol version [default: from config, else 5].")(fn)
    fn = click.option("--broker", metavar="HOST:PORT", default=None,
                      help="MQTT broker [default: from the config file, else 127.0.0.1:1883].")(fn)
    return fn


def _stream_options(default_sensor: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--sensor", default=default_sensor, help="Sensor name (topic level).")(fn)
        fn = click.option("--machine", default=None, help="Machine name (topic level).")(fn)
        fn = click.option("--site", default=None, help="Site name [default: `site` from config].")(fn)
        return fn
    return deco


def _parse_speed(value: str) -> float:
    if value.lower() in ("max", "inf"):
        return math.inf
    try:
        speed = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'max'") from None
    if not speed > 0:
        raise click.BadParameter("speed must be > 0")
    return speed


def _fmt_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def window_line(w: Window) -> str:
    """One human-readable line per window: time, stream, index, level and impulsiveness.

    RMS and peak are in the window's unit; crest factor = peak / RMS and kurtosis (Pearson,
    3 for Gaussian noise) rise with the impacts of a bearing fault.
    """
    from scipy.stats import kurtosis

    x = w.samples.astype(np.float64)
    rms = float(np.sqrt(np.mean(x * x)))
    peak = float(np.max(np.abs(x)))
    kurt = float(kurtosis(x, fisher=False))
    crest = peak / rms if rms > 0 else float("nan")
    return (f"{_fmt_ns(w.start_ns)}  {w.stream:<28} #{w.index:<5d} {w.duration_s:.3f} s @ {w.sample_rate_hz:g} Hz  "
            f"RMS {rms:8.4f} {w.unit:<4} peak {peak:8.4f} {w.unit:<4} crest {crest:5.2f}  kurtosis {kurt:6.2f}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pdm-edge")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration TOML [default: $PDM_EDGE_CONFIG, ./pdm-edge.toml, /etc/pdm-edge/pdm-edge.toml].")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """pdm-edge: predictive maintenance beside the machine."""
    os.umask(PRIVATE_UMASK)  # every state file 0600, every directory 0700 (issue 15 row 12)
    ctx.obj = _Ctx(config_path)
    logging.basicConfig(level=log_level or os.environ.get("PDM_EDGE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- config ----------------------------------------------------------------------------------
@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.pass_obj
@_handle_errors
def config_check(obj: _Ctx) -> None:
    """Validate the configuration file (with environment overrides) and summarise it."""
    cfg = obj.config()
    click.echo(f"{obj.config_path}: OK")
    click.echo(f"  appliance {cfg.appliance_id}, broker {cfg.mqtt.broker} (MQTT {cfg.mqtt.protocol}), "
               f"unknown streams: {cfg.ingest.unknown_streams}")
    where = cfg.store.sqlite_path if cfg.store.backend == "sqlite" else f"{cfg.store.url}, database {cfg.store.database}"
    click.echo(f"  store {cfg.store.backend} ({where}), spool {cfg.spool.path}, alerts {cfg.alerts.k} of {cfg.alerts.n}")
    for key, s in sorted(cfg.sensors.items()):
        click.echo(f"  sensor {key}: {s.kind}, {s.sample_rate_hz:g} Hz, {s.unit}, window {s.window_s:g} s, hop {s.hop_s:g} s")


# -- ingest ----------------------------------------------------------------------------------
def _consume(ingestor: Any, *, until: Callable[[], bool], emit: Callable[[Window], None], idle_s: float = 0.2) -> int:
    """Hand every window to ``emit`` until ``until()`` is true and the stage is drained."""
    n = 0
    while True:
        try:
            w = ingestor.windows.get(timeout=idle_s)
        except queue.Empty:
            if until() and ingestor.wait_idle(0.5) and ingestor.windows.empty():
                return n
            continue
        emit(w)
        n += 1


def _print_summary(stats: Any, published: int | None = None) -> None:
    click.echo("")
    click.echo("summary")
    if published is not None:
        click.echo(f"  chunks published       {published}")
    click.echo(f"  chunks received        {stats.received}")
    click.echo(f"  chunks windowed        {stats.windowed}")
    click.echo(f"  windows                {stats.windows}")
    dl = ", ".join(f"{k} {v}" for k, v in sorted(stats.deadletters.items())) or "none"
    click.echo(f"  dead-lettered          {stats.deadlettered} ({dl})")
    ev = ", ".join(f"{k} {v}" for k, v in stats.events.items() if v) or "none"
    click.echo(f"  stream events          {ev}")
    click.echo(f"  chunk queue high water {stats.chunk_queue_high_water}")


@main.command()
@_broker_options
@click.option("--accept-unknown", is_flag=True, help="Window streams that have no [sensors] table (commissioning).")
@click.option("--count", type=int, default=0, help="Stop after this many windows (0 = run until Ctrl-C).")
@click.option("--duration", "duration_s", type=float, default=0.0, help="Stop after this many seconds (0 = no limit).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per window instead of a text line.")
@click.option("--wait-broker", "wait_broker_s", type=click.FloatRange(0.1, 3600), default=BROKER_WAIT_S, show_default=True,
              help="Seconds to wait for the broker before giving up with an error.")
@click.pass_obj
@_handle_errors
def ingest(obj: _Ctx, broker: str | None, protocol: str | None, accept_unknown: bool, count: int, duration_s: float, as_json: bool,
           wait_broker_s: float) -> None:
    """Run the ingestion stage and print every window that arrives."""
    from pdm_edge.ingest import Ingestor

    overrides: dict[str, Any] = {"mqtt": {k: v for k, v in (("broker", broker), ("protocol", protocol)) if v}}
    if accept_unknown:
        overrides["ingest"] = {"unknown_streams": "accept"}
    cfg = obj.config(overrides)
    ing = Ingestor(cfg)
    ing.start()
    if not ing.wait_ready(wait_broker_s):
        ing.stop(timeout=1.0)
        raise PdmEdgeError(f"cannot reach the MQTT broker at {cfg.mqtt.broker} (no connection within {wait_broker_s:g} s): "
                           "is it running? Set it with --broker HOST:PORT or [mqtt] broker")
    click.echo(f"ingesting from {cfg.mqtt.broker} (pdm/v1/+/+/+/waveform); Ctrl-C to stop", err=True)
    deadline = time.monotonic() + duration_s if duration_s > 0 else math.inf
    n = 0

    def emit(w: Window) -> None:
        nonlocal n
        n += 1
        if as_json:
            click.echo(json.dumps({"stream": w.stream, "start_ns": w.start_ns, "index": w.index, "kind": w.kind,
                                   "sample_rate_hz": w.sample_rate_hz, "n_samples": w.n_samples, "unit": w.unit,
                                   "rms": float(np.sqrt(np.mean(w.samples.astype(np.float64) ** 2)))}))
        else:
            click.echo(window_line(w))

    try:
        _consume(ing, until=lambda: (count and n >= count) or time.monotonic() >= deadline, emit=emit)
    except KeyboardInterrupt:
        pass
    finally:
        ing.stop()
        if not as_json:
            _print_summary(ing.stats())


# -- publishers --------------------------------------------------------------------------------
@main.command()
@_broker_options
@_stream_options(default_sensor=None)
@click.option("--kind", type=click.Choice(["vibration", "acoustic"]), default="vibration", show_default=True)
@click.option("--fault", type=click.Choice(["none", "outer", "inner", "ball"]), default="none", show_default=True,
              help="Bearing fault (vibration) as an impulse train at BPFO / BPFI / BSF; for acoustic any value but none adds cavitation-like bursts.")
@click.option("--onset", "onset_s", type=float, default=60.0, show_default=True, help="Fault onset, s after start.")
@click.option("--growth", "growth_s", type=float, default=300.0, show_default=True, help="Seconds for the fault to grow to full severity.")
@click.option("--severity", type=float, default=1.0, show_default=True, help="Full fault severity (impulse amplitude, g; or Pa).")
@click.option("--fs", "sample_rate_hz", type=float, default=None, help="Sample rate, Hz [default: 25600 vibration, 16000 acoustic].")
@click.option("--shaft-hz", type=float, default=25.0, show_default=True, help="Shaft speed, Hz.")
@click.option("--duration", "duration_s", type=float, default=0.0, help="Seconds of signal to publish (0 = forever).")
@click.option("--speed", default="1", show_default=True, help="1 = real time, 10 = ten times faster, max = as fast as possible.")
@click.option("--chunk-s", type=float, default=0.1, show_default=True, help="Seconds of signal per MQTT message.")
@click.option("--encoding", type=click.Choice(["float32", "int16", "values"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
@_handle_errors
def simulate(obj: _Ctx, broker: str | None, protocol: str | None, site: str | None, machine: str | None, sensor: str | None,
             kind: str, fault: str, onset_s: float, growth_s: float, severity: float, sample_rate_hz: float | None,
             shaft_hz: float, duration_s: float, speed: str, chunk_s: float, encoding: str, seed: int) -> None:
    """Publish a synthetic vibration or acoustic signal of a rotating machine."""
    from sensors.publisher import ChunkPublisher, publish_timed
    from sensors.simulator import AcousticFaultSpec, AcousticSimulator, FaultSpec, VibrationSimulator

    mcfg = obj.mqtt(broker, protocol)
    site = site or _default_site(obj)
    machine = machine or "sim-01"
    if kind == "vibration":
        fs = sample_rate_hz or 25600.0
        spec = None if fault == "none" else FaultSpec(kind=fault, onset_s=onset_s, severity=severity, growth_s=growth_s)
        sim: Any = VibrationSimulator(sample_rate_hz=fs, shaft_hz=shaft_hz, fault=spec, seed=seed)
        unit, sensor = "g", sensor or "accel"
    else:
        fs = sample_rate_hz or 16000.0
        aspec = None if fault == "none" else AcousticFaultSpec(onset_s=onset_s, severity=severity, growth_s=growth_s)
        sim = AcousticSimulator(sample_rate_hz=fs, rotation_hz=shaft_hz, fault=aspec, seed=seed)
        unit, sensor = "Pa", sensor or "mic"
    step = max(1, round(chunk_s * fs))
    total = round(duration_s * fs) if duration_s > 0 else None
    t0_ns = time.time_ns()

    def chunks():
        done = 0
        while total is None or done < total:
            n = step if total is None else min(step, total - done)
            yield t0_ns + round(done * 1e9 / fs), sim.generate(n)
            done += n

    pub = ChunkPublisher(mcfg, site, machine, sensor, sample_rate_hz=fs, unit=unit, encoding=encoding).start()
    click.echo(f"publishing {kind} {fs:g} Hz to {pub.topic} on {mcfg.broker} (fault: {fault}); Ctrl-C to stop", err=True)
    try:
        n = publish_timed(pub, chunks(), speed=_parse_speed(speed))
    except KeyboardInterrupt:
        n = pub.published
    finally:
        pub.close()
    click.echo(f"published {n} chunks ({n * step / fs:.1f} s of signal)", err=True)


def _default_site(obj: _Ctx) -> str:
    return obj.config(required=False).site if obj.config_path else "site"


@main.command()
@click.argument("path", type=click.Path(exists=True))
@_broker_options
@_stream_options(default_sensor=None)
@click.option("--speed", default="1", show_default=True, help="1 = real time, 10 = ten times faster, max = as fast as possible.")
@click.option("--chunk-s", type=float, default=0.1, show_default=True, help="Seconds of signal per MQTT message.")
@click.option("--clock", type=click.Choice(["now", "original"]), default="now", show_default=True,
              help="now: shift the recording so it starts now (relative timing kept); original: the file's own timestamps.")
@click.option("--fs", "sample_rate_hz", type=float, default=None, help="Sample rate, Hz (needed for CSV/NPY; overrides others).")
@click.option("--unit", type=click.Choice(["g", "m/s2", "Pa", "FS"]), default=None, help="Unit (CSV/NPY).")
@click.option("--channel", default=None, help="Channel: CWRU DE/FE/BA, FEMTO horizontal/vertical, WAV index, CSV column.")
@click.option("--encoding", type=click.Choice(["float32", "int16", "values"]), default="float32", show_default=True)
@click.option("--loop", "loops", type=int, default=1, show_default=True, help="Publish the recording this many times (0 = forever).")
@click.pass_obj
@_handle_errors
def replay(obj: _Ctx, path: str, broker: str | None, protocol: str | None, site: str | None, machine: str | None,
           sensor: str | None, speed: str, chunk_s: float, clock: str, sample_rate_hz: float | None, unit: str | None,
           channel: str | None, encoding: str, loops: int) -> None:
    """Publish a recording (CWRU .mat, FEMTO acc_*.csv folder, WAV, CSV/NPY, the sample .npz)."""
    from sample_data.loaders import load_recording
    from sensors.publisher import ChunkPublisher, iter_chunks, publish_timed

    overrides: dict[str, Any] = {}
    if sample_rate_hz:
        overrides["sample_rate_hz"] = sample_rate_hz
    if unit:
        overrides["unit"] = unit
    if channel is not None:
        overrides["channel"] = int(channel) if channel.isdigit() else channel
    rec = load_recording(path, **overrides)
    mcfg = obj.mqtt(broker, protocol)
    site = site or _default_site(obj)
    machine = machine or _topic_name(Path(path).stem if Path(path).is_file() else Path(path).name)
    sensor = sensor or ("mic" if rec.kind == "acoustic" else "accel")
    pace = _parse_speed(speed)
    pub = ChunkPublisher(mcfg, site, machine, sensor, sample_rate_hz=rec.sample_rate_hz, unit=rec.unit, encoding=encoding).start()
    click.echo(f"replaying {rec.name}: {len(rec.segments)} segment(s), {rec.duration_s:.1f} s at {rec.sample_rate_hz:g} Hz "
               f"({rec.unit}) to {pub.topic} on {mcfg.broker}, speed {speed}", err=True)
    n = 0
    try:
        i = 0
        while loops == 0 or i < loops:
            first_ns = rec.segments[0].start_ns
            last_end = rec.segments[-1].start_ns + round(rec.segments[-1].samples.size * 1e9 / rec.sample_rate_hz)
            offset = (time.time_ns() - first_ns) if clock == "now" else i * (last_end - first_ns)
            segs = ((s.start_ns, s.samples) for s in rec.segments)
            n += publish_timed(pub, iter_chunks(segs, rec.sample_rate_hz, chunk_s), speed=pace, time_offset_ns=offset)
            i += 1
    except KeyboardInterrupt:
        n = pub.published
    finally:
        ok = pub.close()
    click.echo(f"published {n} chunks{'' if ok else ' (some not acknowledged by the broker)'}", err=True)


def _topic_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "machine"


# -- store -----------------------------------------------------------------------------------
@main.group("store")
def store_group() -> None:
    """Check the store (InfluxDB or SQLite) and the spool."""


@store_group.command("check")
@click.option("--influx-url", default=None, metavar="URL",
              help="Check the InfluxDB at this URL instead of the configured store (e.g. http://127.0.0.1:8086).")
@click.option("--database", default=None, help="InfluxDB database (1.x) or DBRP-mapped name (2.x/3) [default: from config, else pdm_edge].")
@click.option("--retention-policy", default=None, help="InfluxDB retention policy [default: the database's default].")
@click.option("--username", default=None, help="InfluxDB 1.x user (sent as u/p).")
@click.option("--password", default=None, help="InfluxDB 1.x password; prefer PDM_EDGE__STORE__PASSWORD.")
@click.option("--token", default=None, help="InfluxDB 2.x/3 token; prefer PDM_EDGE__STORE__TOKEN.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Seconds per request [default: from config, else 10].")
@click.pass_obj
@_handle_errors
def store_check(obj: _Ctx, influx_url: str | None, database: str | None, retention_policy: str | None,
                username: str | None, password: str | None, token: str | None, timeout_s: float | None) -> None:
    """Connect to the store, report its type and version, time a write + read round trip of a
    marker (a model_event of machine ``_check``), and report the spool's depth.

    Exits 1 with one line when the store is unreachable, refuses the credentials or lacks the
    database (a check creates nothing but the marker).
    """
    from pdm_edge.store import ModelEvent, open_store
    from pdm_edge.store.spool import spool_depth

    store_over: dict[str, Any] = {}
    if influx_url:
        store_over.update(backend="influxdb", url=influx_url)
    for key, value in (("database", database), ("retention_policy", retention_policy), ("username", username),
                       ("password", password), ("token", token), ("timeout_s", timeout_s)):
        if value is not None:
            store_over[key] = value
    if username is not None and token is None:
        store_over["token"] = None
    if token is not None and username is None:
        store_over["username"] = None
    overrides: dict[str, Any] = {"store": store_over} if store_over else {}
    if obj.config_path is None:  # no file: defaults plus PDM_EDGE__* environment overrides
        overrides.setdefault("mqtt", {"broker": "127.0.0.1:1883"})
    cfg = obj.config(overrides)
    sc = cfg.store
    store = open_store(sc, create_database=False)
    try:
        info = store.server_info()
        where = f"{sc.url}, database {sc.database!r}" + (f", retention policy {sc.retention_policy!r}" if sc.retention_policy else "") \
            if sc.backend == "influxdb" else f"{sc.sqlite_path}"
        build = f" ({info['build']})" if info.get("build") else ""
        click.echo(f"store: {info['type']} {info['version']}{build} at {where}")
        marker = ModelEvent(cfg.appliance_id, "_check", time.time_ns(), "store_check", __version__,
                            f"pdm-edge store check from {platform.node()}")
        t0 = time.perf_counter()
        store.write_model_events([marker])
        back = store.query_model_events(marker.site, marker.machine, marker.ts_ns, marker.ts_ns + 1)
        rtt_ms = (time.perf_counter() - t0) * 1e3
        if marker not in back:
            raise PdmEdgeError(f"wrote a marker to the {info['type']} store but could not read it back")
        click.echo(f"write + read round trip: {rtt_ms:.1f} ms (model_event {marker.site}/_check at {_fmt_ns(marker.ts_ns)})")
    finally:
        store.close()
    spool_path = Path(cfg.spool.path)
    if spool_path.is_file():
        depth, oldest_ns = spool_depth(spool_path)
        age = f", oldest {(time.time_ns() - oldest_ns) / 1e9:.1f} s old" if oldest_ns is not None else ""
        click.echo(f"spool: {depth} records waiting{age} ({spool_path}, bound {cfg.spool.max_records})")
    else:
        click.echo(f"spool: none at {spool_path}")


# -- eval ------------------------------------------------------------------------------------
@main.command("eval")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the real recordings [default: $PDM_EDGE_DATASETS or ../shared/datasets].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write results.md (the table), results.json and the plots (ROC, score over life, technician, feedback curve) here.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False), default=None, help="Encoder weights [default: models/encoder.pt].")
@click.option("--datasets", default="cwru,dcase,femto,technician,feedback", show_default=True,
              help="Comma-separated subset of cwru, dcase, femto (the five set-A bearings), technician (the simulated "
                   "technician on FEMTO and DCASE), feedback (the DCASE feedback learning curve).")
@click.option("--subset", is_flag=True, help="A small subset of every split (a quick smoke test; figures are not comparable).")
@click.option("--threads", type=int, default=None, help="torch threads [default: all cores].")
@_handle_errors
def eval_cmd(data_dir: str | None, out_dir: str | None, encoder_path: str | None, datasets: str, subset: bool, threads: int | None) -> None:
    """Run the evaluation protocol v2 (CWRU, DCASE valve, FEMTO set A, simulated technician,
    feedback curve) and print one JSON document; with --out, also the markdown table."""
    import torch

    from pdm_edge.evaluation import run_eval, to_json
    from pdm_edge.model import load_encoder
    from sample_data.loaders import default_datasets_dir

    if threads:
        torch.set_num_threads(threads)
    data = Path(data_dir) if data_dir else default_datasets_dir()
    if not data.is_dir():
        raise PdmEdgeError(f"dataset folder {data} not found (pass --data DIR)")
    encoder, sha = load_encoder(encoder_path)
    doc = run_eval(data, Path(out_dir) if out_dir else None, encoder, sha,
                   datasets=tuple(d.strip() for d in datasets.split(",") if d.strip()), subset=subset,
                   log=lambda m: click.echo(m, err=True))
    click.echo(to_json(doc))


# -- run -------------------------------------------------------------------------------------
@main.command("run")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              help="One line per log record: logfmt (key=value) or JSON.")
@click.option("--stop-timeout", "stop_timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds allowed for a clean stop on SIGTERM/SIGINT (score queued windows, flush the spool).")
@click.pass_context
@_handle_errors
def run_cmd(ctx: click.Context, log_format: str, stop_timeout_s: float) -> None:
    """Run the appliance: ingestion, scoring, alerts, store, labels, /healthz and /metrics.

    Reads the configuration (--config, $PDM_EDGE_CONFIG, ./pdm-edge.toml,
    /etc/pdm-edge/pdm-edge.toml) and runs until SIGTERM or SIGINT, then stops cleanly and exits
    0. Under systemd (Type=notify) it reports READY=1 and, with WatchdogSec, feeds the watchdog
    while the scoring worker is alive. Log level: --log-level, else $PDM_EDGE_LOG_LEVEL, else
    log_level from the configuration.
    """
    from pdm_edge.runtime.logging import configure_logging
    from pdm_edge.runtime.service import Service, run_forever

    obj: _Ctx = ctx.obj
    cfg = obj.config()
    level = (ctx.parent.params.get("log_level") if ctx.parent else None) or os.environ.get("PDM_EDGE_LOG_LEVEL") or cfg.log_level
    configure_logging(level, log_format)
    sys.exit(run_forever(Service(cfg), stop_timeout=stop_timeout_s))


# -- demo ------------------------------------------------------------------------------------
def _dashboard_importable() -> None:
    """Make ``import dashboard`` work: the dashboard is not an installed package, it is the
    checkout's ``dashboard/`` beside ``pdm_edge/``."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)


DEMO_USERS = (("tech", "technician"), ("eng", "engineer"))
"""The demo's dashboard accounts: a technician (labels) and an engineer (labels, promote, roll back)."""


def demo_users(path: Path) -> dict[str, str]:
    """Write the demo's users file (``path``, mode 0600) with :data:`DEMO_USERS`, each with a
    fresh random password; returns ``{name: password}``. Local demo accounts: the demo's
    dashboard listens on 127.0.0.1 only."""
    import secrets

    _dashboard_importable()
    from dashboard.auth import UserRecord, hash_password, write_users

    passwords = {name: secrets.token_urlsafe(9) for name, _ in DEMO_USERS}
    write_users(path, {name: UserRecord(name, role, hash_password(passwords[name])) for name, role in DEMO_USERS})
    return passwords


def demo_sensor_config(rec: Any) -> dict[str, Any]:
    """The demo sensor's configuration from the recording: kind, rate, unit, 1 s windows with
    0.5 s hop, and, when the recording's metadata give them (the bundled simulator sample: an
    SKF 6205 at 25 Hz), the bearing geometry and shaft speed, so that the dashboard's envelope
    spectrum marks BPFO, BPFI, BSF and FTF."""
    out: dict[str, Any] = {"kind": rec.kind, "sample_rate_hz": rec.sample_rate_hz, "unit": rec.unit,
                           "window_s": 1.0, "hop_s": 0.5}
    meta = rec.metadata or {}
    bearing = meta.get("bearing")
    shaft = meta.get("shaft_hz")
    if rec.kind == "vibration" and isinstance(bearing, dict) and isinstance(shaft, (int, float)) and shaft > 0:
        keys = ("n_elements", "element_diameter_mm", "pitch_diameter_mm", "contact_angle_deg", "name")
        out["shaft_hz"] = float(shaft)
        out["bearing"] = {k: bearing[k] for k in keys if k in bearing}
    return out


def _start_dashboard(cfg_path: Path, port: int) -> Any:
    """Start ``streamlit run dashboard/app.py`` on ``port`` with ``PDM_EDGE_CONFIG=cfg_path``;
    returns the process, or None (with the reason printed) when the dashboard is unavailable."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parent.parent
    app = next((p for p in (root / "dashboard" / "app.py", Path("dashboard") / "app.py") if p.is_file()), None)
    if app is None:
        click.echo("dashboard unavailable: dashboard/app.py not found (the demo runs without it)")
        return None
    if importlib.util.find_spec("streamlit") is None:
        click.echo("dashboard unavailable: streamlit is not installed in this environment")
        return None
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
                             "--server.address", "127.0.0.1",  # the demo's accounts are local only
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=app.parent.parent, env={**os.environ, "PDM_EDGE_CONFIG": str(cfg_path.resolve())})
    click.echo(f"dashboard on http://localhost:{port} (streamlit, pid {proc.pid})")
    return proc


@main.command()
@click.option("--speed", default="4", show_default=True, help="Replay speed of the sample recording (max = as fast as possible).")
@click.option("--recording", type=click.Path(exists=True), default=None, help="Recording to replay [default: the bundled sample].")
@click.option("--calibration-s", type=float, default=20.0, show_default=True, help="Seconds of the recording used as the machine's normal baseline.")
@click.option("--state-dir", type=click.Path(file_okay=False), default="var/demo", show_default=True,
              help="Where the demo's SQLite store and spool are written (emptied first).")
@click.option("--quiet", is_flag=True, help="Print only calibration, alerts and the summary.")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True,
              help="Also start the Streamlit dashboard (dashboard/app.py) on the demo's store; after the replay the "
                   "demo keeps running until Ctrl-C.")
@click.option("--dashboard-port", type=click.IntRange(1, 65535), default=8501, show_default=True, help="Port of the dashboard.")
@_handle_errors
def demo(speed: str, recording: str | None, calibration_s: float, state_dir: str, quiet: bool, dashboard: bool,
         dashboard_port: int) -> None:
    """End-to-end demo on the embedded default: broker, replay, ingestion, scoring, alerts, store.

    Starts an in-process MQTT broker and the appliance itself (the service of `pdm-edge run`,
    with a SQLite store, spool, label book and registry in --state-dir and /healthz and
    /metrics on a free port), replays the bundled simulator recording (healthy, then a growing
    outer-race fault from 30 s) through the broker, calibrates the machine on its first
    ``--calibration-s`` seconds with the shipped encoder and an adapter trained on the spot,
    scores every later window, raises and clears alerts (3 of 5 windows), and writes scores and
    alerts through the durable spool into the SQLite store. The demo's configuration is written
    to STATE_DIR/pdm-edge.toml (the dashboard reads it).
    """
    import shutil

    from pdm_edge.broker import EmbeddedBroker
    from pdm_edge.model import load_encoder
    from pdm_edge.config import config_toml
    from pdm_edge.runtime.service import Service, ServiceHooks
    from sample_data.loaders import load_recording, load_sample
    from sensors.publisher import ChunkPublisher, iter_chunks, publish_timed

    rec = load_recording(recording) if recording else load_sample()
    site, machine, sensor = "demo", "pump-01", ("mic" if rec.kind == "acoustic" else "de-accel")
    encoder, sha = load_encoder()
    if logging.getLogger().level >= logging.WARNING:  # the demo prints every alert itself (*** ALERT)
        logging.getLogger("pdm_edge.alerts.publisher").setLevel(logging.ERROR)
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    for f in state.glob("*.sqlite*"):
        f.unlink()
    shutil.rmtree(state / "registry", ignore_errors=True)
    events: list[str] = []
    alerts: list[Any] = []
    t0_ns: list[int] = []

    def on_model_event(stream: str, event: str, detail: str) -> None:
        events.append(f"{stream} {event}: {detail}")
        click.echo(f"--- {stream} {event}: {detail}")

    statuses: dict[str, int] = {}
    arrival: dict[int, str] = {}  # window index -> the stream's state when it was handled
    scored: set[int] = set()
    why = {
        "collecting": f"(collecting): the first {calibration_s:g} s of windows are the machine's normal baseline; they "
                      "calibrate the model and get no score",
        "calibrating": "(calibrating): the adapter is being trained on the baseline (in the background, up to 30 s); "
                       "windows that arrive meanwhile wait in a backlog and are scored as soon as the model is ready",
    }

    def on_window(w: Window, status: str) -> None:
        if not t0_ns:
            t0_ns.append(w.start_ns)
        statuses[status] = statuses.get(status, 0) + 1
        arrival[w.index] = status
        if not quiet:
            if statuses[status] == 1 and status in why:
                click.echo(why[status])
            click.echo(window_line(w) + ("" if status == "scoring" else f"  ({status})"))

    def on_score(win: Window, sc: Any) -> None:
        scored.add(win.index)
        if not quiet:
            click.echo(f"    score {sc.score:7.2f}  threshold {sc.threshold:5.2f}  window {_fmt_ns(win.start_ns)}"
                       + ("  ABOVE" if sc.is_anomaly else ""))

    def on_alert(a: Any, win: Window) -> None:
        alerts.append(a)
        at = (a.start_ns - t0_ns[0]) / 1e9
        click.echo(f"*** ALERT {a.state} {a.site}/{a.machine}/{a.sensor}: span from {at:.1f} s into the recording, "
                   f"peak score {a.peak_score:.2f} > threshold {a.threshold:.2f}")

    with EmbeddedBroker() as broker:
        absolute = state.resolve()
        cfg = config_from_dict({
            "appliance_id": "pdm-edge-demo",
            "site": site,
            "mqtt": {"broker": broker.address, "protocol": "3.1.1"},
            "store": {"backend": "sqlite", "sqlite_path": str(absolute / "store.sqlite")},
            "spool": {"path": str(absolute / "spool.sqlite")},
            "feedback": {"state_dir": str(absolute)},
            "registry": {"dir": str(absolute / "registry")},
            # one label retrains (a technician's label in the demo's dashboard gives the engineer a version to promote)
            "learning": {"calibration_s": calibration_s, "max_train_seconds": 30.0, "retrain_after_labels": 1},
            # one window per batch: every window's line is printed with its own score
            "service": {"http": "127.0.0.1:0", "torch_threads": max(1, (os.cpu_count() or 2) - 1), "score_batch": 1},
            "alerts": {"k": 3, "n": 5},
            "dashboard": {"users_file": str(absolute / "users.toml")},
            "sensors": {f"{site}/{machine}/{sensor}": demo_sensor_config(rec)},
        }, environ={})
        cfg_path = state / "pdm-edge.toml"
        cfg_path.write_text(config_toml(cfg))
        passwords = demo_users(absolute / "users.toml")
        svc = Service(cfg, encoder=encoder, encoder_sha256=sha,
                      hooks=ServiceHooks(on_window=on_window, on_score=on_score, on_alert=on_alert, on_model_event=on_model_event))
        click.echo(f"embedded MQTT broker on {broker.address}; encoder {sha[:12]}...; store {state / 'store.sqlite'}")
        click.echo(f"recording: {rec.name}, {rec.duration_s:.1f} s at {rec.sample_rate_hz:g} Hz in {rec.unit}"
                   + (f" ({rec.metadata.get('description')})" if rec.metadata.get("description") else ""))
        svc.start()
        dash = None
        try:
            if not svc.ingestor.wait_ready(15):
                raise PdmEdgeError("ingestion did not connect to the embedded broker")
            # the dashboard reads the configuration: give it the port the service actually bound
            bound = svc.http_url.removeprefix("http://") if svc.http_url else cfg.service.http
            cfg_path.write_text(config_toml(cfg.model_copy(update={"service": cfg.service.model_copy(update={"http": bound})})))
            click.echo(f"appliance health {svc.http_url}/healthz, metrics {svc.http_url}/metrics; configuration {cfg_path}")
            click.echo("dashboard accounts (local demo only, written to " + str(state / "users.toml") + "): "
                       + ", ".join(f"{n} / {passwords[n]} ({role})" for n, role in DEMO_USERS))
            marks = cfg.sensors[f"{site}/{machine}/{sensor}"]
            if marks.bearing is not None and marks.shaft_hz is not None:
                d = marks.bearing.geometry().defect_frequencies(marks.shaft_hz)
                click.echo(f"bearing {marks.bearing.name or 'configured'} at {marks.shaft_hz:g} Hz: BPFO {d.bpfo_hz:.1f} Hz, "
                           f"BPFI {d.bpfi_hz:.1f} Hz, BSF {d.bsf_hz:.1f} Hz, FTF {d.ftf_hz:.1f} Hz (marked on the envelope spectrum)")
            if dashboard:
                dash = _start_dashboard(cfg_path, dashboard_port)
            pub = ChunkPublisher(cfg.mqtt, site, machine, sensor, sample_rate_hz=rec.sample_rate_hz, unit=rec.unit).start()
            done = threading.Event()
            rate = _parse_speed(speed)

            def _publish() -> None:
                try:
                    # stamped so that the recording ends when its replay ends (never in the future, at any speed)
                    first = rec.segments[0].start_ns
                    last = max(sg.start_ns + round(sg.samples.shape[-1] / rec.sample_rate_hz * 1e9) for sg in rec.segments)
                    replay_ns = 0 if math.isinf(rate) else round((last - first) / rate)
                    offset = time.time_ns() + replay_ns - last
                    publish_timed(pub, iter_chunks(((s.start_ns, s.samples) for s in rec.segments), rec.sample_rate_hz, 0.1),
                                  speed=rate, time_offset_ns=offset)
                    pub.flush(30)
                finally:
                    done.set()

            threading.Thread(target=_publish, name="demo-replay", daemon=True).start()
            click.echo(f"replaying to {pub.topic} at speed {speed}; windows of 1 s, hop 0.5 s; "
                       f"calibrating on the first {calibration_s:g} s:\n")
            try:
                while not done.wait(0.2):
                    pass
            finally:
                pub.close(5)
            if not svc.wait_idle(timeout=120):
                click.echo("warning: the appliance was still busy after 120 s; the summary may be incomplete", err=True)
            _print_summary(svc.ingestor.stats(), published=pub.published)
            n_scores = len(svc.store.query_scores(site, machine, 0, 2**62))
            raised = [a for a in alerts if a.state == "raised"]
            click.echo(f"  calibration            {'; '.join(events) or 'not reached'}")
            click.echo(f"  scores stored          {n_scores} (SQLite store {state / 'store.sqlite'})")
            on_arrival = sum(1 for i in scored if arrival.get(i) == "scoring")
            click.echo(f"  window outcomes        {len(arrival)}: {len(set(arrival) - scored)} calibration baseline (not scored), "
                       f"{len(scored) - on_arrival} waited while the model trained (scored after it), "
                       f"{on_arrival} scored on arrival")
            first = f", first from {(raised[0].start_ns - t0_ns[0]) / 1e9:.1f} s into the recording" if raised and t0_ns else ""
            click.echo(f"  alerts raised          {len(raised)}{first}")
            fault = rec.metadata.get("onset_s")
            if fault is not None:
                click.echo(f"  fault onset (truth)    {float(fault):.1f} s into the recording")
            click.echo(f"  model registry         {state / 'registry'}: pdm-edge --config {cfg_path} models list")
            if dash is not None:
                click.echo(f"\nthe appliance and the dashboard (http://localhost:{dashboard_port}) keep running; Ctrl-C to stop")
                try:
                    while dash.poll() is None:
                        time.sleep(0.5)
                    click.echo(f"the dashboard exited with status {dash.returncode}")
                except KeyboardInterrupt:
                    pass
        finally:
            if dash is not None and dash.poll() is None:
                dash.terminate()
                try:
                    dash.wait(10)
                except Exception:
                    dash.kill()
            svc.stop(timeout=60)


# -- report ----------------------------------------------------------------------------------
@main.command("report")
@click.argument("machine_key", metavar="SITE/MACHINE")
@click.option("--hours", type=click.FloatRange(min=0.001), default=None,
              help="The period: this many hours up to --end [default: the machine's data span, at most 30 days].")
@click.option("--end", "end", default=None, help="End of the period (ISO 8601 or epoch ns) [default: now].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the report (HTML) and the CSV exports.")
@click.pass_obj
@_handle_errors
def report_cmd(obj: _Ctx, machine_key: str, hours: float | None, end: str | None, out_dir: str) -> None:
    """Write a machine's report: printable HTML (alerts, labels, score and ISO 20816-3 severity
    trends, spectra of the top alert, model versions) and CSV exports of its scores and alerts.

    Reads the configured store, registry and label book; writes
    OUT/report-SITE-MACHINE-<end>.html, scores-....csv and alerts-....csv. Print the HTML to PDF
    from a browser."""
    from pdm_edge.feedback import LabelBook, parse_time
    from pdm_edge.store.factory import open_store

    _dashboard_importable()
    from dashboard import data
    from dashboard.report import build_report, data_period

    parts = machine_key.split("/")
    if len(parts) != 2 or not all(parts):
        raise click.UsageError(f"SITE/MACHINE expected, got {machine_key!r}")
    site, machine = parts
    cfg = obj.config()
    store = open_store(cfg.store, create_database=False)
    end_ns = parse_time(end, "--end") if end else time.time_ns()
    if hours is not None:
        start_ns = end_ns - round(hours * 3600e9)
    else:
        span = data_period(store, cfg, site, machine)
        if span is None:
            store.close()
            raise PdmEdgeError(f"{site}/{machine} has no scores in the store; give the period with --hours")
        start_ns, end_ns = span if not end else (span[0], end_ns)
    registry = data.open_registry(cfg.registry.dir)
    book_path = Path(cfg.feedback.state_dir) / LabelBook.FILENAME
    book = LabelBook(book_path) if book_path.is_file() else None
    try:
        rep = build_report(store, cfg, site, machine, start_ns, end_ns, registry=registry, book=book)
    finally:
        for x in (store, registry, book):
            if x is not None:
                x.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(end_ns / 1e9, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{site}-{machine}-{stamp}"
    for prefix, text in (("report", rep.html), ("scores", rep.scores_csv), ("alerts", rep.alerts_csv)):
        path = out / f"{prefix}-{name}.{'html' if prefix == 'report' else 'csv'}"
        path.write_text(text, encoding="utf-8")
        click.echo(f"{prefix:<7} {path} ({len(text.encode()) / 1024:.0f} KiB)")


# -- labels ----------------------------------------------------------------------------------
@main.group("label")
def label_group() -> None:
    """Technician labels (the label book in the appliance's state directory).

    A label says a span of a machine was normal (a false alarm), a fault, or to be ignored
    (maintenance). Labels from here, the dashboard and MQTT go through the same validation and
    the same book; the same label given twice is one label. Invalid input exits with status 2.
    """


def _label_settings(obj: _Ctx, state_dir: str | None) -> tuple[Any, Path]:
    """``(LabelLimits, state directory)`` from the configuration (defaults without a file)."""
    from pdm_edge.feedback import LabelLimits

    if obj.config_path is not None:
        cfg = obj.config()
    else:  # no file: defaults plus PDM_EDGE__* environment overrides
        cfg = config_from_dict({"mqtt": {"broker": "127.0.0.1:1883"}})
    return LabelLimits.from_config(cfg.feedback), Path(state_dir if state_dir else cfg.feedback.state_dir)


def _label_line(lb: Any) -> str:
    where = f"{lb.site}/{lb.machine}" + (f"/{lb.sensor}" if lb.sensor else "")
    kind = lb.kind + (f" ({lb.fault_type})" if lb.fault_type else "")
    alert = f" alert {lb.alert_id}" if lb.alert_id else ""
    note = f"  \"{lb.note}\"" if lb.note else ""
    return f"{lb.id}  {where}  {kind}  {_fmt_ns(lb.start_ns)} .. {_fmt_ns(lb.end_ns)}{alert}  by {lb.author}{note}"


@label_group.command("add")
@click.option("--site", default=None, help="Site [default: `site` from the config].")
@click.option("--machine", required=True, help="Machine.")
@click.option("--sensor", default=None, help="Restrict the label to one sensor [default: the whole machine].")
@click.option("--alert-id", default=None, help="The alert the label answers.")
@click.option("--start", required=True, metavar="TIME", help="Span start: ISO-8601 with a UTC offset (2026-11-21T08:00:00Z) or epoch ns.")
@click.option("--end", required=True, metavar="TIME", help="Span end (exclusive), as --start.")
@click.option("--kind", required=True, metavar="KIND", help="normal (false alarm), fault (confirmed) or ignore (maintenance).")
@click.option("--fault-type", default=None, metavar="TYPE",
              help="With --kind fault: bearing_outer_race, bearing_inner_race, bearing_ball, imbalance, misalignment, "
                   "looseness, cavitation or other.")
@click.option("--author", required=True, help="Who gives the label.")
@click.option("--note", default="", help="Free text.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory holding labels.sqlite [default: [feedback] state_dir, else var].")
@click.option("--json", "as_json", is_flag=True, help="Print the stored label as JSON, with \"new\": true|false.")
@click.pass_obj
@_handle_errors
def label_add(obj: _Ctx, site: str | None, machine: str, sensor: str | None, alert_id: str | None, start: str, end: str,
              kind: str, fault_type: str | None, author: str, note: str, state_dir: str | None, as_json: bool) -> None:
    """Add a label (idempotent: the same label again is reported as already stored)."""
    from pdm_edge.feedback import LabelBook, LabelError, label_payload, parse_time, submit_label

    limits, state = _label_settings(obj, state_dir)
    try:
        fields = dict(site=site or _default_site(obj), machine=machine, sensor=sensor, alert_id=alert_id,
                      start_ns=parse_time(start, "start"), end_ns=parse_time(end, "end"), kind=kind,
                      fault_type=fault_type, author=author, note=note)
        with LabelBook.in_dir(state) as book:
            label, created = submit_label(book, limits=limits, **fields)
    except LabelError as err:
        click.echo(f"label error: {err}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({**label_payload(label), "new": created}, ensure_ascii=False))
    else:
        click.echo(("stored label " if created else "already stored (unchanged): label ") + _label_line(label))


@label_group.command("list")
@click.option("--site", default=None, help="Only this site.")
@click.option("--machine", default=None, help="Only this machine.")
@click.option("--kind", default=None, help="Only this kind (normal, fault, ignore).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory holding labels.sqlite [default: [feedback] state_dir, else var].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per label.")
@click.pass_obj
@_handle_errors
def label_list(obj: _Ctx, site: str | None, machine: str | None, kind: str | None, state_dir: str | None, as_json: bool) -> None:
    """List the labels in the book, oldest span first."""
    from pdm_edge.feedback import LabelBook, label_payload

    _, state = _label_settings(obj, state_dir)
    path = state / LabelBook.FILENAME
    if not path.is_file():
        if not as_json:
            click.echo(f"no labels (no label book at {path})")
        return
    with LabelBook(path) as book:
        labels = book.list(site=site, machine=machine, kind=kind)
    for lb in labels:
        click.echo(json.dumps(label_payload(lb), ensure_ascii=False) if as_json else _label_line(lb))
    if not as_json:
        click.echo(f"{len(labels)} label(s) in {path}")


# ---------------------------------------------------------------------------------------------
# models (the model registry)


@main.group("models")
def models_group() -> None:
    """Model versions (the registry): list, show, promote, roll back, export and import.

    Every trained adapter of a stream is a version: candidate, active (one per stream), rejected
    (by the gate, with the reason) or retired. Export writes one package (zip: version file +
    manifest with hashes and the encoder's sha256, optionally signed with Ed25519); import
    verifies it and adds it as a candidate.
    """


def _resolve_registry(ctx: click.Context, param: Any, value: str | None) -> str:
    """``--registry``, else ``[registry] dir`` of the configuration (``--config``,
    ``$PDM_EDGE_CONFIG``, ``./pdm-edge.toml``), else ``var/registry``. When that does not exist
    and the demo's does (``var/demo/registry``), the error says how to use it."""
    if value:
        return value
    obj = ctx.find_object(_Ctx)
    if obj is not None and obj.config_path is not None:
        try:
            return obj.config().registry.dir
        except ConfigError as err:
            raise click.BadParameter(f"cannot take the registry from the configuration: {err}") from None
    default = "var/registry"
    demo = Path("var/demo")
    reads_only = ctx.command.name in ("list", "show", "promote", "rollback", "export")  # those never create one
    if reads_only and not (Path(default) / "registry.sqlite").exists() and (demo / "registry" / "registry.sqlite").exists():
        raise click.UsageError(f"no model registry at {default}; the demo's is {demo / 'registry'}: "
                               f"pdm-edge --config {demo / 'pdm-edge.toml'} models ... (or --registry {demo / 'registry'})")
    return default


def _registry_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--registry", "registry_dir", type=click.Path(file_okay=False), default=None,
                        callback=_resolve_registry,
                        help="Model registry directory [default: [registry] dir of the configuration, else var/registry].")(fn)


def _open_registry(obj: _Ctx, registry_dir: str | None, *, create: bool = False) -> Any:
    """The registry every ``models`` command works on: ``--registry`` when given, else the
    configuration's ``[registry] dir``; the configuration's ``verify_key`` is enforced on import
    either way (issue 15: the config's trust is not optional)."""
    from pdm_edge.registry import Registry, load_trusted_keys

    if obj.config_path is not None:
        rcfg = obj.config().registry
        return Registry(registry_dir or rcfg.dir, create=create, trusted_public_keys=load_trusted_keys(rcfg.verify_key))
    return Registry(registry_dir or "var/registry", create=create)


def _version_line(v: Any) -> str:
    reason = f"  ({v.reason})" if v.reason else ""
    return (f"{v.id:<24} {v.stream:<28} {v.status:<9} {_fmt_ns(v.created_ns)}  parent {v.parent or '-':<20} "
            f"{v.trigger:<19} {v.size_bytes / 1024:6.1f} KiB{reason}")


@models_group.command("list")
@_registry_option
@click.option("--site", default=None, help="Only this site.")
@click.option("--machine", default=None, help="Only this machine.")
@click.option("--sensor", default=None, help="Only this sensor.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@click.pass_obj
@_handle_errors
def models_list(obj: _Ctx, registry_dir: str | None, site: str | None, machine: str | None, sensor: str | None,
                as_json: bool) -> None:
    """List model versions, by stream, oldest first."""
    with _open_registry(obj, registry_dir) as reg:
        versions = reg.list(site=site, machine=machine, sensor=sensor)
        root = reg.root
    for v in versions:
        click.echo(json.dumps(v.to_dict()) if as_json else _version_line(v))
    if not as_json:
        click.echo(f"{len(versions)} version(s) in {root}")


@models_group.command("show")
@click.argument("version_id")
@_registry_option
@click.pass_obj
@_handle_errors
def models_show(obj: _Ctx, version_id: str, registry_dir: str | None) -> None:
    """Print one version as JSON (metrics, training summary, hashes, status and reason)."""
    with _open_registry(obj, registry_dir) as reg:
        click.echo(json.dumps(reg.get(version_id).to_dict(), indent=2))


@models_group.command("promote")
@click.argument("version_id")
@_registry_option
@click.option("--reason", default="promoted from the command line", show_default=True)
@click.option("--force", is_flag=True, help="Promote even a version the gate rejected.")
@click.pass_obj
@_handle_errors
def models_promote(obj: _Ctx, version_id: str, registry_dir: str | None, reason: str, force: bool) -> None:
    """Make VERSION_ID its stream's active version (the previous one is retired).

    A running `pdm-edge run` in this process swaps models on its own; another process picks the
    change up from the registry."""
    with _open_registry(obj, registry_dir) as reg:
        v = reg.promote(version_id, reason, force=force)
    click.echo(f"active: {_version_line(v)}")


@models_group.command("rollback")
@_registry_option
@click.option("--site", required=True)
@click.option("--machine", required=True)
@click.option("--sensor", required=True)
@click.pass_obj
@_handle_errors
def models_rollback(obj: _Ctx, registry_dir: str | None, site: str, machine: str, sensor: str) -> None:
    """Re-activate the stream's previous active version (the current one is retired)."""
    with _open_registry(obj, registry_dir) as reg:
        v = reg.rollback(site, machine, sensor)
    click.echo(f"active: {_version_line(v)}")


@models_group.command("train")
@click.argument("stream")
@click.option("--now", is_flag=True, help="Train here and now (when no service runs) instead of queueing the job for `pdm-edge run`.")
@click.option("--state-dir", default=None, help="The appliance's state directory [default: [feedback] state_dir].")
@_handle_errors
@click.pass_context
def models_train(ctx: click.Context, stream: str, now: bool, state_dir: str | None) -> None:
    """Train a new adapter for STREAM ("site/machine/sensor") on its replay buffer and labels.

    By default the job is queued; the running appliance picks it up within seconds, trains at
    low priority, gates the candidate and promotes or rejects it (see `pdm-edge models list`).
    With --now the job runs in this process (stop the service first: one trainer per state
    directory) and the outcome is printed."""
    from pdm_edge.learning import request_training

    obj: _Ctx = ctx.obj
    cfg = obj.config() if obj.config_path is not None else config_from_dict({"mqtt": {"broker": "127.0.0.1:1883"}})
    parts = stream.split("/")
    if len(parts) != 3 or not all(parts):
        raise click.UsageError(f"STREAM must be site/machine/sensor, got {stream!r}")
    sd = Path(state_dir if state_dir else cfg.feedback.state_dir)
    job = request_training(sd, stream)
    if job is None:
        click.echo(f"{stream}: a training job is already queued or running")
    else:
        click.echo(f"{stream}: training job {job} queued in {sd / 'learning.sqlite'}")
    if not now:
        return
    from pdm_edge.feedback import LabelBook, LabelledWindowBuffer
    from pdm_edge.learning import build_learning
    from pdm_edge.model import load_encoder
    from pdm_edge.registry import Registry

    encoder, sha = load_encoder()
    with Registry.from_config(cfg.registry) as reg:
        book, buffer = LabelBook.in_dir(sd), LabelledWindowBuffer.in_dir(sd)
        loop = build_learning(cfg, reg, encoder, sha, labels=book, label_windows=buffer, state_dir=sd,
                              on_event=lambda st, ev, ver, det: click.echo(f"--- {st} {ev} {ver} {det}".rstrip()))
        try:
            done = loop.run_pending()
        finally:
            loop.close()
            book.close()
            buffer.close()
    for j in done:
        click.echo(f"job {j.id} {j.stream} ({j.trigger}): {j.status} {j.version or ''} {j.detail}")
    if any(j.status == "failed" for j in done):
        raise SystemExit(1)


@models_group.command("export")
@click.argument("version_id")
@click.argument("path", type=click.Path(dir_okay=False))
@_registry_option
@click.option("--sign", "key_path", type=click.Path(dir_okay=False), default=None,
              help="Ed25519 private key (PEM) to sign the manifest with.")
@click.pass_obj
@_handle_errors
def models_export(obj: _Ctx, version_id: str, path: str, registry_dir: str | None, key_path: str | None) -> None:
    """Write VERSION_ID as one package (zip) at PATH."""
    from pdm_edge.registry import load_private_key

    key = load_private_key(key_path) if key_path else None
    with _open_registry(obj, registry_dir) as reg:
        out = reg.export(version_id, path, signing_key=key)
    click.echo(f"exported {version_id} to {out} ({out.stat().st_size} bytes, {'signed' if key else 'unsigned'})")


@models_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@_registry_option
@click.option("--trust", "trusted", multiple=True, type=click.Path(dir_okay=False),
              help="Trusted Ed25519 public key (PEM); repeatable.")
@click.option("--require-signature", is_flag=True, help="Refuse a package without a signature from a trusted key.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False), default=None,
              help="The appliance's encoder weights [default: models/encoder.pt].")
@click.option("--encoder-sha256", default=None, help="The encoder's sha256 (instead of reading --encoder).")
@click.pass_obj
@_handle_errors
def models_import(obj: _Ctx, path: str, registry_dir: str | None, trusted: tuple[str, ...], require_signature: bool,
                  encoder_path: str | None, encoder_sha256: str | None) -> None:
    """Verify the package at PATH (hashes, signature, encoder) and add it as a candidate.

    With [registry] verify_key in the configuration, a signature from one of those keys (or a
    --trust key) is required: unsigned, tampered and foreign-signed packages are refused."""
    if encoder_sha256 is None:
        from pdm_edge.model import load_encoder

        _, encoder_sha256 = load_encoder(encoder_path)
    with _open_registry(obj, registry_dir, create=True) as reg:
        v = reg.import_package(path, encoder_sha256=encoder_sha256, trusted_public_keys=list(trusted),
                               require_signature=require_signature)
    click.echo(f"imported: {_version_line(v)}  [{v.origin}]")


@models_group.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="signing_key", show_default=True, help="File name stem.")
@_handle_errors
def models_keygen(directory: str, name: str) -> None:
    """Write a new Ed25519 key pair (NAME.pem, private, mode 0600; NAME.pub.pem) in DIRECTORY."""
    from pdm_edge.registry import generate_keypair

    priv, pub = generate_keypair(directory, name)
    click.echo(f"private key {priv} (keep it off the appliance), public key {pub}")


# -- bench -----------------------------------------------------------------------------------
@main.command("bench")
@click.option("--quick", is_flag=True, help="Short versions; the ingestion search (minutes) is left out.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (every benchmark's full result) instead of the table.")
@click.option("--only", default=None, metavar="NAMES",
              help="Comma-separated subset of score, train, ingest, e2e [default: all].")
@_handle_errors
def bench_cmd(quick: bool, as_json: bool, only: str | None) -> None:
    """Run the benchmarks (each in its own process) and print a summary table.

    Scoring throughput per core, adapter training time and peak memory versus full fine-tuning,
    the most 25.6 kHz channels ingested (not with --quick), publish-to-stored latency p50/p99
    through a real broker and the running service's memory, with the targets met or not.
    Progress goes to stderr. See benchmarks/README.md.
    """
    from pdm_edge.bench import render_table, run_suite

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    doc = run_suite(names, quick=quick, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(doc, indent=2) if as_json else render_table(doc))
    if any(b.get("status") == "failed" for b in doc["benchmarks"].values()):
        sys.exit(1)


# -- fleet ---------------------------------------------------------------------------------------
@main.group("fleet")
def fleet_group() -> None:
    """Fleet learning through Flower: federated adapters per machine class (pdm_edge.fleet)."""


@fleet_group.command("server")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False), default="fleet-server", show_default=True,
              help="The server's directory: priors, rounds.jsonl, Flower's state and logs.")
@click.option("--address", default="0.0.0.0:8000", show_default=True, help="HOST:PORT the Flower SuperLink listens on.")
@click.option("--rounds", "num_rounds", type=int, default=3, show_default=True, help="Federated rounds per run.")
@click.option("--min-clients", type=int, default=3, show_default=True, help="Fewest participants of a class for a round.")
@click.option("--round-timeout", "round_timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds a round waits for replies (a client that died is left out after it).")
@click.option("--every", "every_s", type=float, default=0.0, show_default=True,
              help="Seconds between runs (0: one run, then exit).")
@click.option("--class", "machine_class", default="", help="Only this machine class [default: every class with enough participants].")
@click.option("--signing-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 private key (pdm-edge models keygen) that signs every published prior.")
@click.option("--dp-noise", type=float, default=0.0, show_default=True,
              help="Noise multiplier of central DP with client-side clipping (0: off).")
@click.option("--dp-clip", type=float, default=1.0, show_default=True, help="L2 clipping norm of a client's update.")
@click.option("--dp-delta", type=float, default=1e-3, show_default=True, help="Delta at which epsilon is reported.")
@click.option("--insecure", is_flag=True, help="No TLS (loopback tests only).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), default=None)
@_handle_errors
def fleet_server(out_dir: str, address: str, num_rounds: int, min_clients: int, round_timeout_s: float, every_s: float,
                 machine_class: str, signing_key: str | None, dp_noise: float, dp_clip: float, dp_delta: float, insecure: bool,
                 ssl_certfile: str | None, ssl_keyfile: str | None, ssl_ca_certfile: str | None) -> None:
    """Run the fleet server: a Flower SuperLink, and the fleet app submitted to it (now and
    then every --every seconds). Prints one JSON line per finished round."""
    from pdm_edge.fleet.runner import FleetServer

    ssl = (ssl_certfile, ssl_keyfile, ssl_ca_certfile) if ssl_certfile and ssl_keyfile and ssl_ca_certfile else None
    with FleetServer(out_dir, address, insecure=insecure, ssl=ssl) as srv:  # type: ignore[arg-type]
        click.echo(f"Flower SuperLink on {address}; fleet state in {srv.out_dir}", err=True)
        while True:
            for r in srv.submit(num_rounds=num_rounds, min_clients=min_clients, round_timeout_s=round_timeout_s,
                                machine_class=machine_class, signing_key=signing_key, dp_noise=dp_noise, dp_clip=dp_clip,
                                dp_delta=dp_delta):
                click.echo(json.dumps(r))
            if every_s <= 0:
                break
            time.sleep(every_s)


@fleet_group.command("join")
@click.option("--port", type=int, default=9094, show_default=True, help="Local port of the SuperNode's runtime API.")
@click.option("--print", "print_only", is_flag=True, help="Print the flower-supernode command instead of running it.")
@click.pass_obj
@_handle_errors
def fleet_join(obj: _Ctx, port: int, print_only: bool) -> None:
    """Join the fleet ([fleet] enabled = true): run this appliance's Flower SuperNode, which
    answers the server's rounds with adapter updates trained on this appliance's data."""
    import shlex

    from pdm_edge.fleet.runner import flower_env, supernode_command

    cfg = obj.config()
    assert obj.config_path is not None
    cmd = supernode_command(cfg, obj.config_path, port=port)
    if print_only:
        click.echo(shlex.join(cmd))
        return
    home = Path(cfg.feedback.state_dir) / "fleet" / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    os.execve(cmd[0], cmd, flower_env(home))


@fleet_group.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
@_handle_errors
def fleet_import(obj: _Ctx, path: str) -> None:
    """Verify the delta package at PATH ([fleet] verify_key), store it as its class's prior and
    queue training of this appliance's streams of that class; the gate decides each."""
    from pdm_edge.fleet.priors import import_delta_package
    from pdm_edge.model import load_encoder

    cfg = obj.config()
    encoder, sha = load_encoder()
    pkg, queued = import_delta_package(path, cfg, encoder, sha)
    click.echo(f"prior for {pkg.meta.machine_class} (round {pkg.meta.round}, adapter {pkg.meta.adapter_sha256[:12]}) stored; "
               f"training queued for: {', '.join(queued) or 'no stream of that class'}")


@fleet_group.command("export")
@click.argument("stream")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False), default=None, help="Ed25519 private key to sign with.")
@click.pass_obj
@_handle_errors
def fleet_export(obj: _Ctx, stream: str, out: str, key_path: str | None) -> None:
    """Write the active model version of STREAM (site/machine/sensor) as a delta package at OUT
    (over-the-air update of another appliance's prior), with its size."""
    from pdm_edge.fleet.classes import machine_class
    from pdm_edge.fleet.delta import DeltaPackage, base_adapter
    from pdm_edge.model import load_encoder
    from pdm_edge.registry import Registry, load_private_key

    cfg = obj.config()
    parts = stream.split("/")
    if len(parts) != 3:
        raise ConfigError("", f"stream {stream!r} must be site/machine/sensor")
    encoder, sha = load_encoder()
    with Registry(cfg.registry.dir) as reg:
        rec = reg.active(*parts)
        if rec is None:
            raise PdmEdgeError(f"{stream} has no active model version to export")
        scorer = reg.load(rec.id, encoder, sha)
    sc = scorer.config
    ts = dict(rec.training_summary)
    pkg = DeltaPackage.from_adapter(scorer.adapter.state_dict(), base_adapter(encoder, sc.adapter, sc.train.seed),
                                    device_id=cfg.appliance_id, stream=stream,
                                    machine_class=machine_class(sc.kind, sc.sample_rate_hz, cfg.fleet.machine_class),
                                    kind="update", encoder_sha256=sha, adapter_config=sc.adapter.to_dict(), seed=sc.train.seed,
                                    normal_windows=int(ts.get("normal_windows", 0)), fault_windows=int(ts.get("fault_windows", 0)),
                                    training_seconds=float(ts.get("train_seconds", 0.0)), notes={"version": rec.id})
    path = pkg.write(out, load_private_key(key_path) if key_path else None)
    click.echo(f"{path}: {path.stat().st_size} bytes, {rec.id} as a delta to its base, class {pkg.meta.machine_class}")


@fleet_group.command("status")
@click.pass_obj
@_handle_errors
def fleet_status(obj: _Ctx) -> None:
    """This appliance's fleet state as JSON: opt-in, stored priors, the rounds it took part in."""
    from pdm_edge.fleet.delta import DeltaPackage
    from pdm_edge.fleet.runner import read_rounds

    cfg = obj.config()
    fdir = Path(cfg.feedback.state_dir) / "fleet"
    priors = {}
    for p in sorted((fdir / "priors").glob("*.pdmdelta")):
        try:
            pkg, note = DeltaPackage.read(p)
            priors[pkg.meta.machine_class] = {"round": pkg.meta.round, "adapter_sha256": pkg.meta.adapter_sha256,
                                              "participants": pkg.meta.notes.get("participants"), "bytes": p.stat().st_size,
                                              "signature": note}
        except PdmEdgeError as exc:
            priors[p.stem] = {"error": str(exc)}
    click.echo(json.dumps({"enabled": cfg.fleet.enabled, "server": cfg.fleet.server, "machine_class_tag": cfg.fleet.machine_class,
                           "priors": priors, "rounds": read_rounds(fdir)[-20:]}, indent=2))


@fleet_group.command("eval-femto")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding femto_pronostia/ [default: sample_data.loaders.default_datasets_dir()].")
@click.option("--rounds", type=int, default=2, show_default=True, help="Federated rounds building each prior.")
@click.option("--max-epochs", type=int, default=15, show_default=True, help="Adapter epochs per calibration (early stopping).")
@click.option("--max-seconds", type=float, default=60.0, show_default=True, help="Wall-time budget per calibration.")
@click.option("--dp-noise", type=float, default=0.0, show_default=True, help="DP noise multiplier of the prior's rounds (0: off).")
@click.option("--dp-clip", type=float, default=1.0, show_default=True, help="DP clipping norm of a client's update.")
@click.option("--fold", "folds", multiple=True, help="Only this left-out bearing (repeatable) [default: all five].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Also write the JSON document here.")
@_handle_errors
def fleet_eval_femto(data_dir: str | None, rounds: int, max_epochs: int, max_seconds: float, dp_noise: float, dp_clip: float,
                     folds: tuple[str, ...], out_path: str | None) -> None:
    """FEMTO set A as a fleet, leave one bearing out: prior from the other four, then the
    left-out bearing calibrated from the prior on its first 2 minutes vs from scratch on 10 %
    of its life vs the prior alone (pdm_edge.fleet.femto). Prints one JSON document."""
    from pdm_edge.fleet.femto import FleetEval, load_bearings
    from sample_data.loaders import default_datasets_dir

    data = Path(data_dir) if data_dir else default_datasets_dir()
    ev = FleetEval(load_bearings(data), rounds=rounds, max_epochs=max_epochs, max_seconds=max_seconds, dp_noise=dp_noise,
                   dp_clip=dp_clip, log=lambda m: click.echo(m, err=True))
    doc = ev.run(tuple(folds) or None)
    text = json.dumps(doc, indent=2)
    if out_path:
        Path(out_path).write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":  # pragma: no cover
    main()
