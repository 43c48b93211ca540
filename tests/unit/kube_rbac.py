"""Who may do what, from a set of RBAC objects: the authorizer's rules, for the manifest tests.

As https://kubernetes.io/docs/reference/access-authn-authz/rbac/ describes: a ClusterRoleBinding
grants its ClusterRole in every namespace and cluster-wide; a RoleBinding grants its Role (or a
ClusterRole) in its own namespace only; "*" matches anything; resourceNames restrict only
requests that name an object (get, update, patch, delete; never create, whose name the
authorizer does not see). Bindings to roles these objects do not define (cluster-admin, ...),
aggregated ClusterRoles and subjects other than ServiceAccounts are refused: what they grant
cannot be told from here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Subject:
    namespace: str
    name: str  # a ServiceAccount

    def __str__(self) -> str:
        return f"ServiceAccount {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Grant:
    subject: Subject
    namespace: str | None  # None: every namespace and the cluster scope
    api_groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str] | None  # None: any object
    source: str  # "RoleBinding ns/x -> Role y", for messages

    def allows(
        self, verb: str, group: str, resource: str, namespace: str | None, name: str | None
    ) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        if not (_has(self.verbs, verb) and _has(self.api_groups, group)):
            return False
        if not _has(self.resources, resource):
            return False
        if self.names is None:
            return True
        return name is not None and verb != "create" and name in self.names


def _has(values: frozenset[str], value: str) -> bool:
    return "*" in values or value in values


class RBACError(AssertionError):
    pass


def grants(docs: Iterable[Obj]) -> list[Grant]:
    """Every (subject, rule) the bindings among DOCS make."""
    docs = list(docs)
    roles = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"
    }
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    out: list[Grant] = []
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        meta, ref = binding["metadata"], binding["roleRef"]
        scope = meta.get("namespace") if binding["kind"] == "RoleBinding" else None
        where = f"{binding['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")
        if ref["kind"] == "Role" and binding["kind"] == "RoleBinding":
            role = roles.get((scope, ref["name"]))
        elif ref["kind"] == "ClusterRole":
            role = cluster_roles.get(ref["name"])
        else:
            raise RBACError(f"{where}: roleRef kind {ref['kind']!r} is not allowed here")
        if role is None:
            raise RBACError(
                f"{where} binds {ref['kind']} {ref['name']}, which these manifests do not define:"
                " what it grants cannot be told"
            )
        if role.get("aggregationRule"):
            raise RBACError(f"{where}: {ref['kind']} {ref['name']} is aggregated")
        for subject in binding.get("subjects") or []:
            if subject["kind"] != "ServiceAccount":
                raise RBACError(f"{where}: subject {subject} is not a ServiceAccount")
            who = Subject(subject.get("namespace") or str(scope), subject["name"])
            for rule in role.get("rules") or []:
                if rule.get("nonResourceURLs"):
                    raise RBACError(f"{where}: nonResourceURLs {rule['nonResourceURLs']}")
                names = rule.get("resourceNames")
                out.append(
                    Grant(
                        who,
                        scope,
                        frozenset(rule.get("apiGroups") or []),
                        frozenset(rule.get("resources") or []),
                        frozenset(rule.get("verbs") or []),
                        frozenset(names) if names else None,
                        f"{where} -> {ref['kind']} {ref['name']}",
                    )
                )
    return out


def allowed(
    all_grants: Iterable[Grant],
    subject: Subject,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None,
    name: str | None = None,
) -> list[Grant]:
    """The grants that let SUBJECT do it (empty: denied)."""
    return [
        g
        for g in all_grants
        if g.subject == subject and g.allows(verb, group, resource, namespace, name)
    ]
