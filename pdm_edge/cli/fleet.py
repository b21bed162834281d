"""``pdm-edge fleet ...``: fleet learning through Flower (:mod:`pdm_edge.fleet`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from pdm_edge._util.fs import atomic_write
from pdm_edge.cli._common import Ctx, handle_errors
from pdm_edge.errors import ConfigError, PdmEdgeError


@click.group("fleet")
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
@click.option("--proximal-mu", type=float, default=0.0, show_default=True,
              help="FedProx: weight of the proximal term in the clients' training (0: FedAvg).")
@click.option("--dp-noise", type=float, default=0.0, show_default=True,
              help="Noise multiplier of central DP with client-side clipping (0: off).")
@click.option("--dp-clip", type=float, default=1.0, show_default=True, help="L2 clipping norm of a client's update.")
@click.option("--dp-delta", type=float, default=1e-3, show_default=True, help="Delta at which epsilon is reported.")
@click.option("--secagg", is_flag=True,
              help="Secure aggregation (Flower's SecAgg+): the server sees only the sum of a class's updates; "
                   "needs --min-clients >= 3, not with --dp-noise.")
@click.option("--secagg-threshold", type=float, default=0.67, show_default=True,
              help="SecAgg+: fraction of an appliance's key shares needed to unmask the sum when it drops out.")
@click.option("--insecure", is_flag=True, help="No TLS (loopback tests only).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--supernode-auth", is_flag=True,
              help="Admit only registered appliances (Flower's SuperNode authentication; needs TLS).")
@click.option("--register-node", "node_keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An appliance's public key (pdm-edge fleet keygen) to admit; repeat for each appliance.")
@handle_errors
def fleet_server(out_dir: str, address: str, num_rounds: int, min_clients: int, round_timeout_s: float, every_s: float,
                 machine_class: str, signing_key: str | None, proximal_mu: float, dp_noise: float, dp_clip: float,
                 dp_delta: float, secagg: bool, secagg_threshold: float, insecure: bool,
                 ssl_certfile: str | None, ssl_keyfile: str | None, ssl_ca_certfile: str | None, supernode_auth: bool,
                 node_keys: tuple[str, ...]) -> None:
    """Run the fleet server: a Flower SuperLink, and the fleet app submitted to it (now and
    then every --every seconds). Prints one JSON line per finished round."""
    from pdm_edge.fleet.runner import FleetServer

    ssl = (ssl_certfile, ssl_keyfile, ssl_ca_certfile) if ssl_certfile and ssl_keyfile and ssl_ca_certfile else None
    if node_keys and not supernode_auth:
        raise click.UsageError("--register-node needs --supernode-auth")
    with FleetServer(out_dir, address, insecure=insecure, ssl=ssl, supernode_auth=supernode_auth) as srv:  # type: ignore[arg-type]
        click.echo(f"Flower SuperLink on {address}; fleet state in {srv.out_dir}", err=True)
        for key in node_keys:
            srv.register_node(key)
            click.echo(f"admitted the appliance with public key {key}", err=True)
        while True:
            for r in srv.submit(num_rounds=num_rounds, min_clients=min_clients, round_timeout_s=round_timeout_s,
                                machine_class=machine_class, signing_key=signing_key, proximal_mu=proximal_mu, dp_noise=dp_noise, dp_clip=dp_clip,
                                dp_delta=dp_delta, secagg=secagg, secagg_threshold=secagg_threshold):
                click.echo(json.dumps(r))
            if every_s <= 0:
                break
            time.sleep(every_s)


@fleet_group.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False))
@handle_errors
def fleet_keygen(path: str) -> None:
    """Write this appliance's SuperNode key pair: PATH (EC P-384 private key, OpenSSH format,
    mode 0600; set [fleet] auth_private_key to it) and PATH.pub (give it to the fleet server's
    operator: pdm-edge fleet server --supernode-auth --register-node PATH.pub)."""
    from pdm_edge.fleet.runner import generate_node_key

    priv, pub = generate_node_key(path)
    click.echo(f"private key {priv} (keep it on this appliance), public key {pub} (register it with the fleet server)")


@fleet_group.command("join")
@click.option("--port", type=int, default=9094, show_default=True, help="Local port of the SuperNode's runtime API.")
@click.option("--print", "print_only", is_flag=True, help="Print the flower-supernode command instead of running it.")
@click.pass_obj
@handle_errors
def fleet_join(obj: Ctx, port: int, print_only: bool) -> None:
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
@handle_errors
def fleet_import(obj: Ctx, path: str) -> None:
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
@handle_errors
def fleet_export(obj: Ctx, stream: str, out: str, key_path: str | None) -> None:
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
@handle_errors
def fleet_status(obj: Ctx) -> None:
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
@handle_errors
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
        atomic_write(out_path, text + "\n")
    click.echo(text)
