"""AuthorizationPolicy through the real node Envoy (issue #17; SCENARIOS S6), one testbed.

foo/httpbin (HTTP 8000) and foo/db (TCP 9000) on n1; callers default/sleep on n1 (the
same-node fast path: no TLS, the caller's identity stamped by the node), default/sleep2 on n2
(same service account, over mTLS), dev/dev on n2, default/other on n1 (another account) and
legacy/legacy on n2, outside the mesh (plaintext; it also forges x-forwarded-client-cert).
Each group of cases applies its policies, waits for a marker DENY of its own (``/gen-<k>``,
so no decision is read off the previous group's config), then checks every (caller, request,
decision) until they all hold. Expected decisions come from Istio's documentation, cited per
group: istio.io/latest/docs/reference/config/security/authorization-policy/ (AP),
istio.io/latest/docs/reference/config/security/conditions/ (COND),
istio.io/latest/docs/concepts/security/#authorization (CONCEPT).
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    envoy_admin,
    pod,
    running_testbed,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbauthz"
HTTPBIN, DB = "http://httpbin.foo:8000", "http://db.foo:9000"
SLEEP, SLEEP2, DEV, OTHER, LEGACY = (
    "default/sleep",
    "default/sleep2",
    "dev/dev",
    "default/other",
    "legacy/legacy",
)
SLEEP_ID = "spiffe://cluster.local/ns/default/sa/sleep"
DENIED = "403"
CLOSED = "000"  # a TCP connection the network RBAC filter closed: no HTTP answer


def _topology() -> str:
    web = {"type": "fake-service", "port": 8000}
    tcp = {"type": "fake-service", "port": 9000}
    pods = [
        pod("httpbin", "n1", {"app": "httpbin"}, namespace="foo", workload=web),
        pod("db", "n1", {"app": "db"}, namespace="foo", workload=tcp),
        pod("sleep", "n1", {"app": "sleep"}),
        pod("sleep2", "n2", {"app": "sleep"}),
        pod("other", "n1", {"app": "other"}),
        pod("dev", "n2", {"app": "dev"}, namespace="dev"),
        pod("legacy", "n2", {"app": "legacy"}, namespace="legacy"),
    ]
    services = [
        {
            "name": "httpbin",
            "namespace": "foo",
            "selector": {"app": "httpbin"},
            "ports": [{"name": "http", "port": 8000, "targetPort": 8000}],
        },
        {
            "name": "db",
            "namespace": "foo",
            "selector": {"app": "db"},
            "ports": [{"name": "tcp", "port": 9000, "targetPort": 9000}],
        },
    ]
    return topology_text(NAME, pods, services, mesh=("default", "foo", "dev"), outside=("legacy",))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_authz") as bed:
        yield bed


def ap(name: str, spec: dict[str, Any], ns: str = "foo", **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


HTTPBIN_SEL = {"matchLabels": {"app": "httpbin"}}
DB_SEL = {"matchLabels": {"app": "db"}}


class Case(NamedTuple):
    caller: str
    url: str
    expected: str
    method: str = "GET"
    headers: tuple[str, ...] = ()


def codes(tb: Testbed, cases: list[Case]) -> list[str]:
    """Each case's status, one shell per caller (every curl bounded)."""
    got: dict[int, str] = {}
    for caller in sorted({c.caller for c in cases}):
        mine = [(i, c) for i, c in enumerate(cases) if c.caller == caller]
        script = []
        for _, c in mine:
            argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "-m", "3"]
            argv += ["-X", c.method, *[a for h in c.headers for a in ("-H", h)], c.url]
            script.append(" ".join(shlex.quote(a) for a in argv) + " || true")
        proc = tb.exec(caller, ["sh", "-c", "; ".join(script)], timeout=10 + 4 * len(mine))
        lines = proc.stdout.split()
        for (i, _), line in zip(mine, lines + ["?"] * len(mine), strict=False):
            got[i] = line.strip()[-3:] or CLOSED
    return [got[i] for i in range(len(cases))]


_generation = [0]


def enforce(tb: Testbed, policies: list[dict[str, Any]], cases: list[Case]) -> None:
    """POLICIES applied; then every case's decision holds (bounded wait)."""
    _generation[0] += 1
    marker = f"/gen-{_generation[0]}"
    mark = ap(
        f"marker-{_generation[0]}",
        {
            "selector": HTTPBIN_SEL,
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": [marker]}}]}],
        },
    )
    apply_docs(tb, mark, *policies)
    probes = [Case(SLEEP, HTTPBIN + marker, DENIED), Case(SLEEP2, HTTPBIN + marker, DENIED)]
    wait_for(lambda: codes(tb, probes) == [DENIED, DENIED], 30, f"{marker} denied", step=0.2)
    last: list[list[str]] = [[]]

    def hold() -> bool:
        last[0] = codes(tb, cases)
        return last[0] == [c.expected for c in cases]

    def wrong() -> str:
        """The cases whose decision was not the expected one at the deadline."""
        return "\n".join(
            f"{c.caller} {c.method} {c.url} {c.headers}: {got} (expected {c.expected})"
            for c, got in zip(cases, last[0], strict=True)
            if got != c.expected
        )

    wait_for(hold, 15, wrong, step=0.3)


S6 = ap(
    "s6",
    {
        "selector": HTTPBIN_SEL,
        "action": "ALLOW",
        "rules": [
            {
                "from": [
                    {"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                    {"source": {"namespaces": ["dev"]}},
                ],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}}],
            }
        ],
    },
)


def test_s6_authorization_by_identity_same_and_cross_node(tb: Testbed) -> None:
    """SCENARIOS S6 (AP, CONCEPT: principals from mTLS; a forged header is no identity)."""
    info = HTTPBIN + "/info"
    forged = f"x-forwarded-client-cert: By=spiffe://cluster.local/ns/foo/sa/httpbin;URI={SLEEP_ID}"
    enforce(
        tb,
        [S6],
        [
            Case(SLEEP, info, "200"),  # same node (fast path)
            Case(SLEEP2, info, "200"),  # other node (mTLS)
            Case(DEV, info, "200"),  # namespace dev
            Case(SLEEP, HTTPBIN + "/infoxyz", "200"),  # prefix
            Case(SLEEP, info, DENIED, "POST"),
            Case(SLEEP2, info, DENIED, "POST"),
            Case(OTHER, info, DENIED),
            Case(LEGACY, info, DENIED),
            Case(LEGACY, info, DENIED, headers=(forged,)),  # forged XFCC from outside the mesh
            Case(SLEEP, HTTPBIN + "/headers", DENIED),
            Case(SLEEP2, HTTPBIN + "/", DENIED),
            Case(SLEEP, DB, "200"),  # db is not selected
        ],
    )
    # The denial says which policy: Envoy's RBAC 403 body, as Istio's sidecar answers.
    proc = tb.exec(SLEEP, ["curl", "-s", "-m", "3", "-X", "POST", info])
    assert proc.stdout == "RBAC: access denied"


def test_deny_all_then_allow_all(tb: Testbed) -> None:
    """AP: ``spec: {}`` denies every request (HTTP and TCP); ``rules: [{}]`` allows all."""
    deny_all = [ap("deny-all", {})]
    enforce(
        tb,
        deny_all,
        [
            Case(SLEEP, HTTPBIN + "/", DENIED),
            Case(SLEEP2, HTTPBIN + "/", DENIED),
            Case(DEV, HTTPBIN + "/", DENIED),
            Case(LEGACY, HTTPBIN + "/", DENIED),
            Case(SLEEP, DB, CLOSED),
            Case(SLEEP2, DB, CLOSED),
        ],
    )
    enforce(
        tb,
        [ap("allow-all", {"rules": [{}]})],
        [
            Case(SLEEP, HTTPBIN + "/", "200"),
            Case(SLEEP2, HTTPBIN + "/", "200"),
            Case(LEGACY, HTTPBIN + "/", "200"),
            Case(SLEEP2, DB, "200"),
        ],
    )


def test_tcp_deny_by_port_and_allow_with_methods(tb: Testbed) -> None:
    """AP (Rule, "HTTP-only fields on TCP"): a DENY on ``ports`` closes TCP connections; an
    ALLOW with ``methods`` can never match TCP traffic, so it denies; a DENY with ``methods``
    and ``ports`` on TCP drops the HTTP-only field and denies the port."""
    by_port = ap(
        "deny-port",
        {
            "selector": DB_SEL,
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}],
        },
    )
    enforce(
        tb,
        [by_port],
        [Case(SLEEP, DB, CLOSED), Case(SLEEP2, DB, CLOSED), Case(SLEEP, HTTPBIN + "/", "200")],
    )
    methods = ap(
        "allow-get",
        {"selector": DB_SEL, "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
    )
    enforce(tb, [methods], [Case(SLEEP, DB, CLOSED), Case(SLEEP2, DB, CLOSED)])
    wider = ap(
        "deny-get",
        {
            "selector": DB_SEL,
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["9000"]}}]}],
        },
    )
    enforce(tb, [wider], [Case(SLEEP, DB, CLOSED), Case(SLEEP2, HTTPBIN + "/", "200")])


def test_dry_run_lets_requests_through_and_counts_the_shadow_denial(tb: Testbed) -> None:
    """AP annotation ``istio.io/dry-run``: the policy is evaluated, not enforced (Envoy's
    shadow rules; Istio's stat prefix istio_dry_run_deny_)."""

    def shadow_denied() -> int:
        stats = envoy_admin(tb.name, "n1", "/stats?filter=istio_dry_run_deny_.shadow_denied")
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if ":" in line)

    before = shadow_denied()
    dry = ap(
        "dry",
        {"selector": HTTPBIN_SEL, "action": "DENY", "rules": [{}]},
        **{"istio.io/dry-run": "true"},
    )
    enforce(tb, [dry], [Case(SLEEP, HTTPBIN + "/", "200"), Case(SLEEP2, HTTPBIN + "/", "200")])
    wait_for(
        lambda: shadow_denied() >= before + 2,
        10,
        lambda: envoy_admin(tb.name, "n1", "/stats?filter=rbac"),
    )


def test_ip_blocks_judge_same_node_callers_by_their_pod_ip(tb: Testbed) -> None:
    """AP Source ``ipBlocks`` (the source IP), ``remoteIpBlocks``; COND ``source.ip``,
    ``remote.ip``: a DENY naming the same-node caller's pod IP denies it (httpbin leaves the fast
    path, which has no caller address: sleep comes over mTLS from its own IP), and lets it in
    when it names another pod's IP; the same on TCP. Without such a policy the fast path is back."""
    fast = "inboundInternal/foo/httpbin"
    sleep_ip, sleep2_ip = tb.pod_ip(SLEEP), tb.pod_ip(SLEEP2)

    def listeners() -> str:
        return envoy_admin(tb.name, "n1", "/listeners")

    def deny(name: str, selector: dict[str, Any], rule: dict[str, Any]) -> dict[str, Any]:
        return ap(name, {"selector": selector, "action": "DENY", "rules": [rule]})

    by_ip = {"from": [{"source": {"ipBlocks": [sleep_ip]}}]}
    enforce(
        tb,
        [deny("deny-sleep-ip", HTTPBIN_SEL, by_ip)],
        [
            Case(SLEEP, HTTPBIN + "/", DENIED),  # same node, its pod IP
            Case(OTHER, HTTPBIN + "/", "200"),  # same node, another IP
            Case(SLEEP2, HTTPBIN + "/", "200"),  # other node: same account, another IP
        ],
    )
    wait_for(lambda: fast not in listeners(), 10, f"{fast} removed")
    other_ip = {"from": [{"source": {"remoteIpBlocks": [f"{sleep2_ip}/32"]}}]}
    on_tcp = {"when": [{"key": "source.ip", "values": [sleep_ip]}]}
    enforce(
        tb,
        [deny("deny-sleep2-ip", HTTPBIN_SEL, other_ip), deny("deny-tcp-ip", DB_SEL, on_tcp)],
        [
            Case(SLEEP, HTTPBIN + "/", "200"),
            Case(SLEEP2, HTTPBIN + "/", DENIED),
            Case(SLEEP, DB, CLOSED),
            Case(OTHER, DB, "200"),
        ],
    )
    enforce(tb, [], [Case(SLEEP, HTTPBIN + "/", "200"), Case(SLEEP, DB, "200")])
    wait_for(lambda: fast in listeners(), 10, f"{fast} back")


def test_table_of_fields_and_conditions(tb: Testbed) -> None:
    """(policy, request, decision) through the real Envoy, one group per field family."""
    # AP Operation: paths with suffix, notMethods; COND request.headers (DENY).
    enforce(
        tb,
        [
            ap(
                "deny-fields",
                {
                    "selector": HTTPBIN_SEL,
                    "action": "DENY",
                    "rules": [
                        {"to": [{"operation": {"paths": ["*.secret"]}}]},
                        {"to": [{"operation": {"notMethods": ["GET", "HEAD"]}}]},
                        {"when": [{"key": "request.headers[x-block]", "values": ["yes"]}]},
                    ],
                },
            )
        ],
        [
            Case(SLEEP, HTTPBIN + "/a.secret", DENIED),
            Case(SLEEP2, HTTPBIN + "/a.secret", DENIED),
            Case(SLEEP, HTTPBIN + "/a.txt", "200"),
            Case(SLEEP, HTTPBIN + "/", DENIED, "PUT"),
            Case(SLEEP2, HTTPBIN + "/", DENIED, "DELETE"),
            Case(SLEEP, HTTPBIN + "/", "200", "HEAD"),
            Case(SLEEP, HTTPBIN + "/", DENIED, headers=("x-block: yes",)),
            Case(SLEEP2, HTTPBIN + "/", DENIED, headers=("x-block: yes",)),
            Case(SLEEP, HTTPBIN + "/", "200", headers=("x-block: no",)),
        ],
    )
    # The access log names the DENY rule that matched (Envoy's response code details).
    request_id = f"authz-{uuid.uuid4()}"
    tb.exec(
        SLEEP2,
        ["curl", "-s", "-m", "3", "-H", f"x-request-id: {request_id}", HTTPBIN + "/a.secret"],
    )
    log = layout.logs_dir(tb.name) / "n1.envoy.log"
    wait_for(lambda: request_id in log.read_text(), 10, "the denial's access log line")
    (line,) = [entry for entry in log.read_text().splitlines() if request_id in entry]
    assert " 403 " in line and "ns[foo]-policy[deny-fields]-rule[0]" in line, line
    # AP Source: notNamespaces (an unauthenticated caller is in no namespace: denied too).
    enforce(
        tb,
        [
            ap(
                "deny-not-default",
                {
                    "selector": HTTPBIN_SEL,
                    "action": "DENY",
                    "rules": [{"from": [{"source": {"notNamespaces": ["default"]}}]}],
                },
            )
        ],
        [
            Case(SLEEP, HTTPBIN + "/", "200"),
            Case(SLEEP2, HTTPBIN + "/", "200"),
            Case(OTHER, HTTPBIN + "/", "200"),
            Case(DEV, HTTPBIN + "/", DENIED),
            Case(LEGACY, HTTPBIN + "/", DENIED),
        ],
    )
    # AP Source principals prefix ("prefix*"), Operation hosts (case-insensitive, Host header).
    enforce(
        tb,
        [
            ap(
                "allow-dev-host",
                {
                    "selector": HTTPBIN_SEL,
                    "rules": [
                        {
                            "from": [{"source": {"principals": ["cluster.local/ns/dev/*"]}}],
                            "to": [{"operation": {"hosts": ["httpbin.foo:8000", "HTTPBIN.FOO"]}}],
                        }
                    ],
                },
            )
        ],
        [
            Case(DEV, HTTPBIN + "/", "200"),
            Case(DEV, HTTPBIN + "/", "200", headers=("Host: httpbin.foo",)),
            Case(DEV, HTTPBIN + "/", DENIED, headers=("Host: elsewhere",)),
            Case(SLEEP, HTTPBIN + "/", DENIED),
            Case(SLEEP2, HTTPBIN + "/", DENIED),
        ],
    )
    # COND source.namespace, destination.port, source.principal notValues; AP paths templates.
    enforce(
        tb,
        [
            ap(
                "allow-conditions",
                {
                    "selector": HTTPBIN_SEL,
                    "rules": [
                        {
                            "to": [{"operation": {"paths": ["/api/{*}/info", "/files/{**}"]}}],
                            "when": [
                                {"key": "source.namespace", "values": ["default"]},
                                {"key": "destination.port", "values": ["8000"]},
                                {
                                    "key": "source.principal",
                                    "notValues": ["cluster.local/ns/default/sa/other"],
                                },
                            ],
                        }
                    ],
                },
            )
        ],
        [
            Case(SLEEP, HTTPBIN + "/api/v1/info", "200"),
            Case(SLEEP2, HTTPBIN + "/api/v2/info", "200"),
            Case(SLEEP, HTTPBIN + "/api/v1/x/info", DENIED),
            Case(SLEEP, HTTPBIN + "/files/a/b/c", "200"),
            Case(OTHER, HTTPBIN + "/api/v1/info", DENIED),
            Case(DEV, HTTPBIN + "/api/v1/info", DENIED),
        ],
    )
    # CONCEPT: DENY before ALLOW; AUDIT never changes a decision.
    enforce(
        tb,
        [
            ap(
                "allow-sleep",
                {
                    "selector": HTTPBIN_SEL,
                    "rules": [
                        {
                            "from": [
                                {"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}
                            ]
                        }
                    ],
                },
            ),
            ap(
                "deny-admin",
                {
                    "selector": HTTPBIN_SEL,
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}],
                },
            ),
            ap("audit", {"selector": HTTPBIN_SEL, "action": "AUDIT", "rules": [{}]}),
        ],
        [
            Case(SLEEP, HTTPBIN + "/", "200"),
            Case(SLEEP2, HTTPBIN + "/", "200"),
            Case(SLEEP, HTTPBIN + "/admin", DENIED),
            Case(SLEEP2, HTTPBIN + "/admin", DENIED),
            Case(DEV, HTTPBIN + "/", DENIED),
        ],
    )
    apply_docs(tb)


def test_s5_jwt_request_principals_and_claims(tb: Testbed) -> None:
    """SCENARIOS S5 with RequestAuthentication (Istio's sample JWKS and tokens): a DENY on
    ``notRequestPrincipals: ["*"]`` denies requests without a valid token; an ALLOW on
    ``request.auth.claims[groups]`` admits groups-scope.jwt only (AP, COND; istio.io/latest/
    docs/tasks/security/authorization/authz-jwt/)."""
    from tests.unit.istio_data import istio_data

    jwks = istio_data("jwt/jwks.json").read_text()
    demo = istio_data("jwt/demo.jwt").read_text().strip()
    groups = istio_data("jwt/groups-scope.jwt").read_text().strip()
    ra = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "foo"},
        "spec": {
            "selector": HTTPBIN_SEL,
            "jwtRules": [{"issuer": "testing@secure.istio.io", "jwks": jwks}],
        },
    }
    bearer = {
        name: (f"Authorization: Bearer {token}",)
        for name, token in (("demo", demo), ("groups", groups))
    }
    need_token = ap(
        "need-token",
        {
            "selector": HTTPBIN_SEL,
            "action": "DENY",
            "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}],
        },
    )
    enforce(
        tb,
        [ra, need_token],
        [
            Case(SLEEP, HTTPBIN + "/", DENIED),
            Case(SLEEP2, HTTPBIN + "/", DENIED),
            Case(SLEEP, HTTPBIN + "/", "200", headers=bearer["demo"]),
            Case(SLEEP2, HTTPBIN + "/", "200", headers=bearer["demo"]),
            Case(SLEEP, HTTPBIN + "/", "401", headers=("Authorization: Bearer deadbeef",)),
        ],
    )
    by_group = ap(
        "group1",
        {
            "selector": HTTPBIN_SEL,
            "rules": [
                {
                    "from": [{"source": {"requestPrincipals": ["testing@secure.istio.io/*"]}}],
                    "when": [{"key": "request.auth.claims[groups]", "values": ["group1"]}],
                }
            ],
        },
    )
    enforce(
        tb,
        [ra, by_group],
        [
            Case(SLEEP, HTTPBIN + "/", "200", headers=bearer["groups"]),
            Case(SLEEP2, HTTPBIN + "/", "200", headers=bearer["groups"]),
            Case(SLEEP, HTTPBIN + "/", DENIED, headers=bearer["demo"]),
            Case(SLEEP2, HTTPBIN + "/", DENIED, headers=bearer["demo"]),
            Case(DEV, HTTPBIN + "/", DENIED),
        ],
    )
    apply_docs(tb)
