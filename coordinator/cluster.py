"""`serve --kubernetes`: the pieces that let the coordinator run the job through the Kubernetes API, built
and stopped together so the server only holds one object (pod discovery, the StatefulSet scaler the
rollout engine calls, and recovery of replaced shard pods)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kubernetes import client as kclient

from coordinator.kube_recovery import ClusterRecovery
from coordinator.kubernetes import KubeSettings, ShardPodWatcher, StatefulSetScaler, api_client
from coordinator.membership import Membership
from coordinator.plan_store import PlanStore
from coordinator.rollout import RolloutEngine

log = logging.getLogger(__name__)


@dataclass
class KubeCluster:
    settings: KubeSettings
    api: kclient.ApiClient
    pods: ShardPodWatcher
    scaler: StatefulSetScaler
    recovery: ClusterRecovery | None = None

    @classmethod
    def connect(cls, settings: KubeSettings) -> KubeCluster:
        """Builds the client (kubeconfig or in-cluster; a bad one is a ValueError at startup). Talks to the API
        server only once started, and then retries: an API server that is down does not stop the coordinator."""
        api = api_client(settings)
        pods = ShardPodWatcher(api, settings)
        return cls(settings, api, pods, StatefulSetScaler(api, settings, pods))

    def start(self, store: PlanStore, membership: Membership, rollouts: RolloutEngine, *,
              tls_ca: str | None = None) -> KubeCluster:
        self.recovery = ClusterRecovery(store, membership, rollouts, tls_ca=tls_ca, pods=self.pods.pods)
        self.pods.on_change = self.recovery.on_pod_change
        self.pods.start()
        self.recovery.start()
        log.info("Kubernetes: watching pods -l %s and scaling StatefulSet %s in namespace %s",
                 self.settings.selector, self.settings.statefulset, self.settings.namespace)
        return self

    def stop(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        self.pods.stop()
        self.api.close()
