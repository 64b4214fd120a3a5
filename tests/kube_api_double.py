"""A small HTTP test double of the Kubernetes API server, for the coordinator's Kubernetes code.

A real API server cannot run on these machines, so this is the one stand-in the tests allow. It serves
only what the coordinator calls, with the API server's own wire behaviour for each:

- `GET /api/v1/namespaces/{ns}/pods?labelSelector=...`: a PodList with `metadata.resourceVersion`;
- the same with `watch=true&resourceVersion=RV`: a chunked stream of JSON watch events after RV, ended at
  `timeoutSeconds`; an RV older than the compaction point gets the `ERROR` event with a `410` Status (as
  the real server does inside a 200 watch response);
- `GET` / `PATCH /apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale` (merge patch or JSON patch of
  `/spec/replicas`); a scale change plays the StatefulSet controller: pods `<name>-<ordinal>` appear (Running
  and Ready) or go (highest ordinals first), each a watch event; `on_scale` lets a test start real processes;
- switches: `forbid` (verbs answered `403 Forbidden` with a Status body, as RBAC does), `compact()` (older
  resourceVersions become 410), and `stop()` / `start()` (the server goes away and comes back on the same
  port; open watches and kept-alive connections are cut).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

POD_PATH = "/api/v1/namespaces/{ns}/pods"
SCALE_PATH = "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale"


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class KubeApiDouble:
    def __init__(self, namespace: str = "recsys", statefulset: str = "embedding-shard",
                 labels: dict[str, str] | None = None, replicas: int = 0) -> None:
        self.namespace, self.statefulset = namespace, statefulset
        self.labels = labels or {"app.kubernetes.io/component": "embedding-shard"}
        self.cond = threading.Condition()
        self.pods: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.rv = 100
        self.compacted = 0  # resourceVersions at or below this are gone (410)
        self.replicas: dict[str, int] = {statefulset: 0}
        self.forbid: set[str] = set()  # verbs answered 403: list, watch, get, patch
        self.requests: list[tuple[str, str, dict, object]] = []  # (method, path, query, body)
        self.on_scale: Callable[[int, int], None] | None = None  # (old, new) replicas, before pods change
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._generation = 0
        self._watch_epoch = 0
        self.scale_to(replicas)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> KubeApiDouble:
        """Serves on 127.0.0.1 (the same port again after stop())."""
        double = self

        class Handler(_Handler):
            api = double

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """The API server goes away: no listener, every open connection (watches included) cut."""
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.cond:
            self._generation += 1
            conns, self._conns = list(self._conns), set()
            self.cond.notify_all()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing the official client at this double (a bearer token, as a ServiceAccount's)."""
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "double",
               "clusters": [{"name": "double", "cluster": {"server": self.url}}],
               "users": [{"name": "coordinator", "user": {"token": "double-token"}}],
               "contexts": [{"name": "double", "context": {"cluster": "double", "user": "coordinator",
                                                            "namespace": self.namespace}}]}
        path.write_text(json.dumps(cfg))
        return path

    # -- state changes (each one a watch event) ------------------------------------------------
    def _event(self, kind: str, pod: dict) -> None:
        self.rv += 1
        pod["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, copy.deepcopy(pod)))
        self.cond.notify_all()

    def add_pod(self, ordinal: int, phase: str = "Running", ready: bool = True) -> dict:
        name = f"{self.statefulset}-{ordinal}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": self.namespace, "uid": uuid.uuid4().hex,
                            "labels": dict(self.labels, **{"apps.kubernetes.io/pod-index": str(ordinal)})},
               "status": {"phase": phase, "podIP": f"10.0.0.{10 + ordinal}",
                          "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
        with self.cond:
            kind = "MODIFIED" if name in self.pods else "ADDED"
            self.pods[name] = pod
            self._event(kind, pod)
        return pod

    def set_pod(self, ordinal: int, phase: str, ready: bool) -> None:
        with self.cond:
            pod = self.pods[f"{self.statefulset}-{ordinal}"]
            pod["status"]["phase"] = phase
            pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
            self._event("MODIFIED", pod)

    def delete_pod(self, ordinal: int) -> None:
        with self.cond:
            pod = self.pods.pop(f"{self.statefulset}-{ordinal}")
            self._event("DELETED", pod)

    def add_foreign_pod(self, name: str) -> None:
        """A pod that matches the selector but is not one of the StatefulSet's (ignored by discovery)."""
        with self.cond:
            pod = {"metadata": {"name": name, "namespace": self.namespace, "uid": uuid.uuid4().hex,
                                "labels": dict(self.labels)}, "status": {"phase": "Running"}}
            self.pods[name] = pod
            self._event("ADDED", pod)

    def scale_to(self, replicas: int, name: str | None = None) -> None:
        """What the StatefulSet controller does for a new spec.replicas: create or delete pods."""
        name = name or self.statefulset
        old = self.replicas.get(name, 0)
        if self.on_scale is not None and old != replicas:
            self.on_scale(old, replicas)
        self.replicas[name] = replicas
        for i in range(old, replicas):
            self.add_pod(i)
        for i in reversed(range(replicas, old)):
            if f"{name}-{i}" in self.pods:
                self.delete_pod(i)

    def compact(self) -> None:
        """Every resourceVersion seen so far becomes too old to watch from (410 Gone)."""
        with self.cond:
            self.compacted = self.rv
            self.rv += 1  # a list from now on returns a version that can be watched from
            self.events.clear()
            self._watch_epoch += 1  # open watches end (as when the API server's watch cache restarts)
            self.cond.notify_all()

    def count(self, method: str, path_part: str, **query: str) -> int:
        return sum(1 for m, p, q, _ in self.requests if m == method and path_part in p
                   and all(q.get(k) == v for k, v in query.items()))


class _Handler(BaseHTTPRequestHandler):
    api: KubeApiDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.api.cond:
            self.api._conns.add(self.connection)
            self.generation = self.api._generation

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.api.cond:
                self.api._conns.discard(self.connection)

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        api = self.api
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = None
        if method == "PATCH":
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = json.loads(raw or b"null")
        api.requests.append((method, url.path, query, body))
        pods = POD_PATH.format(ns=api.namespace)
        scale_prefix = f"/apis/apps/v1/namespaces/{api.namespace}/statefulsets/"
        if url.path == pods and method == "GET":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
            if verb in api.forbid:
                return self._forbidden(verb, "pods")
            return self._watch(query) if verb == "watch" else self._list(query)
        if url.path.startswith(scale_prefix) and url.path.endswith("/scale"):
            name = url.path[len(scale_prefix):-len("/scale")]
            verb = "get" if method == "GET" else "patch"
            if verb in api.forbid:
                return self._forbidden(verb, "statefulsets/scale", name)
            if name not in api.replicas:
                return self._send(404, _status(404, "NotFound", f'statefulsets.apps "{name}" not found'))
            if method == "PATCH":
                replicas = self._patched_replicas(body)
                if replicas is None:
                    return self._send(422, _status(422, "Invalid", "spec.replicas: expected an integer"))
                api.scale_to(replicas, name)
            return self._send(200, self._scale(name))
        return self._send(404, _status(404, "NotFound", f"the double does not serve {method} {url.path}"))

    def _forbidden(self, verb: str, resource: str, name: str = "") -> None:
        what = f'{resource} "{name}"' if name else resource
        msg = (f'{what} is forbidden: User "system:serviceaccount:{self.api.namespace}:coordinator" cannot {verb} '
               f'resource "{resource}" in API group "" in the namespace "{self.api.namespace}"')
        self._send(403, _status(403, "Forbidden", msg))

    @staticmethod
    def _patched_replicas(body) -> int | None:
        if isinstance(body, dict):
            value = (body.get("spec") or {}).get("replicas")
        elif isinstance(body, list):
            value = next((op.get("value") for op in body if op.get("path") == "/spec/replicas"), None)
        else:
            value = None
        return value if isinstance(value, int) and value >= 0 else None

    def _scale(self, name: str) -> dict:
        api = self.api
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": api.namespace, "resourceVersion": str(api.rv)},
                "spec": {"replicas": api.replicas[name]},
                "status": {"replicas": api.replicas[name], "selector": ",".join(f"{k}={v}" for k, v in
                                                                                 api.labels.items())}}

    def _list(self, query: dict) -> None:
        api = self.api
        sel = query.get("labelSelector", "")
        with api.cond:
            items = [copy.deepcopy(p) for p in api.pods.values() if _matches(p["metadata"].get("labels", {}), sel)]
            rv = api.rv
        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)},
                         "items": items})

    def _chunk(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, query: dict) -> None:
        api = self.api
        sel = query.get("labelSelector", "")
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        epoch = api._watch_epoch
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            with api.cond:
                if since and since <= api.compacted:
                    gone = _status(410, "Expired", f"too old resource version: {since} ({api.compacted + 1})")
                    self._chunk({"type": "ERROR", "object": gone})
                    self.wfile.write(b"0\r\n\r\n")
                    return
            while time.monotonic() < deadline:
                with api.cond:
                    if self.generation != api._generation:
                        return  # the server went away: the connection is already cut
                    if epoch != api._watch_epoch:
                        break
                    pending = [(rv, k, p) for rv, k, p in api.events if rv > since]
                    if not pending:
                        api.cond.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                for rv, kind, pod in pending:
                    since = rv
                    if _matches(pod["metadata"].get("labels", {}), sel):
                        self._chunk({"type": kind, "object": pod})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self._route("GET")

    def do_PATCH(self) -> None:
        self._route("PATCH")
