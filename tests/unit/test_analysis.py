"""`nodeagent analyze`: what istioctl analyze would say about Istio's Bookinfo samples and broken
variants of them, read by the directory (and Kubernetes) source, and the command's exit codes.

Bookinfo's platform file holds Deployments, which the sources do not read: the tests add the pods
those Deployments would make (one each, with the template's labels), as a cluster holds them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver_standin import APIServerStandIn
from click.testing import CliRunner
from istio_data import istio_data, istio_files

from nodeagent import kubeyaml
from nodeagent.cli import cli
from nodeagent.mesh import analysis
from nodeagent.mesh.analysis import Finding
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource

NETWORKING = "bookinfo/networking"
OLDER, NEWER = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"


def bookinfo_pods(namespace: str = "default") -> list[dict[str, Any]]:
    """One pod per Deployment of Bookinfo's platform file, labelled as its template says."""
    pods = []
    for doc in kubeyaml.load_all(istio_data("bookinfo/platform/bookinfo.yaml").read_text()):
        if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
            continue
        template = doc["spec"]["template"]
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": namespace,
                    "name": f"{doc['metadata']['name']}-0",
                    "labels": template["metadata"]["labels"],
                },
                "spec": {
                    "nodeName": "node1",
                    "serviceAccountName": template["spec"].get("serviceAccountName", "default"),
                },
            }
        )
    return pods


def bookinfo(
    root: Path, *samples: str, extra: Sequence[dict[str, Any]] = (), pods: bool = True
) -> Path:
    """A directory with Bookinfo's services, its pods, the named networking samples (copied
    unchanged) and EXTRA documents (extra.yaml)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(istio_data("bookinfo/platform/bookinfo.yaml"), root / "bookinfo.yaml")
    if pods:
        (root / "pods.yaml").write_text(yaml.safe_dump_all(bookinfo_pods()))
    for sample in samples:
        shutil.copy(istio_data(f"{NETWORKING}/{sample}"), root / sample)
    if extra:
        (root / "extra.yaml").write_text(yaml.safe_dump_all(list(extra)))
    return root


def analyze(root: Path) -> list[Finding]:
    store = MeshStore()
    source = DirectorySource(root, store)
    source.scan()
    assert not source.errors, source.errors
    return analysis.analyze(store)


def summary(findings: Sequence[Finding]) -> list[tuple[str, str, str]]:
    """(code or level, kind, namespace/name) of each finding."""
    return [(f.message.code or f.level, f.kind, f"{f.namespace}/{f.name}") for f in findings]


def virtual_service(
    name: str,
    http: list[dict[str, Any]],
    hosts: Sequence[str] = ("reviews",),
    namespace: str = "default",
    created: str = "",
    **spec: Any,
) -> dict[str, Any]:
    meta = {"namespace": namespace, "name": name}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {**meta, "creationTimestamp": created} if created else meta,
        "spec": {"hosts": list(hosts), "http": http, **spec},
    }


def route(host: str, subset: str = "", **extra: Any) -> dict[str, Any]:
    destination = {"host": host, **({"subset": subset} if subset else {})}
    return {"route": [{"destination": destination}], **extra}


def destination_rule(
    name: str, host: str, subsets: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "host": host,
            "subsets": [{"name": n, "labels": {"version": v}} for n, v in (subsets or {}).items()],
            **spec,
        },
    }


def peer_authentication(mode: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"namespace": "default", "name": "default"},
        "spec": {"mtls": {"mode": mode}, **spec},
    }


# -- Istio's samples as they are ------------------------------------------------------------------


def test_bookinfo_with_all_its_rules_reports_only_the_subsets_it_has_no_pods_for(
    tmp_path: Path,
) -> None:
    """destination-rule-all.yaml defines subsets for versions bookinfo.yaml never deploys
    (details v2, ratings v2, v2-mysql, v2-mysql-vm): IST0173, as istioctl analyze says
    (istio.io/latest/docs/reference/config/analysis/ist0173/)."""
    root = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-all-v1.yaml")

    findings = analyze(root)

    assert {(f.message.code, f.name, f.detail.split('"')[1]) for f in findings} == {
        ("IST0173", "details", "v2"),
        ("IST0173", "ratings", "v2"),
        ("IST0173", "ratings", "v2-mysql"),
        ("IST0173", "ratings", "v2-mysql-vm"),
    }
    assert all(f.level == analysis.ERROR and "503 UH" in f.detail for f in findings)


@pytest.mark.parametrize(
    "sample", [p.name for p in istio_files(f"{NETWORKING}/virtual-service-*.yaml")]
)
def test_every_bookinfo_virtual_service_finds_its_hosts_and_subsets(
    tmp_path: Path, sample: str
) -> None:
    findings = analyze(bookinfo(tmp_path, "destination-rule-all.yaml", sample))

    assert [f for f in findings if f.kind == "VirtualService"] == []


def test_a_service_entry_host_is_a_known_host(tmp_path: Path) -> None:
    assert analyze(bookinfo(tmp_path, "egress-rule-google-apis.yaml")) == []


# -- references -----------------------------------------------------------------------------------


def test_a_route_to_a_subset_the_destination_rule_lacks_is_referenced_resource_not_found(
    tmp_path: Path,
) -> None:
    root = bookinfo(
        tmp_path,
        "destination-rule-reviews.yaml",
        extra=[
            virtual_service(
                "reviews",
                [
                    route("reviews", "v2", match=[{"headers": {"end-user": {"exact": "jason"}}}]),
                    route("reviews", "v4", mirror={"host": "reviews", "subset": "v5"}),
                ],
            )
        ],
    )

    findings = analyze(root)

    assert summary(findings) == [
        ("IST0101", "VirtualService", "default/reviews"),
        ("IST0101", "VirtualService", "default/reviews"),
    ]
    v4, v5 = sorted(findings, key=lambda f: f.detail.count("mirror"))
    assert v4.detail.startswith('Referenced host+subset in destinationrule not found: "reviews+v4"')
    assert "http[1].route[0]" in v4.detail
    assert "DestinationRule default/reviews" in v4.detail
    assert "503 NC" in v4.detail
    assert '"reviews+v5"' in v5.detail and "http[1].mirror" in v5.detail
    assert v4.line().startswith("Error [IST0101] (VirtualService default/reviews) Referenced")


def test_subsets_without_any_destination_rule_are_all_reported(tmp_path: Path) -> None:
    findings = analyze(bookinfo(tmp_path, "virtual-service-all-v1.yaml"))

    assert sorted(f.detail.split('"')[1] for f in findings) == [
        "details+v1",
        "productpage+v1",
        "ratings+v1",
        "reviews+v1",
    ]
    assert all("no DestinationRule" in f.detail for f in findings)


def test_the_destination_rule_is_the_one_clients_in_the_virtual_services_namespace_use(
    tmp_path: Path,
) -> None:
    """A DestinationRule private to another namespace does not define subsets for this one
    (istiod's lookup: the client's namespace, then the service's, then the root's)."""
    private = destination_rule("reviews-private", "reviews", {"v4": "v4"}, exportTo=["."])
    private["metadata"]["namespace"] = "shop"
    private["spec"]["host"] = "reviews.default.svc.cluster.local"
    root = bookinfo(
        tmp_path,
        "destination-rule-reviews.yaml",
        extra=[
            private,
            virtual_service(
                "to-v4",
                [route("reviews.default.svc.cluster.local", "v4")],
                hosts=["reviews.default.svc.cluster.local"],
                namespace="shop",
            ),
            virtual_service(
                "to-v4-home",
                [route("reviews.default.svc.cluster.local", "v4")],
                hosts=["reviews.default.svc.cluster.local"],
                namespace="default",
                exportTo=["."],
            ),
        ],
    )

    findings = [f for f in analyze(root) if f.message.code == "IST0101"]

    assert summary(findings) == [("IST0101", "VirtualService", "default/to-v4-home")]


def test_hosts_are_resolved_in_the_resources_namespace(tmp_path: Path) -> None:
    """Short names are Services of the VirtualService's namespace; names with a dot are taken
    as written (Istio's ResolveShortnameToFQDN), so `reviews.default` is no Service host."""
    root = bookinfo(
        tmp_path,
        extra=[
            virtual_service("fqdn", [route("reviews.default.svc.cluster.local")]),
            virtual_service(
                "elsewhere",
                [route("reviews")],
                hosts=["ratings.default.svc.cluster.local"],
                namespace="shop",
            ),
            virtual_service("dotted", [route("reviews.default")], hosts=["details"]),
            virtual_service("typo", [route("reviewz")], hosts=["reviewz"]),
            virtual_service("wild", [route("ratings")], hosts=["*.default.svc.cluster.local"]),
            virtual_service("nowhere", [route("ratings")], hosts=["*.nowhere.example"]),
        ],
    )

    findings = analyze(root)

    assert summary(findings) == [
        ("IST0101", "VirtualService", "default/dotted"),
        ("Warning", "VirtualService", "default/nowhere"),
        ("Warning", "VirtualService", "default/typo"),
        ("IST0101", "VirtualService", "default/typo"),
        ("IST0101", "VirtualService", "shop/elsewhere"),
    ]
    by_name = {(f.name, f.level): f.detail for f in findings}
    assert by_name[("elsewhere", "Error")] == (
        'Referenced host not found: "reviews" (http[0].route[0]; resolved as'
        " reviews.shop.svc.cluster.local)"
    )
    assert 'host "reviewz"' in by_name[("typo", "Warning")]
    assert "no route is built for it" in by_name[("nowhere", "Warning")]


# -- DestinationRule ------------------------------------------------------------------------------


def test_a_subset_selecting_no_pod_is_reported_with_its_labels(tmp_path: Path) -> None:
    root = bookinfo(
        tmp_path, extra=[destination_rule("reviews", "reviews", {"v1": "v1", "v4": "v4"})]
    )

    (finding,) = analyze(root)

    assert summary([finding]) == [("IST0173", "DestinationRule", "default/reviews")]
    assert finding.detail == (
        'subset "v4" (labels version=v4) selects no pod of service default/reviews:'
        " requests routed to it get 503 UH (no healthy upstream)"
    )


def test_without_any_pod_the_finding_says_the_input_has_none(tmp_path: Path) -> None:
    root = bookinfo(tmp_path, "destination-rule-reviews.yaml", pods=False)

    findings = analyze(root)

    assert len(findings) == 3
    assert all("the input holds no pod in namespace default" in f.detail for f in findings)


def test_a_destination_rule_for_no_service_is_unknown_destination_rule_host(
    tmp_path: Path,
) -> None:
    (finding,) = analyze(bookinfo(tmp_path, extra=[destination_rule("typo", "reveiws")]))

    assert (finding.message.code, finding.level, finding.name) == ("IST0174", "Warning", "typo")
    assert 'host "reveiws"' in finding.detail


# -- two VirtualServices for one host -------------------------------------------------------------


def test_two_virtual_services_for_one_host_conflict_and_the_oldest_is_used(
    tmp_path: Path,
) -> None:
    root = bookinfo(
        tmp_path,
        "destination-rule-reviews.yaml",
        extra=[
            virtual_service("reviews-canary", [route("reviews", "v2")], created=NEWER),
            virtual_service("reviews", [route("reviews", "v1")], created=OLDER),
            # Bound to a gateway only: not the mesh's, no conflict.
            virtual_service("reviews-edge", [route("reviews", "v3")], gateways=["edge"]),
        ],
    )

    findings = analyze(root)

    assert summary(findings) == [
        ("IST0109", "VirtualService", "default/reviews"),
        ("IST0109", "VirtualService", "default/reviews-canary"),
    ]
    oldest, newer = findings
    for finding in findings:
        assert finding.detail.startswith(
            "VirtualServices default/reviews, default/reviews-canary of the mesh gateway define"
            " the same host reviews.default.svc.cluster.local: clients in namespace default use "
        )
    assert "clients in namespace default use this one (" in oldest.detail
    assert "clients in namespace default use default/reviews, not this one" in newer.detail


def test_virtual_services_conflict_only_where_a_client_sees_both(tmp_path: Path) -> None:
    """exportTo decides which namespaces see a VirtualService (traffic.visible): two private
    to different namespaces never meet; where two meet, the oldest there is used."""
    host = ["reviews.default.svc.cluster.local"]
    root = bookinfo(
        tmp_path,
        extra=[
            virtual_service("a", [route(host[0])], hosts=host, exportTo=["."], created=OLDER),
            virtual_service("b", [route(host[0])], hosts=host, namespace="shop", exportTo=["."]),
            virtual_service("c", [route(host[0])], hosts=host, namespace="shop", exportTo=["x"]),
            virtual_service("d", [route(host[0])], hosts=host, namespace="web", created=NEWER),
        ],
    )

    findings = analyze(root)

    assert summary(findings) == [
        ("IST0109", "VirtualService", "default/a"),
        ("IST0109", "VirtualService", "shop/b"),
        ("IST0109", "VirtualService", "shop/c"),
        ("IST0109", "VirtualService", "web/d"),
    ]
    detail = {f.name: f.detail.split(": ", 1)[1] for f in findings}
    assert detail["a"].startswith("clients in namespace default use this one (")
    assert detail["b"].startswith("clients in namespace shop use this one (")
    assert detail["c"].startswith("clients in namespace x use this one (")
    assert detail["d"].startswith(
        "clients in namespace default use default/a, not this one; clients in namespace shop"
        " use shop/b, not this one; clients in namespace x use shop/c, not this one ("
    )


# -- TLS against PeerAuthentication ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["DISABLE", "SIMPLE", "MUTUAL"])
def test_a_destination_rule_without_istio_mtls_conflicts_with_strict(
    tmp_path: Path, mode: str
) -> None:
    rule = destination_rule("reviews", "reviews", trafficPolicy={"tls": {"mode": mode}})
    root = bookinfo(tmp_path, extra=[rule, peer_authentication("STRICT")])

    (finding,) = analyze(root)

    assert summary([finding]) == [("IST0113", "DestinationRule", "default/reviews")]
    assert finding.detail == (
        f"TLS mode {mode} for reviews.default.svc.cluster.local:9080, but its pods"
        " (default/reviews-v1-0, default/reviews-v2-0, default/reviews-v3-0) accept only Istio"
        " mTLS (PeerAuthentication STRICT) on port 9080: these calls fail"
    )


def test_a_rule_in_the_clients_namespace_is_checked_too(tmp_path: Path) -> None:
    """Clients in shop use shop's rule for reviews (istiod looks in the client's namespace
    first), even with no pod in shop: it is the rule that conflicts."""
    rule = destination_rule(
        "reviews-plain",
        "reviews.default.svc.cluster.local",
        trafficPolicy={"tls": {"mode": "DISABLE"}},
        exportTo=["."],
    )
    rule["metadata"]["namespace"] = "shop"
    root = bookinfo(tmp_path, extra=[rule, peer_authentication("STRICT")])

    assert summary(analyze(root)) == [("IST0113", "DestinationRule", "shop/reviews-plain")]


def test_a_subsets_and_a_selector_rules_tls_are_checked_against_their_pods(
    tmp_path: Path,
) -> None:
    """A subset's tls.mode binds the subset's pods only (destination-rule/#Subset); a rule with
    a workloadSelector binds the pods it selects (destination-rule/#DestinationRule): both are
    checked, against the pods they reach."""
    subset = destination_rule("reviews", "reviews", {"v1": "v1", "v2": "v2"})
    subset["spec"]["subsets"][1]["trafficPolicy"] = {"tls": {"mode": "DISABLE"}}
    selector = destination_rule(
        "reviews-selected",
        "reviews.default.svc.cluster.local",
        trafficPolicy={"tls": {"mode": "SIMPLE"}},
        workloadSelector={"matchLabels": {"app": "curl"}},
    )
    selector["metadata"]["namespace"] = "shop"
    root = bookinfo(tmp_path, extra=[subset, selector, peer_authentication("STRICT")])

    findings = analyze(root)

    assert summary(findings) == [
        ("IST0113", "DestinationRule", "default/reviews"),
        ("IST0113", "DestinationRule", "shop/reviews-selected"),
    ]
    assert (
        "DISABLE for reviews.default.svc.cluster.local:9080 subset v2, but its pods"
        " (default/reviews-v2-0) accept" in findings[0].detail
    )
    assert "SIMPLE for reviews.default.svc.cluster.local:9080, but" in findings[1].detail


def test_istio_mutual_conflicts_with_a_disabled_peer_authentication(tmp_path: Path) -> None:
    rule = destination_rule(
        "all", "*.default.svc.cluster.local", trafficPolicy={"tls": {"mode": "ISTIO_MUTUAL"}}
    )
    root = bookinfo(tmp_path, extra=[rule, peer_authentication("DISABLE")])

    findings = analyze(root)

    assert {f.detail.split(" for ")[1].split(",")[0] for f in findings} == {
        f"{svc}.default.svc.cluster.local:9080"
        for svc in ("details", "productpage", "ratings", "reviews")
    }
    assert all("accept only plaintext" in f.detail for f in findings)


@pytest.mark.parametrize(
    ("peer", "tls"),
    [
        (peer_authentication("PERMISSIVE"), {"mode": "DISABLE"}),
        (peer_authentication("STRICT"), {"mode": "ISTIO_MUTUAL"}),
        # The service port's target port is PERMISSIVE: plaintext is accepted there.
        (
            peer_authentication(
                "STRICT",
                selector={"matchLabels": {"app": "reviews"}},
                portLevelMtls={"9080": {"mode": "PERMISSIVE"}},
            ),
            {"mode": "DISABLE"},
        ),
    ],
)
def test_no_conflict_when_the_pods_accept_what_the_client_sends(
    tmp_path: Path, peer: dict[str, Any], tls: dict[str, str]
) -> None:
    rule = destination_rule("reviews", "reviews", trafficPolicy={"tls": tls})

    assert analyze(bookinfo(tmp_path, extra=[rule, peer])) == []


# -- refused documents ----------------------------------------------------------------------------


def test_a_refused_document_is_a_schema_validation_error_naming_the_resource() -> None:
    finding = analysis.refused(
        "/x/vs.yaml: document 1: VirtualService shop/broken: spec.hosts: expected a list",
        "vs.yaml",
        "/x/vs.yaml",
    )
    unreadable = analysis.refused(
        "/x/bad.yaml: cannot be read as YAML: oops", "bad.yaml", "/x/bad.yaml"
    )

    assert (finding.message.code, finding.kind, finding.namespace, finding.name) == (
        "IST0106",
        "VirtualService",
        "shop",
        "broken",
    )
    assert finding.detail == "spec.hosts: expected a list"
    assert finding.line() == (
        "Error [IST0106] (VirtualService shop/broken vs.yaml) spec.hosts: expected a list"
    )
    assert unreadable.line() == "Error [IST0106] (- bad.yaml) cannot be read as YAML: oops"


# -- the command ----------------------------------------------------------------------------------

BROKEN_VS = virtual_service("reviews", [route("reviews", "v4")])
INVALID_VS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"namespace": "shop", "name": "broken"},
    "spec": {"hosts": "reviews", "http": [{"route": "nowhere"}]},
}


def test_analyze_exits_0_when_nothing_is_wrong(tmp_path: Path) -> None:
    root = bookinfo(
        tmp_path, "destination-rule-reviews.yaml", "virtual-service-reviews-jason-v2-v3.yaml"
    )

    result = CliRunner().invoke(cli, ["analyze", str(root)])

    assert result.exit_code == 0, result.output
    assert result.output == "No validation issues found (2 Istio resources analyzed).\n"


def test_analyze_exits_1_and_names_file_kind_namespace_and_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bookinfo(
        tmp_path / "config",
        "destination-rule-reviews.yaml",
        extra=[BROKEN_VS, INVALID_VS],
    )
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(cli, ["analyze", "config"])

    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(
        "Error [IST0101] (VirtualService default/reviews config/extra.yaml) Referenced"
        ' host+subset in destinationrule not found: "reviews+v4"'
    )
    # One line per problem the source found in the refused document.
    refused = lines[1:]
    for line in refused:
        assert line.startswith("Error [IST0106] (VirtualService shop/broken config/extra.yaml) ")
    assert any(
        line.endswith('spec.http[0].route: must be of type array, got string "nowhere"')
        for line in refused
    ), refused


def test_analyze_json_output_for_scripts(tmp_path: Path) -> None:
    root = bookinfo(tmp_path, extra=[destination_rule("typo", "reveiws")])

    result = CliRunner().invoke(cli, ["analyze", str(root), "-o", "json"])

    assert result.exit_code == 1  # a warning is enough
    assert json.loads(result.output) == [
        {
            "level": "Warning",
            "code": "IST0174",
            "message": "UnknownDestinationRuleHost",
            "kind": "DestinationRule",
            "namespace": "default",
            "name": "typo",
            "detail": 'host "reveiws" (resolved as reveiws.default.svc.cluster.local) is no'
            " Service or ServiceEntry host",
            "file": str(root / "extra.yaml"),
        }
    ]


@pytest.mark.parametrize("args", [[], ["DIR", "--kubeconfig", "KC"]])
def test_analyze_wants_one_input(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "kc").write_text("{}")
    args = [str(tmp_path) if a == "DIR" else str(tmp_path / "kc") if a == "KC" else a for a in args]

    result = CliRunner().invoke(cli, ["analyze", *args])

    assert result.exit_code == 2
    assert "give exactly one of DIRECTORY or --kubeconfig" in result.output


def test_analyze_reads_a_cluster_through_its_kubeconfig(tmp_path: Path) -> None:
    """The Kubernetes source's loader, one LIST per kind, against the stand-in API server."""
    documents = [
        d
        for d in kubeyaml.load_all(istio_data("bookinfo/platform/bookinfo.yaml").read_text())
        if isinstance(d, dict) and d.get("kind") in ("Service", "ServiceAccount")
    ]
    rule = kubeyaml.load_all(istio_data(f"{NETWORKING}/destination-rule-reviews.yaml").read_text())

    async def scenario() -> Any:
        server = APIServerStandIn()
        await server.start()
        try:
            for obj in [*documents, *bookinfo_pods(), *rule, BROKEN_VS, INVALID_VS]:
                obj.setdefault("metadata", {}).setdefault("namespace", "default")
                server.add(obj)
            kubeconfig = server.write_kubeconfig(tmp_path / "kc")
            return await asyncio.to_thread(
                CliRunner().invoke, cli, ["analyze", "--kubeconfig", str(kubeconfig)]
            )
        finally:
            await server.stop()

    result = asyncio.run(scenario())

    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(
        "Error [IST0101] (VirtualService default/reviews) Referenced host+subset"
    )
    assert len(lines) > 1
    for line in lines[1:]:
        assert line.startswith("Error [IST0106] (VirtualService shop/broken) ")


def test_analyze_exits_2_when_the_cluster_cannot_be_listed(tmp_path: Path) -> None:
    """1 means "analyzed, and found problems": a script must not take an unreachable API
    server for that."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "c", "cluster": {"server": f"http://127.0.0.1:{sock.getsockname()[1]}"}}
            ],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        (tmp_path / "kc").write_text(json.dumps(config))

        result = CliRunner().invoke(cli, ["analyze", "--kubeconfig", str(tmp_path / "kc")])

    assert result.exit_code == 2
    assert f"Error: cannot list the cluster of {tmp_path / 'kc'}: " in result.output
