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


def _subject_matches(subject: Any, request: Request, binding_namespace: str) -> bool:
    if not isinstance(subject, Mapping):
        return False
    kind, name = subject.get("kind"), str(subject.get("name") or "")
    if kind == "User":
        return name == request.user
    if kind == "Group":
        return name in request.groups
    if kind == "ServiceAccount":
        namespace = str(subject.get("namespace") or binding_namespace)
        return request.user == f"{SA_PREFIX}{namespace}:{name}"
    return False


def _role(
    ref: Any, namespace: str, roles: Sequence[Obj], cluster_roles: Sequence[Obj]
) -> Obj | None:
    if not isinstance(ref, Mapping):
        return None
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


def authorize(
    request: Request,
    roles: Iterable[Obj],
    role_bindings: Iterable[Obj],
    cluster_roles: Iterable[Obj],
    cluster_role_bindings: Iterable[Obj],
) -> tuple[bool, str]:
    """(allowed, reason) of REQUEST against the given RBAC objects; the reason names the
    binding and role that allowed it, as the API server's RBAC authorizer does."""
    roles, cluster_roles = list(roles), list(cluster_roles)
    candidates: list[tuple[Obj, str, str]] = [
        (b, "", "ClusterRoleBinding") for b in cluster_role_bindings
    ]
    if request.namespace:
        candidates += [
            (b, request.namespace, "RoleBinding")
            for b in role_bindings
            if (_meta(b).get("namespace") or "default") == request.namespace
        ]
    for binding, namespace, kind in candidates:
        subjects = binding.get("subjects") or []
        if not any(_subject_matches(s, request, namespace) for s in subjects):
            continue
        role = _role(binding.get("roleRef"), namespace, roles, cluster_roles)
        if role is None:
            continue
        for rule in role.get("rules") or []:
            if isinstance(rule, Mapping) and rule_allows(rule, request):
                where = f"/{namespace}" if namespace else ""
                ref = binding["roleRef"]
                return True, (
                    f'RBAC: allowed by {kind} "{_meta(binding).get("name")}{where}" of '
                    f'{ref.get("kind")} "{ref.get("name")}" to {request.user}'
                )
    return False, ""
