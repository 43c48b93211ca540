"""Istio's authorization of a proxy for a DestinationRule ``credentialName`` Secret, per caller.

istiod serves a credentialName's certificate to a proxy (sidecars included) only when the
proxy's service account may ``list`` ``secrets`` in its namespace, as a SubjectAccessReview
answers (istio/istio pilot/pkg/xds/sds.go filterAuthorizedResources; pilot/pkg/credentials/kube/
secrets.go Authorize); the ``-cacert`` bundle is public. A refused proxy's TLS through the rule
fails. Here: the review's shape and caching (sources/secret_access.py), the stand-in's RBAC
answers (testbed/rbac.py), and the node's config: the refused account's pods get their own
clusters whose socket fails every handshake, guarded by their SPIFFE ID, never one per pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from apiserver_standin import APIServerStandIn
from google.protobuf import json_format

from nodeagent.identity.credentials import CredentialSecrets
from nodeagent.mesh import credentials, secret_access
from nodeagent.mesh.credentials import UNAUTHORIZED_CA
from nodeagent.mesh.model import Credential, IstioResource
from nodeagent.mesh.store import MeshStore
from nodeagent.sources import secret_access as reviews_module
from nodeagent.sources.kubernetes import KubernetesSource
from nodeagent.sources.secret_access import ReviewFailed, SecretAccessReviews
from nodeagent.testbed import rbac
from nodeagent.translate import TranslationCache, client_tls, internal
from nodeagent.translate import envoy as e
from tests.tls_certs import write_app_pki
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import HOST, local, store

NODE = "node1"
WAIT = 5.0
CLUSTER = f"outbound|80||{HOST}"


def _rule(mode: str = "MUTUAL", selector: dict[str, str] | None = None) -> IstioResource:
    spec: dict[str, Any] = {
        "host": HOST,
        "workloadSelector": {"matchLabels": selector or {"app": "a"}},
        "trafficPolicy": {"tls": {"mode": mode, "credentialName": "client"}},
    }
    return IstioResource("networking.istio.io", "v1", "DestinationRule", "shop", "web", spec)


def _answered(**accounts: bool) -> MeshStore:
    """The test mesh with the MUTUAL selector rule (app=a), its Secret, and review answers."""
    s = store()
    s.put_istio(_rule())
    s.put_credential(Credential("shop", "client", b"C1", b"K1", b"CA"))
    s.secret_access_enforced = True
    for account, allowed in accounts.items():
        s.put_secret_access("shop", account, allowed)
    return s


# -- the question ---------------------------------------------------------------------------------


def test_the_review_asks_istios_question_of_the_service_account() -> None:
    """Authorize's SubjectAccessReview: the user only (no groups), list secrets, its namespace."""
    assert secret_access.review_request("shop", "front") == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "metadata": {},
        "spec": {
            "resourceAttributes": {"namespace": "shop", "verb": "list", "resource": "secrets"},
            "user": "system:serviceaccount:shop:front",
        },
    }
    assert secret_access.review_answer({"status": {"allowed": True}}) == (True, "")
    assert secret_access.review_answer({"status": {"reason": "no"}}) == (False, "no")


def test_only_a_certificate_presented_needs_a_review_not_a_ca_bundle() -> None:
    """MUTUAL presents the Secret's certificate; SIMPLE reads its CA bundle, which Istio serves
    to any proxy of the namespace ("CA Certs are public information")."""
    for mode, needed in (("MUTUAL", {("shop", "x")}), ("SIMPLE", set())):
        s = store()
        s.put_istio(_rule(mode))
        pods = [local("a1", {"app": "a"}, "x").pod, local("b1", {"app": "b"}, "y").pod]
        assert secret_access.to_review(s, pods) == needed, mode


def test_without_an_api_server_every_account_may_as_a_standalone_node_has_no_rbac() -> None:
    s = store()
    assert s.may_read_secrets("shop", "anyone")
    s.secret_access_enforced = True  # the Kubernetes source: not answered yet is a no
    assert not s.may_read_secrets("shop", "anyone")
    s.put_secret_access("shop", "anyone", True)
    assert s.may_read_secrets("shop", "anyone")


# -- the stand-in's RBAC --------------------------------------------------------------------------


def _obj(kind: str, name: str, namespace: str = "", **body: Any) -> dict[str, Any]:
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta} | body


def _binding(
    kind: str, name: str, role: tuple[str, str], *subjects: dict[str, str], ns: str = ""
) -> dict[str, Any]:
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": role[0], "name": role[1]}
    return _obj(kind, name, ns, roleRef=ref, subjects=list(subjects))


def _sa(name: str, namespace: str = "shop") -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


LIST_SECRETS = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]


def _asks(user: str, namespace: str = "shop", verb: str = "list", **more: Any) -> rbac.Request:
    return rbac.Request(user, namespace=namespace, verb=verb, resource="secrets", **more)


def test_rbac_a_role_binding_grants_its_subjects_in_its_namespace_only() -> None:
    roles = [_obj("Role", "reader", "shop", rules=LIST_SECRETS)]
    bindings = [_binding("RoleBinding", "b", ("Role", "reader"), _sa("front"), ns="shop")]

    def allowed(request: rbac.Request) -> bool:
        return rbac.authorize(request, roles, bindings, [], [])[0]

    front = secret_access.username("shop", "front")
    assert allowed(_asks(front))
    assert (
        'RoleBinding "b/shop" of Role "reader"'
        in rbac.authorize(_asks(front), roles, bindings, [], [])[1]
    )
    assert not allowed(_asks(secret_access.username("shop", "other")))
    assert not allowed(_asks(front, namespace="other"))
    assert not allowed(_asks(front, verb="delete"))
    assert not allowed(rbac.Request(front, namespace="shop", verb="list", resource="configmaps"))
    # A Role of another namespace with the same name is not the binding's.
    elsewhere = [_obj("Role", "reader", "other", rules=LIST_SECRETS)]
    assert not rbac.authorize(_asks(front), elsewhere, bindings, [], [])[0]


def test_rbac_cluster_roles_groups_wildcards_and_resource_names() -> None:
    everything = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
    cluster_roles = [
        _obj("ClusterRole", "all", rules=everything),
        _obj("ClusterRole", "one", rules=[LIST_SECRETS[0] | {"resourceNames": ["client"]}]),
    ]
    user = secret_access.username("shop", "front")
    # A ClusterRole through a RoleBinding: in the binding's namespace only.
    local_grant = [_binding("RoleBinding", "b", ("ClusterRole", "all"), _sa("front"), ns="shop")]
    assert rbac.authorize(_asks(user), [], local_grant, cluster_roles, [])[0]
    assert not rbac.authorize(
        _asks(user, namespace="kube-system"), [], local_grant, cluster_roles, []
    )[0]
    # A ClusterRoleBinding to a group: only when the review names the group (Istio's does not).
    group = {"kind": "Group", "name": "system:serviceaccounts:shop"}
    everywhere = [_binding("ClusterRoleBinding", "c", ("ClusterRole", "all"), group)]
    assert not rbac.authorize(_asks(user), [], [], cluster_roles, everywhere)[0]
    with_group = _asks(user, namespace="kube-system", groups=("system:serviceaccounts:shop",))
    assert rbac.authorize(with_group, [], [], cluster_roles, everywhere)[0]
    # resourceNames: a list of the whole collection (no name) is not allowed by it.
    named = [_binding("RoleBinding", "n", ("ClusterRole", "one"), _sa("front"), ns="shop")]
    assert not rbac.authorize(_asks(user), [], named, cluster_roles, [])[0]
    assert rbac.authorize(_asks(user, verb="get", name="client"), [], named, cluster_roles, [])[0]
    # A User subject.
    users = [
        _binding(
            "RoleBinding", "u", ("ClusterRole", "all"), {"kind": "User", "name": "jane"}, ns="shop"
        )
    ]
    assert rbac.authorize(_asks("jane"), [], users, cluster_roles, [])[0]


def test_rbac_a_review_without_resource_attributes_or_user_is_refused_by_field() -> None:
    with pytest.raises(ValueError, match=r"spec\.resourceAttributes"):
        rbac.request_of({"user": "u"})
    with pytest.raises(ValueError, match=r"spec\.user"):
        rbac.request_of({"resourceAttributes": {"verb": "list"}})


# -- the reviews ----------------------------------------------------------------------------------


def _reviewing(s: MeshStore) -> None:
    for name, account in (("a1", "ok"), ("a2", "no"), ("b1", "other")):
        labels = {"app": "b" if name == "b1" else "a"}
        s.put_pod(dataclasses.replace(local(name, labels, account).pod, node_name=NODE))


def test_reviews_are_asked_once_per_account_kept_as_istio_keeps_them_and_dropped() -> None:
    """Only accounts a MUTUAL selector rule selects are reviewed; an answer is kept a minute
    when denied and five when allowed (Istio's cacheTTL), then asked again; an account that
    no longer needs one is forgotten."""
    s = store()
    s.node_name = NODE
    s.put_istio(_rule())
    _reviewing(s)
    asked: list[str] = []
    now = [0.0]

    async def create(body: dict[str, Any]) -> dict[str, Any]:
        user = body["spec"]["user"]
        asked.append(user)
        return {"status": {"allowed": user.endswith(":ok")}}

    reviews = SecretAccessReviews(s, NODE, create, clock=lambda: now[0])

    async def scenario() -> None:
        await reviews.review_due()
        assert sorted(asked) == ["system:serviceaccount:shop:no", "system:serviceaccount:shop:ok"]
        assert s.secret_access == {"shop/ok": True, "shop/no": False}
        asked.clear()
        await reviews.review_due()
        assert asked == []
        now[0] = secret_access.DENIED_TTL + 1
        await reviews.review_due()
        assert asked == ["system:serviceaccount:shop:no"]
        now[0] = secret_access.ALLOWED_TTL + 2
        await reviews.review_due()
        assert asked[-1] == "system:serviceaccount:shop:ok"
        s.delete_istio(_rule().key)
        await reviews.review_due()
        assert s.secret_access == {}

    asyncio.run(scenario())


def test_a_failed_review_keeps_the_last_answer_and_an_unanswered_account_stays_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = store()
    s.node_name = NODE
    s.put_istio(_rule())
    _reviewing(s)
    answers: list[Any] = [ReviewFailed("403 Forbidden", 403)]
    now = [0.0]

    async def create(body: dict[str, Any]) -> dict[str, Any]:
        answer = answers[0]
        if isinstance(answer, Exception):
            raise answer
        return {"status": {"allowed": answer}}

    reviews = SecretAccessReviews(s, NODE, create, clock=lambda: now[0])

    async def scenario() -> None:
        with caplog.at_level(logging.ERROR):
            await reviews.review_due()
        assert s.secret_access == {"shop/ok": False, "shop/no": False}
        assert "create on subjectaccessreviews" in caplog.text
        answers[0] = True
        now[0] = reviews_module.RETRY + 1
        await reviews.review_due()
        assert s.secret_access == {"shop/ok": True, "shop/no": True}
        answers[0] = ReviewFailed("connection refused")
        now[0] += secret_access.ALLOWED_TTL + 1
        await reviews.review_due()
        assert s.secret_access == {"shop/ok": True, "shop/no": True}  # kept

    asyncio.run(scenario())


def _pod_doc(name: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "labels": {"app": "front"}},
        "spec": {"nodeName": NODE, "serviceAccountName": account},
        "status": {"podIP": "10.244.1.7"},
    }


async def _until(check: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def test_the_kubernetes_source_reviews_through_the_api_server_and_follows_a_new_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP to the stand-in, whose answers come from the RBAC objects it holds: the
    bound account may, the other may not until a RoleBinding grants it (seen when its denial
    is asked again: a minute at Istio, shortened here)."""
    monkeypatch.setattr(reviews_module, "DENIED_TTL", 0.2)

    async def scenario() -> None:
        server = APIServerStandIn()
        await server.start()
        rule = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {
                "host": HOST,
                "workloadSelector": {"matchLabels": {"app": "front"}},
                "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "client"}},
            },
        }
        for obj in (
            _pod_doc("front-1", "bound"),
            _pod_doc("front-2", "unbound"),
            rule,
            _obj("Role", "secret-reader", "shop", rules=LIST_SECRETS),
            _binding("RoleBinding", "bound", ("Role", "secret-reader"), _sa("bound"), ns="shop"),
        ):
            server.add(obj)
        s = MeshStore(node_name=NODE)
        source = KubernetesSource(s, NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kc"))
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        try:
            await _until(lambda: len(s.secret_access) == 2, "both accounts reviewed")
            assert s.secret_access == {"shop/bound": True, "shop/unbound": False}
            assert "POST /apis/authorization.k8s.io/v1/subjectaccessreviews" in server.requests
            server.add(
                _binding(
                    "RoleBinding", "late", ("Role", "secret-reader"), _sa("unbound"), ns="shop"
                )
            )
            await _until(lambda: s.secret_access.get("shop/unbound") is True, "binding seen")
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task
            await server.stop()

    asyncio.run(scenario())


# -- the node's config ----------------------------------------------------------------------------


def _sockets(translation: Any) -> list[dict[str, Any]]:
    originate = json_format.MessageToDict(
        translation.resources[e.CLUSTER][internal.ORIGINATE_TLS], preserving_proto_field_name=True
    )
    return [
        m["transport_socket"]["typed_config"]["common_tls_context"]
        for m in originate["transport_socket_matches"]
        if m["name"].startswith(client_tls.SOCKET_PREFIX)
    ]


def _routes(translation: Any) -> list[tuple[str, str]]:
    """(caller guard regex, cluster) of the routes of web:80."""
    table = json_format.MessageToDict(
        translation.resources[e.ROUTE][CLUSTER], preserving_proto_field_name=True
    )
    out = []
    for route in table["virtual_hosts"][0]["routes"]:
        guards = route["match"].get("filter_state", [])
        caller = next(
            (
                g["string_match"]["safe_regex"]["regex"]
                for g in guards
                if g["key"] == internal.CALLER_KEY
            ),
            "",
        )
        out.append((caller, route["route"]["cluster"]))
    return out


def test_a_refused_account_gets_a_socket_that_presents_nothing_and_trusts_no_server() -> None:
    """Two pods with the same labels, one account allowed and one refused: the allowed one's
    routes go to the rule's clusters (its socket presents the Secret's certificate); the
    refused one's, matched first by its SPIFFE ID, to copies whose socket presents no
    certificate and trusts only a CA that signed nothing (as Envoy without the SDS secret, its
    calls fail). More pods of either account add nothing: classes, never one per pod."""
    s = _answered(ok=True, no=False)
    pods = [local("a1", {"app": "a"}, "ok"), local("a2", {"app": "a"}, "no")]
    built = TranslationCache().build(s, pods, [])
    sockets = _sockets(built)
    assert len(sockets) == 2
    presenting = [c for c in sockets if "tls_certificate_sds_secret_configs" in c]
    refused = [c for c in sockets if "tls_certificate_sds_secret_configs" not in c]
    assert [c["tls_certificate_sds_secret_configs"][0]["name"] for c in presenting] == [
        "kubernetes://shop/client"
    ]
    assert refused[0]["validation_context_sds_secret_config"]["name"] == UNAUTHORIZED_CA
    assert "kubernetes://shop/client" not in json.dumps(refused)
    routes = _routes(built)
    assert routes[0] == ("^spiffe://[^/]+/ns/shop/sa/no$", f"{CLUSTER}~shop/web~unauthorized")
    assert routes[1][1] == f"{CLUSTER}~shop/web"
    clusters = set(built.resources[e.CLUSTER])
    more = [*pods, local("a3", {"app": "a"}, "no"), local("a4", {"app": "a"}, "ok")]
    assert set(TranslationCache().build(s, more, []).resources[e.CLUSTER]) == clusters


def test_all_allowed_or_no_api_server_is_one_class_and_no_refused_socket() -> None:
    pods = [local("a1", {"app": "a"}, "ok"), local("a2", {"app": "a"}, "also")]
    for s in (_answered(ok=True, also=True), store()):
        if not s.istio:
            s.put_istio(_rule())
        built = TranslationCache().build(s, pods, [])
        assert len(_sockets(built)) == 1
        assert not [n for n in built.resources[e.CLUSTER] if n.endswith("~unauthorized")]


def test_an_answer_that_changes_moves_the_pods_between_the_sockets() -> None:
    s = _answered(ok=True, no=False)
    pods = [local("a1", {"app": "a"}, "ok"), local("a2", {"app": "a"}, "no")]
    cache = TranslationCache()
    assert len(_sockets(cache.build(s, pods, []))) == 2
    s.put_secret_access("shop", "no", True)
    built = cache.build(s, pods, [])
    # Make before break: the refused socket stays until Envoy holds the clusters without it.
    assert len(_sockets(built)) == 2
    assert cache.release_sockets(built.tls_sockets)
    built = cache.build(s, pods, [])
    assert len(_sockets(built)) == 1
    assert not [n for n in built.resources[e.CLUSTER] if n.endswith("~unauthorized")]
    s.put_secret_access("shop", "ok", False)
    s.put_secret_access("shop", "no", False)
    built = cache.build(s, pods, [])
    assert cache.release_sockets(built.tls_sockets)  # Envoy holds the clusters: drop the old
    built = cache.build(s, pods, [])
    assert _routes(built)[0][1] == f"{CLUSTER}~shop/web~unauthorized"
    assert [c for c in _sockets(built) if "tls_certificate_sds_secret_configs" in c] == []


def test_sds_holds_no_certificate_no_local_caller_may_have() -> None:
    """istiod sends a refused proxy the public CA bundle only: with no allowed local caller,
    the key never reaches the node's Envoy; the refused socket's CA is served."""
    s = _answered()
    names = {
        x.name
        for x in CredentialSecrets().sds_secrets(s, {("shop", "client")}, set(), refused=True)
    }
    assert names == {"kubernetes://shop/client-cacert", UNAUTHORIZED_CA}
    names = {x.name for x in CredentialSecrets().sds_secrets(s, {("shop", "client")})}
    assert names == {"kubernetes://shop/client", "kubernetes://shop/client-cacert"}


def test_envoy_accepts_the_refused_socket(tmp_path: Path) -> None:
    write_app_pki(tmp_path / "pki", "client.example")
    s = _answered()
    secrets = CredentialSecrets().sds_secrets(s, {("shop", "client")}, set(), refused=True)
    setting = client_tls.resolved(
        {"mode": "MUTUAL", "credentialName": "client"}, HOST, True, "tls", True, "shop", True
    )
    assert setting is not None and setting.get("denied")
    cluster = {
        "name": "refused",
        "type": "STATIC",
        "connect_timeout": "1s",
        "transport_socket": client_tls.transport_socket(setting, "web.example"),
    }
    assert_envoy_accepts_resources(
        tmp_path, clusters=[e.message(e.Cluster, cluster)], secrets=secrets
    )


def test_the_review_is_needed_only_where_a_selected_pod_of_the_account_is() -> None:
    s = store()
    s.put_istio(_rule())
    assert credentials.referenced(s, [local("b", {"app": "b"}, "x").pod]) == set()
    assert secret_access.unauthorized(s, local("b", {"app": "b"}, "x").pod) == ""
    s.secret_access_enforced = True
    assert secret_access.unauthorized(s, local("b", {"app": "b"}, "x").pod) == ""
    assert secret_access.unauthorized(s, local("a", {"app": "a"}, "x").pod) == "x"
