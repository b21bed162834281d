"""Regenerate the committed sample recording ``sample_data/sim_outer_race.npz``.

Usage::

    python -m sample_data.make_sample [--out PATH] [--duration-s SECONDS]

The recording is a synthetic drive-end accelerometer signal made deterministically by
:class:`sensors.simulator.VibrationSimulator` (seed 0): 60 s at 25.6 kHz of an SKF 6205 deep
groove ball bearing (CWRU geometry) on a shaft turning at 25 Hz (1500 rpm). It is healthy for
the first 30 s; an outer-race defect appears at 30 s and its impact amplitude grows linearly
over 25 s to 1.0 g, after which it stays there (impacts at BPFO = 89.62 Hz, ringing a 3 kHz
structural resonance). Shaft harmonics (0.05 / 0.02 / 0.01 g at 1x / 2x / 3x) and 0.02 g RMS
measurement noise are present throughout.

File layout (``np.savez_compressed``; field by field in ``sample_data/README.md``):
``samples`` (``int16``, shape ``(n,)``), ``scale`` (``float64``, g per count),
``sample_rate_hz`` (``float64``), ``unit`` (``"g"``), ``kind`` (``"vibration"``) and
``metadata_json`` (UTF-8 JSON text). ``scale`` is chosen so that the largest absolute sample
maps to 80 % of int16 full scale (about 2 dB of headroom); the quantisation step (about
4e-5 g) is far below the noise floor.

The samples are reproducible bit for bit on a given NumPy / SciPy build; the ``.npz`` bytes are
not (the zip members carry the time of writing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pdm_edge.bearing import SKF_6205
from sample_data.loaders import DEFAULT_SAMPLE_PATH, SAMPLE_FORMAT_VERSION
from sensors.simulator import FaultSpec, VibrationSimulator

__all__ = ["DURATION_S", "MAX_BYTES", "build_simulator", "main", "make_sample"]

SAMPLE_RATE_HZ = 25600.0
DURATION_S = 60.0
SHAFT_HZ = 25.0
SEED = 0
FAULT = FaultSpec(kind="outer", onset_s=30.0, severity=1.0, growth_s=25.0, slip=0.01)
HEADROOM = 0.8
"""Fraction of int16 full scale that the largest absolute sample is mapped to."""
MAX_BYTES = 5 * 1024 * 1024
"""Size limit of the committed file (5 MiB)."""
CHUNK_S = 1.0


def build_simulator() -> VibrationSimulator:
    """The simulator (with its fixed parameters and seed) that makes the sample recording."""
    return VibrationSimulator(
        sample_rate_hz=SAMPLE_RATE_HZ,
        shaft_hz=SHAFT_HZ,
        bearing=SKF_6205,
        resonance_hz=3000.0,
        damping_ratio=0.05,
        harmonics=(0.05, 0.02, 0.01),
        noise_g=0.02,
        resonance_noise_g=0.01,
        fault=FAULT,
        seed=SEED,
        unit="g",
    )


def make_sample(out: str | Path = DEFAULT_SAMPLE_PATH, duration_s: float = DURATION_S) -> Path:
    """Generate the sample recording and write it to ``out`` (an ``.npz`` file).

    Args:
        out: destination path; parent folders are created.
        duration_s: length in seconds (60 s for the committed file).

    Returns:
        The path written.

    Raises:
        ValueError: if ``duration_s`` is not positive.
        RuntimeError: if the written file exceeds :data:`MAX_BYTES` (regenerate with a shorter
            ``duration_s``).
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    sim = build_simulator()
    n_total = int(round(duration_s * SAMPLE_RATE_HZ))
    chunk = int(CHUNK_S * SAMPLE_RATE_HZ)
    parts = [sim.generate(min(chunk, n_total - k)) for k in range(0, n_total, chunk)]
    x = np.concatenate(parts).astype(np.float64)
    peak = float(np.max(np.abs(x)))
    scale = peak / (HEADROOM * 32767.0)
    counts = np.round(x / scale).astype(np.int16)

    freqs = sim.defect_frequencies
    metadata = {
        "format_version": SAMPLE_FORMAT_VERSION,
        "description": (
            "Synthetic drive-end accelerometer, SKF 6205 at 25 Hz: healthy, then an outer-race "
            "defect from onset_s whose impact amplitude grows linearly over growth_s."
        ),
        "generator": "sensors.simulator.VibrationSimulator",
        "generator_params": sim.params(),
        "seed": SEED,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "duration_s": n_total / SAMPLE_RATE_HZ,
        "n_samples": n_total,
        "shaft_hz": SHAFT_HZ,
        "rpm": SHAFT_HZ * 60.0,
        "bearing": SKF_6205.as_dict(),
        "defect_frequencies_hz": freqs.as_dict(),
        "bpfo_hz": freqs.bpfo_hz,
        "fault": {"kind": FAULT.kind, "onset_s": FAULT.onset_s, "growth_s": FAULT.growth_s,
                  "severity_g": FAULT.severity, "slip": FAULT.slip},
        "fault_type": "bearing_outer_race",
        "onset_s": FAULT.onset_s,
        "full_severity_s": FAULT.onset_s + FAULT.growth_s,
        "peak_g": peak,
        "quantisation": {"dtype": "int16", "headroom": HEADROOM},
    }
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("wb") as fh:  # a file object keeps numpy from appending ".npz"
        np.savez_compressed(
            fh,
            samples=counts,
            scale=np.float64(scale),
            sample_rate_hz=np.float64(SAMPLE_RATE_HZ),
            unit=np.str_("g"),
            kind=np.str_("vibration"),
            metadata_json=np.str_(json.dumps(metadata, sort_keys=True)),
        )
    size = out_path.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(
            f"{out_path} is {size} bytes, over the {MAX_BYTES}-byte limit; use a shorter duration_s"
        )
    return out_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m sample_data.make_sample", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_SAMPLE_PATH, help="output .npz (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=DURATION_S, help="length in s (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = make_sample(args.out, args.duration_s)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
