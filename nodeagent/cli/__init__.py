"""The ``nodeagent`` command line: one module per group of commands, gathered here.

Subcommands import their modules lazily so that short-lived commands (``workload``, ``testbed
exec``) start fast.
"""

from __future__ import annotations

import click

from nodeagent.cli import agent, ca, cni, debug, doctor, gateway, testbed


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodeagent")
def cli() -> None:
    """nodeagent: a sidecar-free service mesh data plane, one agent and one Envoy per node."""


for _command in (
    agent.run,
    agent.envoy,
    ca.ca,
    cni.install_cni,
    cni.uninstall_node,
    debug.pods,
    debug.proxy_status,
    debug.proxy_config,
    debug.analyze,
    doctor.doctor,
    gateway.gateway,
    testbed.testbed,
    testbed.workload,
):
    cli.add_command(_command)


def main() -> int:
    cli()
    return 0
