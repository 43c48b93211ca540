"""Options and output helpers that more than one group of commands shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from nodeagent.cni.wire import DEFAULT_SOCKET


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
