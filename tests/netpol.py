"""A small evaluator of Kubernetes NetworkPolicy semantics, to check rendered manifests offline.

It follows the networking.k8s.io/v1 rules: a pod is isolated for a direction once any policy of its
namespace selecting it has that policy type; an isolated pod allows only what the union of those
policies' rules allows; a connection needs both the source's egress and the destination's ingress
to allow it. Peers: podSelector alone means pods of the policy's namespace, namespaceSelector
(with an optional podSelector) pods of matching namespaces, ipBlock addresses outside the cluster
(what ipBlock does to pod IPs is left to the CNI, so it never matches a pod here). Ports: numbers,
named container ports of the destination pod, endPort ranges, protocol TCP by default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (namespace None)."""

    name: str
    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports
    ip: str = "203.0.113.10"


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector; an empty one matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


class PolicySet:
    def __init__(self, policies: list[Mapping[str, Any]]) -> None:
        self.policies = policies

    def selects(self, policy: Mapping[str, Any], pod: Endpoint) -> bool:
        return (pod.namespace is not None and policy["metadata"].get("namespace") == pod.namespace
                and selector_matches(policy["spec"].get("podSelector"), pod.labels))

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP", *,
                egress: bool = True) -> bool:
        """Both ends must allow; egress=False asks the destination's ingress side alone."""
        return ((not egress or self._direction_allows(src, "Egress", "egress", "to", peer=dst, dst=dst, port=port,
                                                      protocol=protocol))
                and self._direction_allows(dst, "Ingress", "ingress", "from", peer=src, dst=dst, port=port,
                                           protocol=protocol))

    def _direction_allows(self, pod: Endpoint, ptype: str, rules_key: str, peers_key: str, *, peer: Endpoint,
                          dst: Endpoint, port: int, protocol: str) -> bool:
        if pod.namespace is None:  # outside the cluster: no policy applies
            return True
        selecting = [p for p in self.policies if self.selects(p, pod) and ptype in policy_types(p)]
        if not selecting:
            return True
        for policy in selecting:
            namespace = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(rules_key) or []:
                if (self._peers_match(rule.get(peers_key), peer, namespace)
                        and self._ports_match(rule.get("ports"), dst, port, protocol)):
                    return True
        return False

    @staticmethod
    def _peers_match(peers: list[Mapping[str, Any]] | None, other: Endpoint, namespace: str) -> bool:
        if not peers:  # omitted or empty: every source / destination
            return True
        for peer in peers:
            if "ipBlock" in peer:
                if other.namespace is None:
                    addr = ipaddress.ip_address(other.ip)
                    block = peer["ipBlock"]
                    if addr in ipaddress.ip_network(block["cidr"]) and not any(
                            addr in ipaddress.ip_network(e) for e in block.get("except") or []):
                        return True
                continue
            if other.namespace is None:
                continue
            if "namespaceSelector" in peer:
                ns_ok = selector_matches(peer["namespaceSelector"], other.namespace_labels)
            else:
                ns_ok = other.namespace == namespace
            if ns_ok and selector_matches(peer.get("podSelector"), other.labels):
                return True
        return False

    @staticmethod
    def _ports_match(ports: list[Mapping[str, Any]] | None, dst: Endpoint, port: int, protocol: str) -> bool:
        if not ports:
            return True
        for entry in ports:
            if entry.get("protocol", "TCP") != protocol:
                continue
            p = entry.get("port")
            if p is None:
                return True
            if isinstance(p, str):
                if dst.ports.get(p) == port:
                    return True
            elif p <= port <= entry.get("endPort", p):
                return True
        return False
