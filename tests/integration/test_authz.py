"""AuthorizationPolicy through the real node Envoy (issue #17; SCENARIOS S6), one testbed.

foo/httpbin (HTTP 8000) and foo/db (TCP 9000) on n1; foo/ext-authz on n2 (Istio's sample
external authorizer, tests/integration/ext_authz_server.py: HTTP 8000, gRPC 9000); callers
default/sleep on n1 (the same-node fast path: no TLS, the caller's identity stamped by the
node), default/sleep2 on n2 (same service account, over mTLS), dev/dev on n2, default/other on
n1 (another account) and legacy/legacy on n2, outside the mesh (plaintext; it also forges
x-forwarded-client-cert).
Each group of cases applies its policies, waits for a marker DENY of its own (``/gen-<k>``,
so no decision is read off the previous group's config), then checks every (caller, request,
decision) until they all hold. Expected decisions come from Istio's documentation, cited per
group: istio.io/latest/docs/reference/config/security/authorization-policy/ (AP),
istio.io/latest/docs/reference/config/security/conditions/ (COND),
istio.io/latest/docs/concepts/security/#authorization (CONCEPT).
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    EXT_AUTHZ_APP,
    apply_docs,
    envoy_admin,
    node_cli,
    node_metrics,
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
        pod("ext-authz", "n2", {"app": "ext-authz"}, namespace="foo", workload=EXT_AUTHZ_APP),
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
        {
            "name": "ext-authz",
            "namespace": "foo",
            "selector": {"app": "ext-authz"},
            "ports": [
                {"name": "http", "port": 8000, "targetPort": 8000},
                {"name": "grpc", "port": 9000, "targetPort": 9000},
                # Nothing listens behind these: a provider that is down.
                {"name": "http-down", "port": 8001, "targetPort": 8999},
                {"name": "grpc-down", "port": 9001, "targetPort": 9999},
            ],
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
    # The denial says which policy: Envoy's RBAC 403 body, as Istio's sidecar answers (bounded:
    # a connection pooled under the previous chain answers once more under it; inbound_line).
    body: list[str] = []

    def denied_body() -> bool:
        body[:] = [tb.exec(SLEEP, ["curl", "-s", "-m", "3", "-X", "POST", info]).stdout]
        return body[0] == "RBAC: access denied"

    wait_for(denied_body, 10, lambda: f"RBAC's 403 body, got {body}")


def denials(tb: Testbed) -> dict[tuple[str, str, str, str], float]:
    """n1's ``nodeagent_authz_denials_total`` for namespace foo, by (pod, path, protocol,
    action)."""
    out = {}
    for family in text_string_to_metric_families(node_metrics(tb.name, "n1")):
        for s in family.samples:
            if s.name == "nodeagent_authz_denials_total" and s.labels["namespace"] == "foo":
                labels = (s.labels["pod"], s.labels["path"], s.labels["protocol"])
                out[(*labels, s.labels["action"])] = s.value
    return out


def test_deny_all_then_allow_all(tb: Testbed) -> None:
    """AP: ``spec: {}`` denies every request (HTTP and TCP); ``rules: [{}]`` allows all. Each
    denial is counted in n1's metrics for its pod, the path it came by and the action (#17):
    no ALLOW matched."""
    before = denials(tb)
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
    counted = [
        ("httpbin", "fast", "http"),  # sleep, same node
        ("httpbin", "mtls", "http"),  # sleep2 and dev, other node
        ("httpbin", "plaintext", "http"),  # legacy, outside the mesh
        ("db", "fast", "tcp"),
        ("db", "mtls", "tcp"),
    ]
    after = denials(tb)
    grown = [k for k in counted if after.get((*k, "allow"), 0) > before.get((*k, "allow"), 0)]
    assert grown == counted, after
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
    shadow rules; Istio's stat prefix istio_dry_run_deny_). The access log line names the rule
    that would have denied (Istio's dry-run task: deny_policy.name); it is no denial in the
    node's metrics; ``proxy-config authz`` shows the rule as dry-run, after the enforced one."""

    def shadow_denied() -> int:
        stats = envoy_admin(tb.name, "n1", "/stats?filter=istio_dry_run_deny_.shadow_denied")
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if ":" in line)

    before = shadow_denied()
    dry = ap(
        "dry",
        {"selector": HTTPBIN_SEL, "action": "DENY", "rules": [{}]},
        **{"istio.io/dry-run": "true"},
    )
    tcp_dry = ap(
        "dry-db",
        {"selector": DB_SEL, "action": "DENY", "rules": [{}]},
        **{"istio.io/dry-run": "true"},
    )
    enforce(
        tb,
        [dry, tcp_dry],
        [
            Case(SLEEP, HTTPBIN + "/", "200"),
            Case(SLEEP2, HTTPBIN + "/", "200"),
            Case(SLEEP2, DB, "200"),
        ],
    )
    wait_for(
        lambda: shadow_denied() >= before + 3,
        10,
        lambda: envoy_admin(tb.name, "n1", "/stats?filter=rbac"),
    )
    denied_before = denials(tb)
    log = layout.logs_dir(tb.name) / "n1.envoy.log"

    def logged(caller: str, url: str, wanted: str) -> bool:
        """One request from CALLER, let through; True once n1 logs it with WANTED (HTTP: its
        own inbound line; TCP, whose lines have no request id: a new line). A pooled connection
        may still serve one request on the chain it was accepted on, however old (Envoy drains
        it: its next response closes it; a deny-all chain of an earlier test answers 403): False,
        ask again. A dry-run policy enforced would answer 403 every time, and fail the wait."""
        before = log.read_text().count(wanted)
        request_id = f"dry-{uuid.uuid4()}"
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "3"]
        answer = tb.exec(caller, [*argv, "-H", f"x-request-id: {request_id}", url])
        if answer.stdout != "200":
            return False
        for _ in range(20):  # Envoy writes its access log once a second
            text = log.read_text()
            if url == DB and text.count(wanted) > before:
                return True
            mine = [x for x in text.splitlines() if request_id in x and " inbound " in x]
            if mine:
                return wanted in mine[0]
            time.sleep(0.1)
        return False

    dry_http = "dry_run_deny=ns[foo]-policy[dry]-rule[0] "
    for caller in (SLEEP, SLEEP2, LEGACY):  # fast path, mTLS, plaintext
        wait_for(lambda c=caller: logged(c, HTTPBIN + "/", dry_http), 15, f"{caller}: {dry_http}")
    # TCP: the network RBAC filter's metadata names the rule that would have closed it.
    dry_tcp = "dry_run_deny=ns[foo]-policy[dry-db]-rule[0] "
    wait_for(lambda: logged(SLEEP2, DB, dry_tcp), 15, f"db's TCP line: {dry_tcp}")
    # Dry-run denies nothing. (Counters of filters the new config dropped are gone: Envoy frees
    # them, and a counter that comes back starts at 0, as Prometheus expects of a reset.)
    grown = {k: v for k, v in denials(tb).items() if v > denied_before.get(k, 0)}
    assert grown == {}, denied_before
    # The effective chain as the node Envoy holds it, over the CLI.
    shown = node_cli(tb.name, "n1", "proxy-config", "authz", "foo/httpbin")
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()[1:]]
    for path in ("fast", "mtls", "plaintext"):
        mine = [r[3:] for r in rows if r[:3] == [path, "8000", "http"]]
        marker = f"ns[foo]-policy[marker-{_generation[0]}]-rule[0]"
        assert mine == [
            ["1", "DENY", marker, "enforced"],
            ["1", "DENY", "ns[foo]-policy[dry]-rule[0]", "dry-run"],
        ], shown.stdout
    as_json = node_cli(tb.name, "n1", "proxy-config", "authz", "foo/db", "-o", "json")
    chains = json.loads(as_json.stdout)
    assert {c["path"] for c in chains} == {"fast", "mtls", "plaintext"}, as_json.stdout
    for chain in chains:
        assert chain["steps"] == [
            {
                "step": 1,
                "filter": "rbac",
                "action": "DENY",
                "mode": "dry-run",
                "rules": ["ns[foo]-policy[dry-db]-rule[0]"],
            }
        ], chain


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


def inbound_line(tb: Testbed, caller: str, url: str) -> str:
    """n1's inbound access log line of one request from CALLER to URL ("" when none appeared
    within 2 s: Envoy writes its log once a second). One request is not enough right after a
    policy change: a connection pooled under the previous filter chain serves one more
    request under it (Envoy drains it then): callers ask again, bounded."""
    request_id = f"authz-{uuid.uuid4()}"
    tb.exec(caller, ["curl", "-s", "-m", "3", "-H", f"x-request-id: {request_id}", url])
    log = layout.logs_dir(tb.name) / "n1.envoy.log"
    for _ in range(20):
        mine = [x for x in log.read_text().splitlines() if request_id in x and " inbound " in x]
        if mine:
            return mine[0]
        time.sleep(0.1)
    return ""


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
    rule = "ns[foo]-policy[deny-fields]-rule[0]"
    line = [""]

    def logged_denial() -> bool:
        line[0] = inbound_line(tb, SLEEP2, HTTPBIN + "/a.secret")
        return " 403 " in line[0] and rule in line[0]

    wait_for(logged_denial, 15, lambda: f"an inbound 403 line naming {rule}, last: {line[0]}")
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


# -- CUSTOM (ext_authz) ---------------------------------------------------------------------------
# istio.io/latest/docs/tasks/security/authorization/authz-custom/ (TASK): its two providers, its
# policy (CUSTOM on /headers), its allow header; MeshConfig extensionProviders fields from
# istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/ (MESH).

EXT_AUTHZ_HOST = "ext-authz.foo.svc.cluster.local"
ALLOW_HEADER = ("x-ext-authz: allow",)


def _provider(name: str, kind: str, port: int, **fields: Any) -> dict[str, Any]:
    return {"name": name, kind: {"service": EXT_AUTHZ_HOST, "port": port, **fields}}


PROVIDERS = [
    _provider("sample-ext-authz-grpc", "envoyExtAuthzGrpc", 9000),
    _provider(
        "sample-ext-authz-http",
        "envoyExtAuthzHttp",
        8000,
        includeRequestHeadersInCheck=["x-ext-authz"],
        headersToUpstreamOnAllow=["x-ext-authz-check-received"],
        headersToDownstreamOnDeny=["x-ext-authz-check-result"],
    ),
    _provider("down-closed", "envoyExtAuthzHttp", 8001, timeout="2s"),
    _provider("down-503", "envoyExtAuthzHttp", 8001, timeout="2s", statusOnError="503"),
    _provider("down-open", "envoyExtAuthzGrpc", 9001, timeout="2s", failOpen=True),
]


def custom(provider: str, selector: dict[str, Any] = HTTPBIN_SEL) -> dict[str, Any]:
    """TASK's policy: CUSTOM on /headers (for a TCP workload: every connection)."""
    rules = [{"to": [{"operation": {"paths": ["/headers"]}}]}] if selector is HTTPBIN_SEL else [{}]
    spec = {"selector": selector, "action": "CUSTOM", "provider": {"name": provider}}
    return ap(f"ext-authz-{provider}", {**spec, "rules": rules})


def _answer(tb: Testbed, caller: str, url: str, *headers: str) -> tuple[str, str]:
    """(response headers, body) of one bounded request."""
    argv = ["curl", "-s", "-i", "-m", "5", *[a for h in headers for a in ("-H", h)], url]
    # exec reads text: curl's \r\n arrive as \n.
    head, _, body = tb.exec(caller, argv, timeout=10).stdout.partition("\n\n")
    return head.lower(), body


HTTPBIN_ID = "spiffe://cluster.local/ns/foo/sa/httpbin"


def _deny_header_and_check_caller(tb: Testbed, provider: str) -> None:
    """PROVIDER's deny header reaches the client; its check came from httpbin's identity.
    Bounded waits, not one request: a connection pooled under the previous config answers
    once more under it (Envoy's drain, envoy/launch.py)."""
    last: list[tuple[str, str]] = []

    def answered(caller: str, *headers: str) -> tuple[str, str]:
        last[:] = [_answer(tb, caller, HTTPBIN + "/headers", *headers)]
        return last[0]

    wait_for(
        lambda: "x-ext-authz-check-result: denied" in answered(SLEEP2)[0],
        10,
        lambda: f"{provider}: the provider's deny header at the client: {last}",
    )
    wait_for(
        lambda: _check_caller(answered(SLEEP, *ALLOW_HEADER)[1]) == HTTPBIN_ID,
        10,
        lambda: f"{provider}: the check's caller as the provider saw it: {last}",
    )


def _check_caller(body: str) -> str:
    """The URI of the x-forwarded-client-cert the provider's check arrived with (the sample
    server returns it as x-ext-authz-check-received; httpbin's /headers shows it)."""
    try:
        received = json.loads(body)["headers"].get("x-ext-authz-check-received", "")
    except (ValueError, KeyError, TypeError):
        return ""
    return next((p[4:] for p in received.split(";") if p.startswith("URI=")), "")


HTTPBIN_PATHS = (("httpbin", "fast", "http"), ("httpbin", "mtls", "http"))
HTTPBIN_DENIED = [Case(c, HTTPBIN + "/headers", DENIED) for c in (SLEEP, SLEEP2)]


def custom_denials_counted(tb: Testbed, denied: list[Case], *where: tuple[str, ...]) -> None:
    """The DENIED requests, once the policy holds, are counted in n1's
    ``nodeagent_authz_denials_total`` with action custom for each (pod, path, protocol) of
    WHERE: between two reads with the requests in between, each grows. (Not from before the
    policy change: a change that drops a filter even for one push frees its counter, which
    comes back at 0, a reset as Prometheus knows them.) Bounded."""
    wanted = [(*w, "custom") for w in where]
    seen: list[Any] = []

    def counted() -> bool:
        before = denials(tb)
        answers = codes(tb, denied)
        after = denials(tb)
        seen[:] = [answers, before, after]
        if answers != [c.expected for c in denied]:  # a pooled connection's last old answer
            return False
        return all(after.get(k, 0) > before.get(k, 0) for k in wanted)

    def why() -> str:
        stats = envoy_admin(tb.name, "n1", "/stats?filter=_custom")
        return f"custom denials {wanted} counted: (answers, before, after) {seen}; n1:\n{stats}"

    wait_for(counted, 10, why)


def test_custom_ext_authz_http_and_grpc_providers(tb: Testbed) -> None:
    """TASK with both providers, callers on httpbin's node (fast path) and on the other node
    (mTLS): /headers allowed with ``x-ext-authz: allow``, denied without (403 and the
    provider's ``x-ext-authz-check-result: denied`` reaching the client); /ip, not in the rule,
    never checked (allowed without the header). The check reaches the provider (on n2) over
    mTLS as httpbin itself: the x-forwarded-client-cert the provider saw names httpbin. The
    provider's denials are counted in n1's metrics for httpbin, per path, action custom."""
    tb.set_mesh_config({"extensionProviders": PROVIDERS})
    try:
        for provider in ("sample-ext-authz-http", "sample-ext-authz-grpc"):
            enforce(
                tb,
                [custom(provider)],
                [
                    Case(SLEEP, HTTPBIN + "/headers", "200", headers=ALLOW_HEADER),
                    Case(SLEEP2, HTTPBIN + "/headers", "200", headers=ALLOW_HEADER),
                    Case(SLEEP, HTTPBIN + "/headers", DENIED),
                    Case(SLEEP2, HTTPBIN + "/headers", DENIED),
                    Case(SLEEP, HTTPBIN + "/ip", "200"),
                    Case(SLEEP2, HTTPBIN + "/ip", "200"),
                ],
            )
            custom_denials_counted(tb, HTTPBIN_DENIED, *HTTPBIN_PATHS)
            _deny_header_and_check_caller(tb, provider)
    finally:
        apply_docs(tb)
        tb.set_mesh_config({})


def test_custom_provider_down_unknown_before_deny_and_on_tcp(tb: Testbed) -> None:
    """MESH failOpen/statusOnError with the provider down (nothing listens behind its port):
    failOpen false -> 403, statusOnError 503 -> 503, failOpen true -> allowed. An unknown
    provider: istiod's config denies what the CUSTOM rules match. CUSTOM comes before DENY: the
    provider's allow does not lift a DENY (AP: CUSTOM, DENY, ALLOW). A gRPC provider checks TCP
    connections too (no header to allow: closed). The unknown provider's and the TCP denials
    are counted per pod and path with action custom."""
    tb.set_mesh_config({"extensionProviders": PROVIDERS})
    try:
        for provider, expected in (
            ("down-closed", DENIED),
            ("down-503", "503"),
            ("down-open", "200"),
        ):
            enforce(
                tb,
                [custom(provider)],
                [
                    Case(SLEEP, HTTPBIN + "/headers", expected, headers=ALLOW_HEADER),
                    Case(SLEEP2, HTTPBIN + "/headers", expected, headers=ALLOW_HEADER),
                    Case(SLEEP, HTTPBIN + "/ip", "200"),
                ],
            )
        enforce(
            tb,
            [custom("no-such-provider")],
            [
                Case(SLEEP, HTTPBIN + "/headers", DENIED, headers=ALLOW_HEADER),
                Case(SLEEP2, HTTPBIN + "/headers", DENIED, headers=ALLOW_HEADER),
                Case(SLEEP, HTTPBIN + "/ip", "200"),
            ],
        )
        # The provider in error: the RBAC filter denying what the CUSTOM rules match counts.
        denied = [Case(c.caller, c.url, DENIED, headers=ALLOW_HEADER) for c in HTTPBIN_DENIED]
        custom_denials_counted(tb, denied, *HTTPBIN_PATHS)
        deny_sleep = ap(
            "deny-sleep",
            {
                "selector": HTTPBIN_SEL,
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"principals": [SLEEP_ID.removeprefix("spiffe://")]}}]}
                ],
            },
        )
        enforce(
            tb,
            [custom("sample-ext-authz-grpc"), deny_sleep],
            [
                Case(SLEEP, HTTPBIN + "/headers", DENIED, headers=ALLOW_HEADER),
                Case(SLEEP2, HTTPBIN + "/headers", DENIED, headers=ALLOW_HEADER),
                Case(OTHER, HTTPBIN + "/headers", "200", headers=ALLOW_HEADER),
            ],
        )
        # The DENY policy's answer, not the provider's (bounded: see the test above).
        wait_for(
            lambda: (
                _answer(tb, SLEEP, HTTPBIN + "/headers", *ALLOW_HEADER)[1] == "RBAC: access denied"
            ),
            10,
            "the DENY policy's 403 body",
        )
        enforce(
            tb,
            [custom("sample-ext-authz-grpc", DB_SEL)],
            [Case(SLEEP, DB, CLOSED), Case(SLEEP2, DB, CLOSED), Case(SLEEP, HTTPBIN + "/", "200")],
        )
        closed = [Case(SLEEP, DB, CLOSED), Case(SLEEP2, DB, CLOSED)]
        custom_denials_counted(tb, closed, ("db", "fast", "tcp"), ("db", "mtls", "tcp"))
        enforce(
            tb, [custom("down-open", DB_SEL)], [Case(SLEEP, DB, "200"), Case(SLEEP2, DB, "200")]
        )
    finally:
        apply_docs(tb)
        tb.set_mesh_config({})
