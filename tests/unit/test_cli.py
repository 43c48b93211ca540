"""The command line, as a user without root meets it."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeagent.cli import cli

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for sub in ("testbed", "workload"):
        assert sub in result.output
    tb = CliRunner().invoke(cli, ["testbed", "--help"])
    for sub in ("up", "down", "status", "exec"):
        assert sub in tb.output


def test_bad_topology_is_reported_before_anything_is_created(tmp_path: Path) -> None:
    topo = tmp_path / "cluster.yaml"
    topo.write_text("name: t\nnodes: [{name: a}]\npods: [{name: p, node: a, image: nginx}]\n")
    result = CliRunner().invoke(cli, ["testbed", "up", str(topo)])
    assert result.exit_code == 1
    assert f"{topo}: pods[0].image: unknown field" in result.output


def test_missing_topology_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["testbed", "up", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read topology" in result.output


def test_invalid_name_override() -> None:
    result = CliRunner().invoke(cli, ["testbed", "up", "workshop", "--name", "Bad.Name"])
    assert result.exit_code == 1
    assert "--name: 'Bad.Name' is not a valid testbed name" in result.output


def test_testbed_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, ["testbed", "up", "workshop"])
    assert result.exit_code == 1
    assert "run it as root" in result.output


# nodeagent run: where workload certificates come from


def _run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--node", "n1", "--source-dir", str(tmp_path), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--ca-address", "ca:15012", "--ca-dir", "/cacerts"],
            "--ca-address and --ca-dir are exclusive",
        ),
        (
            ["--ca-address", "ca:15012", "--ca-token-file", "/t"],
            "--ca-address needs --ca-root-file",
        ),
        (
            ["--ca-address", "ca:15012", "--ca-root-file", "/r"],
            "--ca-address needs --ca-token-file",
        ),
        (["--ca-address", "ca", "--ca-root-file", "/r", "--ca-token-file", "/t"], "HOST:PORT"),
        (["--ca-root-file", "/r"], "--ca-root-file is for the CA service: add --ca-address"),
        (["--ca-token-file", "/t"], "--ca-token-file is for the CA service: add --ca-address"),
    ],
)
def test_ca_service_flags_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, _run_args(tmp_path, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_ca_service_flags_reach_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent import agent
    from nodeagent.caservice.config import DEFAULT_NAMESPACE, default_server_names
    from nodeagent.cli.options import DEFAULT_CA_SERVER_NAME
    from nodeagent.identity.remote import DEFAULT_SERVER_NAME

    seen: list[agent.AgentConfig] = []

    async def fake_run(config: agent.AgentConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(agent, "run", fake_run)
    args = ["--ca-address", "10.0.0.5:15012", "--ca-root-file", "/r", "--ca-token-file", "/t"]
    result = CliRunner().invoke(cli, _run_args(tmp_path, *args, "--cert-ttl", "120"))
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.ca_address, config.ca_root_file, config.ca_token_file) == (
        "10.0.0.5:15012",
        Path("/r"),
        Path("/t"),
    )
    assert config.cert_ttl == 120.0 and config.ca_dir is None
    # The CA's own default TLS name, by default.
    assert config.ca_server_name == DEFAULT_CA_SERVER_NAME == DEFAULT_SERVER_NAME
    assert DEFAULT_CA_SERVER_NAME in default_server_names(DEFAULT_NAMESPACE)


def test_proxy_status_says_when_the_ca_cannot_issue(tmp_path: Path) -> None:
    import socket
    import threading

    from nodeagent.cni import wire

    answer = {
        "ok": True,
        "proxy": {
            "node": "n1",
            "envoy_pid": 42,
            "envoy_restarts": 0,
            "version": "3",
            "types": {},
        },
        "pods": [],
        "not_enforced": [],
        "identity": {
            "issuer": "the CA service at 10.0.0.5:15012",
            "problem": "the CA service at 10.0.0.5:15012 failed for 1 identities",
            "identities": {
                "spiffe://cluster.local/ns/shop/sa/cart": {
                    "not_after": "2026-12-06T13:00:00+00:00",
                    "error": "unavailable: UNAVAILABLE: failed to connect",
                    "failures": 3,
                },
                "spiffe://cluster.local/ns/shop/sa/web": {
                    "not_after": "2026-12-06T13:00:00+00:00",
                    "error": "",
                    "failures": 0,
                },
            },
        },
    }
    path = str(tmp_path / "cni.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(wire.encode(answer))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(cli, ["proxy-status", "--cni-socket", path])
    finally:
        thread.join(10)
        server.close()
    assert result.exit_code == 0, result.output
    assert (
        "certificate for spiffe://cluster.local/ns/shop/sa/cart not issued by the CA service at"
        " 10.0.0.5:15012 (current one expires 2026-12-06T13:00:00+00:00): unavailable:"
        " UNAVAILABLE: failed to connect" in result.output
    )
    assert "sa/web" not in result.output  # healthy identities are not listed
