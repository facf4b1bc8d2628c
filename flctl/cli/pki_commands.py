"""`flctl pki`: the project's certificates (flctl.deploy.certificates)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from flctl.cli import render
from flctl.cli.auditing import audit_note, audited
from flctl.cli.common import (
    AcceptNewOpt,
    ForksOpt,
    JsonOpt,
    WorkspaceOpt,
    deploy_hosts,
    holding,
    host_failures,
)
from flctl.deploy.certificates import CertificateStore
from flctl.errors import ConfigError
from flctl.workspace import load_workspace

pki_app = typer.Typer(help="The project's certificates: list them, rotate them all, revoke "
                             "a host's.", no_args_is_help=True)


def _certificate_rows(store: CertificateStore) -> list[dict[str, Any]]:
    rows = []
    for entry in store.certificates():
        try:
            expires = datetime.datetime.fromisoformat(entry["not_after"])
            days = (expires - datetime.datetime.now(datetime.timezone.utc)).days
        except (KeyError, TypeError, ValueError):
            days = None
        rows.append({**entry, "days_left": days})
    return rows


@pki_app.command("status")
def pki_status(workspace_dir: Path = WorkspaceOpt, json_output: bool = JsonOpt) -> None:
    """Every certificate the project CA issued: role, days left, revoked or not."""
    workspace = load_workspace(workspace_dir)
    store = CertificateStore(workspace.paths)
    rows = _certificate_rows(store)
    reason = store.coordinator_reason()
    if json_output:
        render.emit_json({"certificates": rows, "coordinator_renewal_due": reason})
        return
    render.out.print(render.certificates_table(rows))
    if reason is not None:
        render.out.print(f"[yellow]the coordinator's certificate will be renewed by the next "
                         f"`flctl deploy`:[/] {escape(reason)}")


@pki_app.command("rotate")
@audited("pki rotate")
def pki_rotate(
    workspace_dir: Path = WorkspaceOpt,
    forks: int = ForksOpt,
    accept_new: bool = AcceptNewOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Reissue every leaf certificate, with new keys, in one deploy.

    A new coordinator key and certificate, and new keys and certificates made
    on every host. The old ones are revoked at once: a host this deploy misses
    stays refused until it is deployed again.
    """
    workspace = load_workspace(workspace_dir)
    with holding(workspace, "pki rotate"):
        store = CertificateStore(workspace.paths)
        store.request_rotation()
        store.renew_coordinator(revoke_old=True)
        results = deploy_hosts(workspace, None, False, forks, json_output, accept_new)
    if json_output:
        render.emit_json({"rotated": True, "hosts": [r.as_dict() for r in results]})
    else:
        render.out.print(render.recap_table(results, "pki rotate"))
    host_failures(results, "pki rotate")


@pki_app.command("revoke")
@audited("pki revoke")
def pki_revoke(
    host: str = typer.Argument(..., help="The host whose certificate is revoked."),
    workspace_dir: Path = WorkspaceOpt,
    forks: int = ForksOpt,
    accept_new: bool = AcceptNewOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Revoke HOST's certificate: the coordinator and every agent refuse it.

    The coordinator refuses it at once; the revocation list goes to every
    other host now. HOST gets a new key and certificate at its next deploy:
    remove it from inventory.yaml to keep it out.
    """
    workspace = load_workspace(workspace_dir)
    with holding(workspace, "pki revoke"):
        store = CertificateStore(workspace.paths)
        serials = store.revoke_name(host, "revoked by the operator")
        audit_note(revoked_serials=[format(s, "x") for s in serials])
        if not serials:
            raise ConfigError(f"no current certificate of {host!r} in "
                              f"{workspace.paths.issued}: nothing to revoke "
                              f"(see `flctl pki status`)")
        others = [h for h in workspace.inventory.hosts if h.name != host]
        results = deploy_hosts(workspace, [h.name for h in others], False, forks, json_output,
                          accept_new) if others else []
    document = {"host": host, "revoked_serials": [format(s, "x") for s in serials],
                "hosts": [r.as_dict() for r in results]}
    if json_output:
        render.emit_json(document)
    else:
        render.out.print(f"[green]revoked[/] {escape(host)}: serial "
                         f"{', '.join(document['revoked_serials'])}")
        if results:
            render.out.print(render.recap_table(results, "revocation list pushed"))
        if host in workspace.inventory.names:
            render.out.print(f"{escape(host)} is still in the inventory: its next deploy gives "
                             "it a new key and certificate; remove it to keep it out")
    host_failures(results, "pki revoke")
