"""A small RBAC authorizer for the API server stand-in's SubjectAccessReviews (pure).

Kubernetes' RBAC semantics (kubernetes.io/docs/reference/access-authn-authz/rbac/; the
authorizer is kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go): a request (user, groups,
namespace, verb, API group, resource, subresource, name) is allowed when a ClusterRoleBinding,
or a RoleBinding of the request's namespace, binds one of its subjects to a role with a
matching rule. RBAC only allows: nothing denies.

- Subjects: ``User`` (the user name), ``Group`` (one of the request's groups: a
  SubjectAccessReview has only the groups it names; the API server adds none), and
  ``ServiceAccount`` (``system:serviceaccount:<namespace>:<name>``; the namespace defaults to
  the RoleBinding's).
- A RoleBinding's roleRef is a Role of its own namespace or a ClusterRole, whose rules then
  apply in that namespace only; a ClusterRoleBinding's is a ClusterRole, everywhere.
- A rule matches when its ``verbs``, ``apiGroups`` and ``resources`` hold the request's (or
  ``*``; a subresource as ``resource/subresource``, or ``resource/*``) and its
  ``resourceNames`` are empty or hold the name.

``grants`` lists every (subject, rule) the bindings make, ``allowing`` the ones that allow a
request (the manifest tests, tests/unit/test_ca_manifests.py, read them too); ``authorize``
answers with the first.

Left out, as no test needs them: non-resource URLs, aggregated ClusterRoles (their rules are
whatever the object holds), and the API server's other authorizers (Node, webhooks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Request:
    user: str
    groups: tuple[str, ...] = ()
    namespace: str = ""
    verb: str = ""
    group: str = ""  # the API group ("" is the core group)
    resource: str = ""
    subresource: str = ""
    name: str = ""


def request_of(spec: Obj) -> Request:
    """The request a SubjectAccessReview's SPEC asks about. ValueError naming the field when
    it is no resource request with a user."""
    attributes = spec.get("resourceAttributes")
    if not isinstance(attributes, Mapping):
        raise ValueError("spec.resourceAttributes: required (non-resource URLs not supported)")
    user = spec.get("user")
    if not isinstance(user, str) or not user:
        raise ValueError("spec.user: required")
    groups = spec.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError("spec.groups: expected a list of strings")

    def text(name: str) -> str:
        value = attributes.get(name) or ""
        if not isinstance(value, str):
            raise ValueError(f"spec.resourceAttributes.{name}: expected a string")
        return value

    return Request(
        user,
        tuple(groups),
        text("namespace"),
        text("verb"),
        text("group"),
        text("resource"),
        text("subresource"),
        text("name"),
    )


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _holds(values: Any, wanted: str) -> bool:
    return isinstance(values, list) and ("*" in values or wanted in values)


def rule_allows(rule: Obj, request: Request) -> bool:
    if not _holds(rule.get("verbs"), request.verb):
        return False
    if not _holds(rule.get("apiGroups"), request.group):
        return False
    resources = rule.get("resources")
    if request.subresource:
        full = f"{request.resource}/{request.subresource}"
        if not (_holds(resources, full) or _holds(resources, f"{request.resource}/*")):
            return False
    elif not _holds(resources, request.resource):
        return False
    names = rule.get("resourceNames") or []
    return not names or request.name in names


@dataclass(frozen=True)
class Grant:
    """One rule of a role, as one binding grants it to one subject."""

    subject_kind: str  # User, Group or ServiceAccount
    subject: str  # the user or group name (a ServiceAccount's is system:serviceaccount:ns:name)
    namespace: str  # the RoleBinding's; "" (a ClusterRoleBinding's): everywhere and cluster-wide
    rule: Obj
    source: str  # 'RoleBinding "b/ns" of Role "r"', as the authorizer's reason names it

    def applies_to(self, request: Request) -> bool:
        if self.subject_kind == "Group":
            return self.subject in request.groups
        return self.subject == request.user

    def allows(self, request: Request) -> bool:
        if self.namespace and self.namespace != request.namespace:
            return False
        return self.applies_to(request) and rule_allows(self.rule, request)


def _subject(subject: Any, binding_namespace: str) -> tuple[str, str] | None:
    """(kind, user or group name) of a binding's SUBJECT; None for one no request can be."""
    if not isinstance(subject, Mapping):
        return None
    kind, name = subject.get("kind"), str(subject.get("name") or "")
    if kind in ("User", "Group"):
        return kind, name
    if kind == "ServiceAccount":
        namespace = str(subject.get("namespace") or binding_namespace)
        return kind, f"{SA_PREFIX}{namespace}:{name}"
    return None


def _role(
    ref: Obj, namespace: str, roles: Sequence[Obj], cluster_roles: Sequence[Obj]
) -> Obj | None:
    kind, name = ref.get("kind"), ref.get("name")
    if kind == "ClusterRole":
        return next((r for r in cluster_roles if _meta(r).get("name") == name), None)
    if kind == "Role" and namespace:
        return next(
            (
                r
                for r in roles
                if _meta(r).get("name") == name
                and (_meta(r).get("namespace") or "default") == namespace
            ),
            None,
        )
    return None


def grants(
    roles: Iterable[Obj],
    role_bindings: Iterable[Obj],
    cluster_roles: Iterable[Obj],
    cluster_role_bindings: Iterable[Obj],
) -> list[Grant]:
    """Every (subject, rule) the bindings make: ClusterRoleBindings first. A binding to a role
    that is not there grants nothing (as in the API server)."""
    roles, cluster_roles = list(roles), list(cluster_roles)
    candidates: list[tuple[Obj, str, str]] = [
        (b, "", "ClusterRoleBinding") for b in cluster_role_bindings
    ]
    candidates += [
        (b, str(_meta(b).get("namespace") or "default"), "RoleBinding") for b in role_bindings
    ]
    out: list[Grant] = []
    for binding, namespace, kind in candidates:
        ref = binding.get("roleRef")
        if not isinstance(ref, Mapping):
            continue
        role = _role(ref, namespace, roles, cluster_roles)
        if role is None:
            continue
        where = f"/{namespace}" if namespace else ""
        source = (
            f'{kind} "{_meta(binding).get("name")}{where}" of {ref.get("kind")} "{ref.get("name")}"'
        )
        for subject in binding.get("subjects") or []:
            who = _subject(subject, namespace)
            if who is None:
                continue
            out += [
                Grant(who[0], who[1], namespace, rule, source)
                for rule in role.get("rules") or []
                if isinstance(rule, Mapping)
            ]
    return out


def allowing(request: Request, all_grants: Iterable[Grant]) -> list[Grant]:
    """The grants that allow REQUEST (empty: denied)."""
    return [g for g in all_grants if g.allows(request)]


def authorize(
    request: Request,
    roles: Iterable[Obj],
    role_bindings: Iterable[Obj],
    cluster_roles: Iterable[Obj],
    cluster_role_bindings: Iterable[Obj],
) -> tuple[bool, str]:
    """(allowed, reason) of REQUEST against the given RBAC objects; the reason names the
    binding and role that allowed it, as the API server's RBAC authorizer does."""
    found = allowing(request, grants(roles, role_bindings, cluster_roles, cluster_role_bindings))
    if not found:
        return False, ""
    return True, f"RBAC: allowed by {found[0].source} to {request.user}"
