"""Issue 15 rows 1 and 2: the configuration's trust is enforced on import, every ``models``
command uses the registry of ``--config``, and manifest fields (version id, created_ns) are
validated before anything is stored. Real packages (zip files), real registries on disk, the
real CLI (in-process through click's runner)."""

from __future__ import annotations

import hashlib
import json
import types
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pdm_edge.cli import main
from pdm_edge.errors import RegistryError
from pdm_edge.model.encoder import Encoder, EncoderConfig
from pdm_edge.registry import Registry, generate_keypair, load_private_key
from sensors.simulator import FaultSpec, VibrationSimulator
from tests.test_registry import ENCODER_SHA, SEED, STREAM, _add, _rewrite, _scorer, _windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models() -> types.SimpleNamespace:
    """Two small trained versions (2 adapter epochs): v1 on 40 normal windows, and one trained
    on normal windows with fault windows among them (as if a fault had been labelled normal),
    plus held-back normal windows and the labelled fault windows."""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig())
    sim = VibrationSimulator(sample_rate_hz=12_000.0, seed=SEED)
    calib, held = _windows(sim, 40), _windows(sim, 60, first_index=40)
    fault = _windows(VibrationSimulator(sample_rate_hz=12_000.0, seed=SEED, fault=FaultSpec(kind="outer", severity=0.5)), 20)
    mixed = [w for pair in zip(calib, fault + fault) for w in pair]
    return types.SimpleNamespace(enc=enc, v1=_scorer(enc, calib), poisoned=_scorer(enc, mixed, seed=2), held=held,
                                 labelled=fault[:8])


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, models: types.SimpleNamespace) -> types.SimpleNamespace:
    """One trained version exported as: signed, unsigned, signed-then-tampered (version file
    altered and re-hashed, old signature), signed by a foreign key, and with hostile manifests."""
    d = tmp_path_factory.mktemp("pkgs")
    scorer = models.v1
    priv, pub = generate_keypair(d / "keys")
    fpriv, fpub = generate_keypair(d / "keys", name="foreign")
    with Registry(d / "src") as src:
        v = _add(src, scorer)
        signed = src.export(v.id, d / "signed.zip", signing_key=load_private_key(priv))
        unsigned = src.export(v.id, d / "unsigned.zip")
        foreign = src.export(v.id, d / "foreign.zip", signing_key=load_private_key(fpriv))
    with zipfile.ZipFile(signed) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        data = bytearray(zf.read("version.pt"))
    data[len(data) // 2] ^= 0x01
    m2 = dict(manifest, files={"version.pt": {"sha256": hashlib.sha256(bytes(data)).hexdigest(), "size_bytes": len(data)}})
    tampered = d / "tampered.zip"
    _rewrite(signed, tampered, {"version.pt": bytes(data), "manifest.json": json.dumps(m2).encode()})

    def hostile(name: str, **fields: object) -> Path:
        out = d / f"{name}.zip"
        _rewrite(unsigned, out, {"manifest.json": json.dumps(dict(manifest, **fields)).encode()})
        return out

    return types.SimpleNamespace(
        dir=d, pub=pub, fpub=fpub, version=v, signed=signed, unsigned=unsigned, foreign=foreign, tampered=tampered,
        dotdot=hostile("dotdot", id=".."), slash=hostile("slash", id="a/../../b"),
        overflow=hostile("overflow", created_ns=10 ** 30), trigger=hostile("trigger", trigger="<img src=x onerror=alert(1)>"))


def _config(tmp: Path, verify_key: str) -> Path:
    cfg = tmp / "pdm-edge.toml"
    cfg.write_text(f'[mqtt]\nbroker = "127.0.0.1:1883"\n[registry]\ndir = "{tmp / "configured-registry"}"\n'
                   f"verify_key = {json.dumps(verify_key)}\n")
    return cfg


def _import(cfg: Path, pkg: Path) -> object:
    return CliRunner().invoke(main, ["--config", str(cfg), "models", "import", str(pkg), "--encoder-sha256", ENCODER_SHA])


def test_configured_verify_key_refuses_unsigned_tampered_and_foreign_packages(pkgs, tmp_path: Path, monkeypatch) -> None:
    """Row 1: with [registry] verify_key set, `pdm-edge --config CFG models import` used to
    accept an unsigned package and a signed one whose version file was altered, and wrote them to
    ./var/registry. Now each is refused with its reason, and the signed one lands in the
    configured registry."""
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, str(pkgs.pub))
    for pkg, why in ((pkgs.unsigned, "not signed"), (pkgs.tampered, "signature does not verify"),
                     (pkgs.foreign, "signature does not verify")):
        res = _import(cfg, pkg)
        assert res.exit_code == 1 and why in res.output, res.output
        assert "Traceback" not in res.output
    res = _import(cfg, pkgs.signed)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "var").exists()
    with Registry(tmp_path / "configured-registry", create=False) as reg:
        assert [v.id for v in reg.list()] == [pkgs.version.id]
        assert "signed by" in reg.list()[0].origin
    # every models command reads the same registry from --config
    res = CliRunner().invoke(main, ["--config", str(cfg), "models", "list"])
    assert res.exit_code == 0 and pkgs.version.id in res.output and "configured-registry" in res.output


def test_verify_key_as_pem_text_and_a_list(pkgs, tmp_path: Path) -> None:
    pem = Path(pkgs.pub).read_text()
    cfg = tmp_path / "pdm-edge.toml"
    cfg.write_text(f'[mqtt]\nbroker = "127.0.0.1:1883"\n[registry]\ndir = "{tmp_path / "r"}"\n'
                   f"verify_key = [{json.dumps(str(pkgs.fpub))}, {json.dumps(pem)}]\n")
    assert _import(cfg, pkgs.unsigned).exit_code == 1
    assert _import(cfg, pkgs.foreign).exit_code == 0  # the foreign key is trusted here
    with Registry(tmp_path / "r2", trusted_public_keys=[pkgs.pub]) as reg:  # the library enforces it too
        with pytest.raises(RegistryError, match="not signed"):
            reg.import_package(pkgs.unsigned, encoder_sha256=ENCODER_SHA)


@pytest.mark.parametrize("name, why", [("dotdot", "version id"), ("slash", "version id"),
                                       ("overflow", "created_ns"), ("trigger", "trigger")])
def test_hostile_manifest_fields_are_refused_with_a_reason(pkgs, tmp_path: Path, name: str, why: str) -> None:
    """Row 2: a manifest id of `..` (or with path separators) used to be imported, and a
    created_ns beyond int64 ended in a traceback. Now the import is refused with one clear line
    and nothing is stored."""
    res = CliRunner().invoke(main, ["models", "import", str(getattr(pkgs, name)), "--encoder-sha256", ENCODER_SHA,
                                    "--registry", str(tmp_path / "reg")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and why in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    with Registry(tmp_path / "reg", create=False) as reg:
        assert reg.list() == []
    assert list((tmp_path / "reg" / "versions").iterdir()) == []


def test_version_ids_are_validated_everywhere(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        for bad in ("..", "../x", "a/b", "x" * 161, ""):
            with pytest.raises(RegistryError, match="version id"):
                reg.path(bad)


# -- row 16: the gate's label rule ----------------------------------------------------------------

def test_normal_labels_over_a_live_fault_need_an_engineers_confirmation(tmp_path: Path, models) -> None:
    """Row 16: five `normal` labels over a live fault made a retrain that stopped detecting it,
    and it was promoted. Now the gate's label rule keeps such a candidate waiting for an
    engineer, and says why; without the labels over the fault, the same retrain is promoted."""
    from pdm_edge.registry import GateInputs

    fault_as_normal = models.poisoned  # trained with fault windows labelled normal
    labelled = models.labelled  # the windows those labels covered (the active version alarms on them)
    with Registry(tmp_path / "reg") as reg:
        active = reg.add_candidate(models.v1, **STREAM, trigger="initial")
        reg.promote(active.id, "initial")
        inputs = GateInputs(normal_windows=models.v1.features(models.held), margin=1.0, labelled_normal_windows=models.v1.features(labelled),
                            confirm_far_above=3.0, confirm_silenced_alerts=True)
        rec, metrics, reason = reg.submit(fault_as_normal, **STREAM, gate_inputs=inputs, trigger="labels")
        assert rec.status == "candidate" and reg.active(**STREAM).id == active.id
        assert reason.startswith("needs engineer confirmation") and "labelled normal" in reason, reason
        assert metrics["label_rule"]["labelled_normal"] == len(labelled)
        # an engineer who checked the machine may still promote it
        assert reg.promote(rec.id, "confirmed by engineer after inspection").status == "active"
        # the rule is about labels: a retrain without labelled windows is judged by the gate alone
        rec2, _, reason2 = reg.submit(models.v1, **STREAM, gate_inputs=GateInputs(normal_windows=models.v1.features(models.held), margin=1.0,
                                                                              confirm_far_above=3.0,
                                                                              confirm_silenced_alerts=True))
        assert rec2.status == "active" and reason2.startswith("gate passed"), reason2
