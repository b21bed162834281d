"""``pdm-edge models ...``: the model registry (:mod:`pdm_edge.registry`) and on-demand training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pdm_edge._util.text import fmt_ns
from pdm_edge.cli._common import Ctx, handle_errors
from pdm_edge.errors import ConfigError


@click.group("models")
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
    obj = ctx.find_object(Ctx)
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


def _open_registry(obj: Ctx, registry_dir: str | None, *, create: bool = False) -> Any:
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
    return (f"{v.id:<24} {v.stream:<28} {v.status:<9} {fmt_ns(v.created_ns)}  parent {v.parent or '-':<20} "
            f"{v.trigger:<19} {v.size_bytes / 1024:6.1f} KiB{reason}")


@models_group.command("list")
@_registry_option
@click.option("--site", default=None, help="Only this site.")
@click.option("--machine", default=None, help="Only this machine.")
@click.option("--sensor", default=None, help="Only this sensor.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@click.pass_obj
@handle_errors
def models_list(obj: Ctx, registry_dir: str | None, site: str | None, machine: str | None, sensor: str | None,
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
@handle_errors
def models_show(obj: Ctx, version_id: str, registry_dir: str | None) -> None:
    """Print one version as JSON (metrics, training summary, hashes, status and reason)."""
    with _open_registry(obj, registry_dir) as reg:
        click.echo(json.dumps(reg.get(version_id).to_dict(), indent=2))


@models_group.command("promote")
@click.argument("version_id")
@_registry_option
@click.option("--reason", default="promoted from the command line", show_default=True)
@click.option("--force", is_flag=True, help="Promote even a version the gate rejected.")
@click.pass_obj
@handle_errors
def models_promote(obj: Ctx, version_id: str, registry_dir: str | None, reason: str, force: bool) -> None:
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
@handle_errors
def models_rollback(obj: Ctx, registry_dir: str | None, site: str, machine: str, sensor: str) -> None:
    """Re-activate the stream's previous active version (the current one is retired)."""
    with _open_registry(obj, registry_dir) as reg:
        v = reg.rollback(site, machine, sensor)
    click.echo(f"active: {_version_line(v)}")


@models_group.command("train")
@click.argument("stream")
@click.option("--now", is_flag=True, help="Train here and now (when no service runs) instead of queueing the job for `pdm-edge run`.")
@click.option("--state-dir", default=None, help="The appliance's state directory [default: [feedback] state_dir].")
@handle_errors
@click.pass_context
def models_train(ctx: click.Context, stream: str, now: bool, state_dir: str | None) -> None:
    """Train a new adapter for STREAM ("site/machine/sensor") on its replay buffer and labels.

    By default the job is queued; the running appliance picks it up within seconds, trains at
    low priority, gates the candidate and promotes or rejects it (see `pdm-edge models list`).
    With --now the job runs in this process (stop the service first: one trainer per state
    directory) and the outcome is printed."""
    from pdm_edge.learning import request_training

    obj: Ctx = ctx.obj
    cfg = obj.config_or_defaults()
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
@handle_errors
def models_export(obj: Ctx, version_id: str, path: str, registry_dir: str | None, key_path: str | None) -> None:
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
@handle_errors
def models_import(obj: Ctx, path: str, registry_dir: str | None, trusted: tuple[str, ...], require_signature: bool,
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
@handle_errors
def models_keygen(directory: str, name: str) -> None:
    """Write a new Ed25519 key pair (NAME.pem, private, mode 0600; NAME.pub.pem) in DIRECTORY."""
    from pdm_edge.registry import generate_keypair

    priv, pub = generate_keypair(directory, name)
    click.echo(f"private key {priv} (keep it off the appliance), public key {pub}")
