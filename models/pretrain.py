"""Pretrain pdm-edge's frozen encoder, self-supervised, and write ``models/encoder.pt``.

One command, deterministic for a given seed and machine, under an hour on a 2-core CPU::

    .venv/bin/python models/pretrain.py                 # default corpus and schedule
    .venv/bin/python models/pretrain.py --quick         # a few minutes, for a smoke test

Objective: masked-patch reconstruction (SimMIM, Xie et al. 2022; masking as MAE/AudioMAE, He
et al. 2022, Huang et al. 2022): 60 % of the 64 patch tokens of each standardised feature image
are replaced by a mask token and the encoder + a 1-block decoder reconstruct them (MSE on the
masked patches).

Corpus (written to the model card ``models/README.md`` and to ``models/encoder.json``):

- Simulated vibration (``sensors.simulator.VibrationSimulator``): many machines with random
  shaft speed (10-60 Hz), structural resonance (1.5 kHz to 0.4 fs), damping, shaft harmonics,
  noise level, sample rate (12, 25.6, 48 kHz) and window length (0.1-1 s); 60 % of them develop
  an outer-race, inner-race or ball fault of random severity half-way through.
- Simulated acoustic (``sensors.simulator.AcousticSimulator``): random rotation speed, blade
  count, tonal levels and noise; half with cavitation-like bursts or a rising tone.
- Real recordings that are **not evaluation clips** (read from ``--datasets``, default
  ``../shared/datasets``): DCASE 2023 Task 2 ToyTrain, bearing, fan and gearbox clips (valve is
  the evaluation machine and is excluded), and the MIMII fan and pump clips (each of the 8
  microphones as its own stream). CWRU and FEMTO are evaluation data and are never used.

Each machine (simulated) or machine type (real) is standardised with its own normal windows
(:class:`pdm_edge.model.standardize.Standardizer`), as the appliance does per machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pdm_edge import features  # noqa: E402
from pdm_edge.model.encoder import Encoder, EncoderConfig, kind_index, random_mask  # noqa: E402
from pdm_edge.model.standardize import Standardizer  # noqa: E402
from pdm_edge._util.fs import atomic_write  # noqa: E402
from sensors.simulator import AcousticFaultSpec, AcousticSimulator, FaultSpec, VibrationSimulator  # noqa: E402

MODELS = Path(__file__).resolve().parent
EVALUATION_EXCLUDED = ("valve",)  # DCASE machine types used by `pdm-edge eval`


def _windows(x: np.ndarray, n: int) -> np.ndarray:
    k = x.size // n
    return x[: k * n].reshape(k, n)


def simulated_vibration(rng: np.random.Generator, n_machines: int, windows_per_machine: int) -> list[dict]:
    """One entry per simulated machine: standardised features ``(W, 2, 64, 32)`` and labels."""
    out = []
    for i in range(n_machines):
        fs = float(rng.choice([12000.0, 25600.0, 48000.0]))
        window_s = float(rng.choice([0.1, 0.25, 0.5, 1.0]))
        n = round(window_s * fs)
        dur = windows_per_machine * window_s
        fault = None
        if rng.random() < 0.6:
            fault = FaultSpec(kind=str(rng.choice(["outer", "inner", "ball"])), onset_s=dur / 2,
                              severity=float(np.exp(rng.uniform(np.log(0.02), np.log(2.0)))),
                              growth_s=float(rng.uniform(0.0, dur / 2)), slip=float(rng.uniform(0.005, 0.02)))
        sim = VibrationSimulator(
            sample_rate_hz=fs, shaft_hz=float(rng.uniform(10, 60)),
            resonance_hz=float(rng.uniform(1500, 0.4 * min(fs, 25600.0))),
            damping_ratio=float(rng.uniform(0.02, 0.1)),
            harmonics=tuple(float(a) for a in rng.uniform(0.0, 0.1, 3) * np.array([1.0, 0.6, 0.3])),
            noise_g=float(np.exp(rng.uniform(np.log(0.005), np.log(0.1)))),
            fault=fault, seed=int(rng.integers(2**31)),
        )
        w = _windows(sim.generate(round(dur * fs)), n)
        x = features.encoder_input(w, fs, "vibration")
        half = w.shape[0] // 2
        std = Standardizer.fit(x[:half], one_sided=True)
        out.append({"x": std.transform(x), "kind": "vibration", "source": "sim-vibration", "id": f"simv{i}"})
    return out


def simulated_acoustic(rng: np.random.Generator, n_machines: int, windows_per_machine: int) -> list[dict]:
    out = []
    for i in range(n_machines):
        fs = 16000.0
        window_s = float(rng.choice([0.5, 1.0, 2.0]))
        n = round(window_s * fs)
        dur = windows_per_machine * window_s
        fault = None
        if rng.random() < 0.5:
            fault = AcousticFaultSpec(kind=str(rng.choice(["bursts", "tone"])), onset_s=dur / 2,
                                      severity=float(np.exp(rng.uniform(np.log(0.005), np.log(0.3)))),
                                      growth_s=float(rng.uniform(0.0, dur / 2)))
        sim = AcousticSimulator(
            sample_rate_hz=fs, rotation_hz=float(rng.uniform(10, 60)), blade_count=int(rng.integers(2, 13)),
            tonal_pa=tuple(float(a) for a in rng.uniform(0.0, 0.1, 3)),
            noise_pa=float(np.exp(rng.uniform(np.log(0.005), np.log(0.1)))),
            fault=fault, seed=int(rng.integers(2**31)),
        )
        w = _windows(sim.generate(round(dur * fs)), n)
        x = features.encoder_input(w, fs, "acoustic")
        std = Standardizer.fit(x[: w.shape[0] // 2])
        out.append({"x": std.transform(x), "kind": "acoustic", "source": "sim-acoustic", "id": f"sima{i}"})
    return out


def real_acoustic(datasets: Path) -> tuple[list[dict], list[str]]:
    """DCASE (non-valve) and MIMII clips, 1 s windows with 0.5 s hop, standardised per machine type."""
    from sample_data.loaders import load_wav

    groups: dict[str, list[tuple[np.ndarray, bool]]] = {}
    used: list[str] = []
    dcase = datasets / "dcase2023_task2"
    for path in sorted(dcase.glob("*/*/*.wav")) if dcase.is_dir() else []:
        machine = path.parts[-3]
        if machine in EVALUATION_EXCLUDED:
            continue
        groups.setdefault(f"dcase-{machine}", []).append((path, "normal" in path.name))
    mimii = datasets / "mimii"
    for path in sorted(mimii.rglob("*.wav")) if mimii.is_dir() else []:
        machine = path.name.split("_")[0]
        for ch in range(8):
            groups.setdefault(f"mimii-{machine}-ch{ch}", []).append(((path, ch), "abnormal" not in path.name))
    out = []
    for name, items in sorted(groups.items()):
        xs, normal = [], []
        for item, is_normal in items:
            path, ch = item if isinstance(item, tuple) else (item, 0)
            rec = load_wav(path, channel=ch)
            x = rec.concatenated()
            fs = rec.sample_rate_hz
            n = round(fs)
            starts = range(0, x.size - n + 1, n // 2)
            w = np.stack([x[s:s + n] for s in starts])
            xs.append(features.encoder_input(w, fs, "acoustic"))
            normal.append(np.full(len(w), is_normal))
            used.append(str(path.relative_to(datasets)) + (f"#ch{ch}" if name.startswith("mimii") else ""))
        x_all, nm = np.concatenate(xs), np.concatenate(normal)
        std = Standardizer.fit(x_all[nm] if nm.sum() >= 2 else x_all)
        out.append({"x": std.transform(x_all), "kind": "acoustic", "source": "real", "id": name})
    return out, sorted(set(used))


def train(x: np.ndarray, kinds: np.ndarray, *, epochs: int, batch: int, lr: float, mask_ratio: float,
          seed: int, log) -> tuple[Encoder, list[dict]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = max(64, len(x) // 20)
    val, tr = idx[:n_val], idx[n_val:]
    model = Encoder(EncoderConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(tr) / batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    xt, kt = torch.from_numpy(x), torch.from_numpy(kinds)
    n_tok = model.cfg.n_tokens
    val_mask = random_mask(len(val), n_tok, mask_ratio, torch.Generator().manual_seed(seed + 1))
    history = []
    for ep in range(epochs):
        model.train()
        t0 = time.time()
        perm = rng.permutation(tr)
        tot = 0.0
        for b in range(0, len(perm), batch):
            j = torch.from_numpy(perm[b:b + batch])
            mask = random_mask(len(j), n_tok, mask_ratio, gen)
            loss = model.masked_loss(xt[j], kt[j], mask).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(j)
        model.eval()
        with torch.no_grad():
            vl = float(model.masked_loss(xt[val], kt[val], val_mask).mean())
        rec = {"epoch": ep + 1, "train_loss": tot / len(tr), "val_loss": vl, "seconds": time.time() - t0}
        history.append(rec)
        log(f"epoch {ep + 1:3d}/{epochs}  train {rec['train_loss']:.4f}  val {vl:.4f}  ({rec['seconds']:.1f} s)")
    return model, history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=MODELS / "encoder.pt")
    ap.add_argument("--datasets", type=Path, default=Path(os.environ.get("PDM_EDGE_DATASETS", REPO.parent / "shared" / "datasets")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vibration-machines", type=int, default=240)
    ap.add_argument("--acoustic-machines", type=int, default=120)
    ap.add_argument("--windows-per-machine", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="tiny corpus and 2 epochs (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.vibration_machines, a.acoustic_machines, a.windows_per_machine, a.epochs = 12, 6, 16, 2
    torch.set_num_threads(a.threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    rng = np.random.default_rng(a.seed)
    log("simulating vibration machines ...")
    entries = simulated_vibration(rng, a.vibration_machines, a.windows_per_machine)
    log("simulating acoustic machines ...")
    entries += simulated_acoustic(rng, a.acoustic_machines, a.windows_per_machine)
    real_files: list[str] = []
    if a.datasets.is_dir() and not a.quick:
        log(f"reading non-evaluation recordings from {a.datasets} ...")
        real, real_files = real_acoustic(a.datasets)
        entries += real
    else:
        log(f"no real recordings used ({a.datasets} absent or --quick)")
    x = np.concatenate([e["x"] for e in entries]).astype(np.float32)
    kinds = np.concatenate([np.full(len(e["x"]), kind_index(e["kind"])) for e in entries]).astype(np.int64)
    counts = {}
    for e in entries:
        counts[e["source"]] = counts.get(e["source"], 0) + len(e["x"])
    log(f"corpus: {len(x)} windows {counts}")
    model, history = train(x, kinds, epochs=a.epochs, batch=a.batch, lr=a.lr, mask_ratio=a.mask_ratio, seed=a.seed, log=log)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write(a.out, buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    n_params = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder"))
    card = {
        "file": a.out.name,
        "sha256": digest,
        "bytes": a.out.stat().st_size,
        "config": model.cfg.to_dict(),
        "parameters": n_params,
        "encoder_parameters": n_enc,
        "objective": f"masked patch reconstruction, mask ratio {a.mask_ratio}",
        "corpus": {"windows": int(len(x)), "by_source": counts, "real_files": real_files,
                   "vibration_machines": a.vibration_machines, "acoustic_machines": a.acoustic_machines,
                   "windows_per_machine": a.windows_per_machine, "excluded": ["cwru (evaluation)", "femto_pronostia (evaluation)", "dcase2023_task2/valve (evaluation)"]},
        "training": {"epochs": a.epochs, "batch": a.batch, "lr": a.lr, "seed": a.seed, "threads": a.threads,
                     "history": history, "wall_s": round(time.time() - t_start, 1)},
        "torch": torch.__version__,
    }
    atomic_write(a.out.with_suffix(".json"), (json.dumps(card, indent=1) + "\n").encode())
    log(f"wrote {a.out} ({card['bytes']} bytes, sha256 {digest[:16]}...), {n_params} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
