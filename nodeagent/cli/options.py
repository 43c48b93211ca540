"""Options and output helpers that more than one group of commands shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from nodeagent.cni.wire import DEFAULT_SOCKET

# The CA's TLS name by default (nodeagent.caservice.config.default_server_names; kept here so
# that the CLI starts without importing gRPC).
DEFAULT_CA_SERVER_NAME = "nodeagent-ca.nodeagent-system.svc"


def _daemonset(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from nodeagent.uninstall import DaemonSetRef

    try:
        return DaemonSetRef.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


daemonset_option = click.option(
    "--daemonset",
    metavar="NAMESPACE/NAME",
    callback=_daemonset,
    default=None,
    help="The DaemonSet this runs in. On SIGTERM, if it is gone or being deleted (an uninstall),"
    " remove what was installed on the node; while it exists (an upgrade, a restart), keep it.",
)

# The agent's CNI socket, for commands that ask the running agent (or check that it is gone).
cni_socket_option = click.option(
    "--cni-socket", default=DEFAULT_SOCKET, show_default=True, envvar="NODEAGENT_CNI_SOCKET"
)

output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table"
)


def table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    click.echo("")
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# Where workload certificates come from (the agent's and a gateway's): the CA service, a plug-in
# CA's files, or (the agent only) its built-in CA.
_CA_OPTIONS = (
    click.option(
        "--ca-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Istio plug-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem);"
        " default: the agent's built-in CA kept in --state-dir (a gateway needs one of the two).",
    ),
    click.option(
        "--ca-address",
        default=None,
        metavar="HOST:PORT",
        help="The CA service (`nodeagent ca`, gRPC over TLS) that issues the workload certificates"
        " (Istio's certificate API); needs --ca-root-file and --ca-token-file.",
    ),
    click.option(
        "--ca-root-file",
        type=click.Path(path_type=Path),
        default=None,
        help="With --ca-address: PEM roots trusted for the CA and the mesh (the mounted ConfigMap"
        " nodeagent-ca-root, key root-cert.pem); re-read when it changes.",
    ),
    click.option(
        "--ca-token-file",
        type=click.Path(path_type=Path),
        default=None,
        help="With --ca-address: the projected service account token (audience istio-ca),"
        " read for every request.",
    ),
    click.option(
        "--ca-server-name",
        default=DEFAULT_CA_SERVER_NAME,
        show_default=True,
        help="With --ca-address: the name the CA's TLS certificate must have.",
    ),
    click.option(
        "--cert-ttl",
        type=float,
        default=24 * 3600.0,
        show_default=True,
        help="Workload certificate lifetime in seconds (rotated at half life).",
    ),
)


def ca_options(command: Any) -> Any:
    for option in reversed(_CA_OPTIONS):
        command = option(command)
    return command


def check_ca_options(
    ca_dir: Path | None,
    ca_address: str | None,
    ca_root_file: Path | None,
    ca_token_file: Path | None,
) -> None:
    """Where certificates come from: the CA service, a plug-in CA, or the built-in CA."""
    if ca_address is None:
        for flag, value in (("--ca-root-file", ca_root_file), ("--ca-token-file", ca_token_file)):
            if value is not None:
                raise click.UsageError(f"{flag} is for the CA service: add --ca-address")
        return
    if ca_dir is not None:
        raise click.UsageError(
            "--ca-address and --ca-dir are exclusive: certificates come from the CA service or"
            " from a local plug-in CA, not both"
        )
    host, sep, port = ca_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise click.UsageError(f"--ca-address: expected HOST:PORT, got {ca_address!r}")
    for flag, value in (("--ca-root-file", ca_root_file), ("--ca-token-file", ca_token_file)):
        if value is None:
            raise click.UsageError(f"--ca-address needs {flag}")
