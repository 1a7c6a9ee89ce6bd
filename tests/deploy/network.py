"""Kubernetes NetworkPolicy semantics, enough to ask of rendered policies who may reach what.

A connection is allowed when the destination pod's ingress policies (if any select it) and the
source pod's egress policies (if any select it) both allow it; a rule allows a peer its selectors
match on a port its port list covers (no list: every port; endPort: a range). The chart uses
matchLabels selectors only; anything else fails here rather than being guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Policy = dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """A pod (labels, namespace and the namespace's labels) or, with no labels, a client outside."""

    name: str
    pod_labels: dict[str, str] | None
    namespace: str = ""
    namespace_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def pod(cls, name: str, labels: dict[str, str], namespace: str) -> Peer:
        return cls(name, labels, namespace, {"kubernetes.io/metadata.name": namespace})


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector} is more than matchLabels"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _peer_matches(rule_peer: dict[str, Any], policy_namespace: str, peer: Peer) -> bool:
    assert set(rule_peer) <= {"podSelector", "namespaceSelector"}, f"peer {rule_peer} is not a selector"
    if peer.pod_labels is None:
        return False  # selectors match pods only
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return "podSelector" not in rule_peer or _selects(rule_peer["podSelector"], peer.pod_labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int) -> bool:
    if not ports:
        return True
    for entry in ports:
        assert isinstance(entry["port"], int), f"named port {entry} (the chart uses numbers)"
        if entry.get("protocol", "TCP") == "TCP" and entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _allows(policy: Policy, direction: str, other: Peer, port: int) -> bool:
    key = "from" if direction == "ingress" else "to"
    namespace = policy["metadata"]["namespace"]
    for rule in policy["spec"].get(direction, []):
        peers = rule.get(key)
        if (not peers or any(_peer_matches(p, namespace, other) for p in peers)) and _port_matches(rule.get("ports"), port):
            return True
    return False


def _policies_for(policies: list[Policy], pod: Peer, policy_type: str) -> list[Policy]:
    if pod.pod_labels is None:
        return []
    return [
        policy
        for policy in policies
        if policy["metadata"]["namespace"] == pod.namespace
        and policy_type in policy["spec"]["policyTypes"]
        and _selects(policy["spec"]["podSelector"], pod.pod_labels)
    ]


def allowed(policies: list[Policy], source: Peer, destination: Peer, port: int) -> bool:
    """Whether `source` may open a TCP connection to `destination`:`port`."""
    ingress = _policies_for(policies, destination, "Ingress")
    if ingress and not any(_allows(p, "ingress", source, port) for p in ingress):
        return False
    egress = _policies_for(policies, source, "Egress")
    return not egress or any(_allows(p, "egress", destination, port) for p in egress)
