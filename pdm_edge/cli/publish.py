"""``pdm-edge simulate`` and ``pdm-edge replay``: publish a synthetic signal or a recording over MQTT
(the contract of :mod:`pdm_edge.ingest.chunk`, through :mod:`sensors.publisher`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from pdm_edge.cli._common import Ctx, broker_options, default_site, handle_errors, parse_speed, stream_options


@click.command()
@broker_options
@stream_options(default_sensor=None)
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
@handle_errors
def simulate(obj: Ctx, broker: str | None, protocol: str | None, site: str | None, machine: str | None, sensor: str | None,
             kind: str, fault: str, onset_s: float, growth_s: float, severity: float, sample_rate_hz: float | None,
             shaft_hz: float, duration_s: float, speed: str, chunk_s: float, encoding: str, seed: int) -> None:
    """Publish a synthetic vibration or acoustic signal of a rotating machine."""
    from sensors.publisher import ChunkPublisher, publish_timed
    from sensors.simulator import AcousticFaultSpec, AcousticSimulator, FaultSpec, VibrationSimulator

    mcfg = obj.mqtt(broker, protocol)
    site = site or default_site(obj)
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
        n = publish_timed(pub, chunks(), speed=parse_speed(speed))
    except KeyboardInterrupt:
        n = pub.published
    finally:
        pub.close()
    click.echo(f"published {n} chunks ({n * step / fs:.1f} s of signal)", err=True)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@broker_options
@stream_options(default_sensor=None)
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
@handle_errors
def replay(obj: Ctx, path: str, broker: str | None, protocol: str | None, site: str | None, machine: str | None,
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
    site = site or default_site(obj)
    machine = machine or _topic_name(Path(path).stem if Path(path).is_file() else Path(path).name)
    sensor = sensor or ("mic" if rec.kind == "acoustic" else "accel")
    pace = parse_speed(speed)
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
