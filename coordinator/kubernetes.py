"""The coordinator's view of the cluster through the Kubernetes API (`coordinator serve --kubernetes`).

Two roles, both on the official `kubernetes` client: `ShardPodWatcher` discovers the shard pods by label
selector (list, then watch from the list's resourceVersion; `410 Gone` lists again) and maps each pod's
StatefulSet ordinal to its shard id; `StatefulSetScaler` is the rollout engine's `ShardScaler`, resizing
the shard StatefulSet through its `scale` subresource. Every API call goes through `call`, which turns
the client's exceptions into one `KubeError` naming the verb, the object and what to do (an RBAC refusal
names the missing permission); callers retry with backoff and log each distinct failure once, so a
misconfigured Role or an API server that is down never crashes the coordinator.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import watch as kwatch
from kubernetes.client.exceptions import ApiException

from coordinator.scaling import ScalingError

log = logging.getLogger(__name__)
T = TypeVar("T")
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_STATEFULSET = "embedding-shard"
DEFAULT_SELECTOR = "app.kubernetes.io/component=embedding-shard"


def default_namespace() -> str | None:
    """POD_NAMESPACE (the downward API), else the namespace of the pod's service account, else None."""
    env = os.environ.get("POD_NAMESPACE", "").strip()
    if env:
        return env
    try:
        return NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class KubeSettings:
    """What `serve --kubernetes` watches and scales."""

    namespace: str
    statefulset: str = DEFAULT_STATEFULSET
    selector: str = DEFAULT_SELECTOR
    kubeconfig: str | None = None  # None: in-cluster config (the pod's service account)
    watch_timeout_s: int = 60  # a watch is renewed this often (from the last resourceVersion seen)
    request_timeout_s: float = 10.0
    retry_budget_s: float = 30.0  # a scale request is retried this long before the rollout aborts
    backoff_max_s: float = 10.0


class KubeErrorKind(enum.Enum):
    FORBIDDEN = "forbidden"  # 401/403: RBAC or credentials
    UNREACHABLE = "unreachable"  # no answer: connection refused, timeout, DNS, TLS
    NOT_FOUND = "not found"
    GONE = "gone"  # 410: a watch's resourceVersion is too old; list again
    CONFLICT = "conflict"
    OTHER = "error"


@dataclass
class KubeError(Exception):
    """One failed API call, readable as it stands: the verb, the object, the status and what to do."""

    kind: KubeErrorKind
    verb: str
    obj: str
    detail: str
    status: int | None = None

    def __str__(self) -> str:
        head = f"Kubernetes API: {self.verb} {self.obj}: "
        if self.kind == KubeErrorKind.FORBIDDEN:
            return (head + f"refused ({self.status} {self.detail}); the coordinator's ServiceAccount needs "
                    f"'{self.verb}' on it (Role/RoleBinding)")
        if self.kind == KubeErrorKind.UNREACHABLE:
            return head + f"API server unreachable ({self.detail}); retrying"
        status = f"{self.status} " if self.status is not None else ""
        return head + f"{self.kind.value} ({status}{self.detail})"

    def key(self) -> tuple:
        """What makes two failures the same for logging: an outage is one, whatever the verb."""
        return (self.kind, self.obj) if self.kind == KubeErrorKind.UNREACHABLE else (self.kind, self.verb, self.obj)


_KIND_BY_STATUS = {401: KubeErrorKind.FORBIDDEN, 403: KubeErrorKind.FORBIDDEN, 404: KubeErrorKind.NOT_FOUND,
                   409: KubeErrorKind.CONFLICT, 410: KubeErrorKind.GONE}


def call(verb: str, obj: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs one API call; every failure comes out as a KubeError."""
    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        if e.status in (0, None):  # the client wraps some transport failures this way
            raise KubeError(KubeErrorKind.UNREACHABLE, verb, obj, str(e.reason)) from None
        kind = _KIND_BY_STATUS.get(e.status, KubeErrorKind.OTHER)
        if e.status >= 500:
            kind = KubeErrorKind.UNREACHABLE  # the API server (or its proxy) is not serving: the same retry
        raise KubeError(kind, verb, obj, str(e.reason).strip() or "no reason", e.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
            e = e.reason
        raise KubeError(KubeErrorKind.UNREACHABLE, verb, obj, f"{type(e).__name__}: {e}") from None


class ErrorLog:
    """Logs each distinct failure once (and once again when it clears), so a retry loop does not flood."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.current: KubeError | None = None

    def failed(self, e: KubeError) -> None:
        if self.current is None or self.current.key() != e.key():
            self.logger.error("%s", e)
        self.current = e

    def ok(self, what: str) -> None:
        if self.current is not None:
            self.logger.info("Kubernetes API: %s works again", what)
        self.current = None


class Backoff:
    """Exponential backoff with a ceiling; reset after a success."""

    def __init__(self, first_s: float = 0.2, max_s: float = 10.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.next_s = first_s

    def delay(self) -> float:
        d = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return d

    def reset(self) -> None:
        self.next_s = self.first_s


def api_client(settings: KubeSettings) -> kclient.ApiClient:
    """An ApiClient of its own (never the client's global default): a kubeconfig file, or in-cluster."""
    configuration = kclient.Configuration()
    configuration.retries = 0  # the callers retry with backoff and log once; urllib3 would warn on every try
    if settings.kubeconfig:
        try:
            return kconfig.new_client_from_config(config_file=settings.kubeconfig, persist_config=False,
                                                  client_configuration=configuration)
        except Exception as e:  # the loader raises ConfigException, OSError or yaml errors
            raise ValueError(f"--kubeconfig {settings.kubeconfig}: {e}") from None
    try:
        kconfig.load_incluster_config(client_configuration=configuration)
    except kconfig.ConfigException as e:
        raise ValueError(f"--kubernetes: not running in a pod ({e}); give --kubeconfig PATH") from None
    return kclient.ApiClient(configuration)


# -- discovery -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPod:
    """One shard pod as the API server last described it. Its StatefulSet ordinal is its shard id."""

    name: str
    ordinal: int
    uid: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    pod_ip: str
    deleting: bool  # deletionTimestamp set: terminating

    @property
    def shard_id(self) -> int:
        return self.ordinal


def ordinal_of(pod_name: str, statefulset: str) -> int | None:
    """`<statefulset>-<ordinal>` -> ordinal; None for a pod that is not one of the StatefulSet's."""
    m = re.fullmatch(re.escape(statefulset) + r"-(\d+)", pod_name)
    return int(m.group(1)) if m else None


def _shard_pod(raw: dict, statefulset: str) -> ShardPod | None:
    meta, status = raw.get("metadata") or {}, raw.get("status") or {}
    ordinal = ordinal_of(meta.get("name", ""), statefulset)
    if ordinal is None:
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ShardPod(name=meta["name"], ordinal=ordinal, uid=meta.get("uid", ""), phase=status.get("phase", "Unknown"),
                    ready=ready, pod_ip=status.get("podIP", ""), deleting=bool(meta.get("deletionTimestamp")))


class ShardPodWatcher:
    """Keeps `pods()` (ordinal -> ShardPod) current: list, then watch from the list's resourceVersion,
    renewing the watch from the last version seen; a 410 (the version was compacted) lists again. Failures
    (403, API server down) are logged once and retried with backoff; the last one is in `error`."""

    def __init__(self, api: kclient.ApiClient, settings: KubeSettings,
                 on_change: Callable[[str, ShardPod], None] | None = None) -> None:
        self.core = kclient.CoreV1Api(api)
        self.settings = settings
        self.on_change = on_change  # (event type, pod): for logs and recovery
        self._pods: dict[int, ShardPod] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch: kwatch.Watch | None = None
        self._errors = ErrorLog(log)
        self.error: KubeError | None = None
        self.lists = 0  # full lists so far (1 + relists after 410 or failures)
        self.synced = threading.Event()  # set after the first successful list
        self._thread = threading.Thread(target=self._run, name="shard-pod-watcher", daemon=True)

    @property
    def obj(self) -> str:
        return f"pods -l {self.settings.selector} in namespace {self.settings.namespace}"

    def start(self) -> ShardPodWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        self._thread.join(timeout=self.settings.request_timeout_s + 2)

    def pods(self) -> dict[int, ShardPod]:
        with self._cond:
            return dict(self._pods)

    def wait_for(self, predicate: Callable[[dict[int, ShardPod]], bool], timeout_s: float) -> bool:
        """Blocks until `predicate(pods)` holds (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(dict(self._pods)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def _run(self) -> None:
        backoff = Backoff(max_s=self.settings.backoff_max_s)
        gone = Backoff(first_s=0.05, max_s=self.settings.backoff_max_s)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch_from(version)
                self._errors.ok(f"watch {self.obj}")
                self.error = None
                backoff.reset()
                gone.reset()
            except KubeError as e:
                if self._stop.is_set():
                    break
                if e.kind == KubeErrorKind.GONE:
                    log.info("watch %s: resourceVersion %s is gone (410): listing again", self.obj, version)
                    version = None
                    self._stop.wait(gone.delay())  # 410 again and again would otherwise spin
                    continue
                self.error = e
                self._errors.failed(e)
                version = None  # after an outage the watch may have missed events: list again
                self._stop.wait(backoff.delay())

    def _list(self) -> str:
        s = self.settings
        result = call("list", self.obj, self.core.list_namespaced_pod, s.namespace, label_selector=s.selector,
                      _request_timeout=s.request_timeout_s)
        sanitize = self.core.api_client.sanitize_for_serialization
        pods = {}
        for item in result.items or []:
            pod = _shard_pod(sanitize(item), s.statefulset)
            if pod is not None:
                pods[pod.ordinal] = pod
        version = result.metadata.resource_version
        with self._cond:
            old, self._pods = self._pods, pods
            self._cond.notify_all()
        self.lists += 1
        self.synced.set()
        self._errors.ok(f"list {self.obj}")
        for ordinal, pod in pods.items():
            if old.get(ordinal) != pod:
                self._changed("ADDED" if ordinal not in old else "MODIFIED", pod)
        for ordinal, pod in old.items():
            if ordinal not in pods:
                self._changed("DELETED", pod)
        log.info("listed %d shard pods (resourceVersion %s): %s", len(pods), version,
                 ", ".join(f"{p.name} {p.phase}{' ready' if p.ready else ''}" for p in pods.values()) or "none")
        return version

    def _watch_from(self, version: str) -> str:
        """Applies watch events until the server ends the watch; returns the last resourceVersion seen."""
        s = self.settings
        w = kwatch.Watch()
        self._watch = w
        stream = w.stream(self.core.list_namespaced_pod, s.namespace, label_selector=s.selector,
                          resource_version=version, timeout_seconds=s.watch_timeout_s, allow_watch_bookmarks=True,
                          _request_timeout=(s.request_timeout_s, s.watch_timeout_s + s.request_timeout_s))
        try:
            while not self._stop.is_set():
                event = call("watch", self.obj, next, stream, None)
                if event is None:
                    break
                kind, raw = event["type"], event["raw_object"]
                version = (raw.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                pod = _shard_pod(raw, s.statefulset)
                if pod is None:
                    continue
                with self._cond:
                    if kind == "DELETED":
                        if self._pods.get(pod.ordinal, pod).uid == pod.uid:
                            self._pods.pop(pod.ordinal, None)
                    else:
                        self._pods[pod.ordinal] = pod
                    self._cond.notify_all()
                self._changed(kind, pod)
        finally:
            w.stop()
            self._watch = None
        return version

    def _changed(self, kind: str, pod: ShardPod) -> None:
        log.info("shard pod %s (shard %d): %s, %s%s", pod.name, pod.shard_id, kind.lower(), pod.phase,
                 ", ready" if pod.ready else "")
        if self.on_change is not None:
            try:
                self.on_change(kind, pod)
            except Exception:
                log.exception("shard pod %s: listener failed", pod.name)


# -- scaling ---------------------------------------------------------------------------------------
class StatefulSetScaler:
    """`ShardScaler` over the shard StatefulSet's `scale` subresource (read and patch only, so the Role
    needs nothing on the StatefulSet itself). Transient failures are retried for `retry_budget_s`."""

    elastic = True

    def __init__(self, api: kclient.ApiClient, settings: KubeSettings,
                 pods: ShardPodWatcher | None = None) -> None:
        self.apps = kclient.AppsV1Api(api)
        self.settings = settings
        self.pods = pods
        self._errors = ErrorLog(log)

    @property
    def obj(self) -> str:
        return f"statefulsets/{self.settings.statefulset}/scale in namespace {self.settings.namespace}"

    def describe(self) -> str:
        return f"StatefulSet {self.settings.namespace}/{self.settings.statefulset}"

    def replicas(self) -> int | None:
        s = self.settings
        scale = self._retry("get", lambda: self.apps.read_namespaced_stateful_set_scale(
            s.statefulset, s.namespace, _request_timeout=s.request_timeout_s))
        return int(scale.spec.replicas or 0)

    def scale_to(self, replicas: int) -> None:
        if replicas < 0:
            raise ScalingError(f"{self.describe()}: replicas must be >= 0, got {replicas}")
        s = self.settings
        self._retry("patch", lambda: self.apps.patch_namespaced_stateful_set_scale(
            s.statefulset, s.namespace, {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json", _request_timeout=s.request_timeout_s))
        log.info("%s scaled to %d replicas", self.describe(), replicas)

    def _retry(self, verb: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.settings.retry_budget_s
        backoff = Backoff(max_s=self.settings.backoff_max_s)
        while True:
            try:
                result = call(verb, self.obj, fn)
            except KubeError as e:
                self._errors.failed(e)
                retriable = e.kind in (KubeErrorKind.UNREACHABLE, KubeErrorKind.FORBIDDEN, KubeErrorKind.CONFLICT)
                delay = backoff.delay()
                if not retriable or time.monotonic() + delay > deadline:
                    raise ScalingError(str(e).removesuffix("; retrying")) from None
                time.sleep(delay)
                continue
            self._errors.ok(f"{verb} {self.obj}")
            return result
