"""The chart's NetworkPolicies, evaluated: exactly the paths the product uses are open.

Every pair of peers (each component's pods, Prometheus, an unrelated pod of the namespace, a client
outside the cluster) is tried on every port the product listens on; the answer must be the
expected matrix below and nothing more.
"""

from __future__ import annotations

import pytest

from tests.deploy.chart import NAMESPACE, Manifest, component, find, workloads
from tests.deploy.network import Peer, allowed

PROMETHEUS = Peer.pod("prometheus", {"app.kubernetes.io/name": "prometheus"}, "monitoring")
STRANGER = Peer.pod("stranger", {"app": "something-else"}, NAMESPACE)
OUTSIDE = Peer("outside", None)
DNS = Peer.pod("kube-dns", {"k8s-app": "kube-dns"}, "kube-system")

# (destination, port) -> who may connect; every other pair is refused.
EXPECTED = {
    ("node", 50054): {"router"},
    ("node", 50055): {"router"},
    ("node", 8100): {"router"},
    ("node", 8142): {"router"},
    ("node", 8199): {"router"},
    ("node", 8200): set(),
    ("node", 9154): {"prometheus"},
    ("node", 9155): {"prometheus"},
    ("router", 50051): {"envoy"},
    ("router", 9151): {"prometheus"},
    ("embedding", 50052): {"router"},
    ("embedding", 9152): {"prometheus"},
    ("cache", 50053): {"router"},
    ("cache", 9153): {"prometheus"},
    ("redis", 6379): {"cache", "router"},  # the Router reads exact entries itself
    # Any client; the release's own pods have no egress to it (none of them calls the API).
    ("envoy", 8080): {"prometheus", "stranger", "outside"},
    ("envoy", 9901): {"prometheus"},
}


def _pods(manifests: list[Manifest]) -> dict[str, Peer]:
    return {
        component(w): Peer.pod(component(w), w["spec"]["template"]["metadata"]["labels"], NAMESPACE)
        for w in workloads(manifests)
    }


def _policies(manifests: list[Manifest]) -> list[Manifest]:
    return [doc for doc in manifests if doc["kind"] == "NetworkPolicy"]


def test_only_the_product_paths_are_open(default_manifests: list[Manifest]) -> None:
    pods = _pods(default_manifests)
    peers = {**pods, "prometheus": PROMETHEUS, "stranger": STRANGER, "outside": OUTSIDE}
    policies = _policies(default_manifests)
    wrong = []
    for (destination, port), expected in EXPECTED.items():
        granted = {name for name, peer in peers.items() if allowed(policies, peer, pods[destination], port)}
        if granted != expected:
            wrong.append(f"{destination}:{port} reachable from {sorted(granted)}, expected {sorted(expected)}")
    assert not wrong, "\n".join(wrong)


def test_backend_ports_admit_routers_only(default_manifests: list[Manifest]) -> None:
    """The one ingress rule that covers 8100-8199 on nodes names Router pods and nothing else."""
    policy = find(default_manifests, "NetworkPolicy", "lmcluster-node-traffic")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    rules = [r for r in policy["spec"]["ingress"] if any(p.get("endPort") == 8199 for p in r["ports"])]
    assert len(rules) == 1
    [peer] = rules[0]["from"]
    assert peer == {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "lmcluster", "app.kubernetes.io/instance": "lmcluster", "app.kubernetes.io/component": "router"}}}


def test_everything_else_is_denied_by_default(default_manifests: list[Manifest]) -> None:
    deny = find(default_manifests, "NetworkPolicy", "lmcluster-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    pods = _pods(default_manifests)
    policies = _policies(default_manifests)
    for name, pod in pods.items():
        assert allowed(policies, pod, DNS, 53), f"{name} cannot resolve names"
        assert not allowed(policies, pod, OUTSIDE, 443), f"{name} reaches outside the cluster"
        assert not allowed(policies, pod, STRANGER, 80), f"{name} reaches unrelated pods"


@pytest.mark.parametrize("source", ["stranger", "ingress"])
def test_api_sources_and_extra_egress_follow_the_values(source: str, all_options_manifests: list[Manifest]) -> None:
    pods = _pods(all_options_manifests)
    policies = _policies(all_options_manifests)
    client = STRANGER if source == "stranger" else Peer.pod("ingress", {"app": "ingress-nginx"}, "ingress-nginx")
    assert allowed(policies, client, pods["envoy"], 8080) == (source == "ingress")
    collector = Peer.pod("collector", {"app": "otel-collector"}, "observability")
    for name, pod in pods.items():
        assert allowed(policies, pod, collector, 4317), f"{name} cannot send traces"
