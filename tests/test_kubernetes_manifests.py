"""The Kubernetes manifests and the image, checked offline against the official schemas and the code.

No API server or container daemon runs here, so every overlay is rendered with `kubectl kustomize`
and validated in strict mode against the oldest supported Kubernetes (1.27: native gRPC probes are
GA) and the newest schema kubernetes-validate ships. Then the manifests are held to the code so the
two cannot drift: container commands parse with the real CLI parsers, ports are ones the processes
bind, probes name services the servers register with gRPC health (started for real), env vars are
read by the code, NetworkPolicies allow exactly the paths the system uses, and shard memory covers
the plan's tables. Missing kubectl or kubernetes-validate is a failure, not a skip.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netpol import Endpoint, PolicySet, selector_matches

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "dev"]
OLDEST_VERSION = "1.27.0"  # grpc probes are GA from 1.27
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")
OUR_COMMANDS = {"embedding-shard", "trainer", "coordinator", "inference-gateway", "torchrun"}
PACKAGES = ("protos", "embedding_service", "trainer", "coordinator", "inference_gateway")
# kubelet expands $(VAR) in command/args from the container's env; sample values for parsing
SAMPLE_ENV = {"POD_NAME": "embedding-shard-0", "POD_NAMESPACE": "recsys", "JOB_COMPLETION_INDEX": "1"}
SHARD_OVERHEAD_BYTES = 768 << 20  # see base/shards.yaml: runtime (~285 MiB standby RSS) + migration chunks
EPHEMERAL_PORT = 40000  # stands for the ports gloo / NCCL pick themselves


# -- rendering ----------------------------------------------------------------------------------
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl (with kustomize) is not installed: the manifests cannot be rendered")
    return path


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(KUBE / "overlays" / overlay))


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(overlay) if d["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in objects(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [d for d in render(overlay) if d["kind"] in WORKLOADS]


def template(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return template(workload)["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return template(workload)["metadata"].get("labels", {})


def containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def component(workload: dict[str, Any]) -> str:
    return pod_labels(workload)["app.kubernetes.io/component"]


def workload_of(overlay: str, comp: str) -> dict[str, Any]:
    found = [w for w in workloads(overlay) if component(w) == comp]
    assert len(found) == 1, f"{overlay}: expected one workload of {comp}"
    return found[0]


def is_ours(container: dict[str, Any]) -> bool:
    return "recsys-ps" in container["image"]


# -- the real CLI parsers -------------------------------------------------------------------------
@dataclass
class Parsed:
    program: str  # embedding-shard, trainer, coordinator, inference-gateway
    args: Any  # the component parser's namespace
    torchrun: Any = None  # torch.distributed.run's namespace when wrapped


def expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's env"
        return SAMPLE_ENV.get(m.group(1), "x")

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def parse_container(container: dict[str, Any]) -> Parsed:
    """Parses command + args exactly as the image's console scripts would (SystemExit = a bad manifest)."""
    env = {e["name"]: e for e in container.get("env") or []}
    argv = [expand(a, env) for a in [*container["command"], *(container.get("args") or [])]]
    program, rest = argv[0], argv[1:]
    assert program in OUR_COMMANDS, f"{container['name']}: {program} is not one of the image's console scripts"
    torchrun = None
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        torchrun = get_args_parser().parse_args(rest)
        assert torchrun.module and torchrun.training_script == "trainer.cli", "torchrun must run -m trainer.cli"
        program, rest = "trainer", list(torchrun.training_script_args)
    parser = _parsers()[program]()
    try:
        ns = parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"{container['name']}: `{program} {shlex.join(rest)}` does not parse")
    return Parsed(program, ns, torchrun)


def _parsers():
    from coordinator.cli import build_parser as coordinator_parser
    from embedding_service.cli import build_parser as shard_parser
    from inference_gateway.cli import build_parser as gateway_parser
    from trainer.cli import build_parser as trainer_parser

    return {"embedding-shard": shard_parser, "trainer": trainer_parser, "coordinator": coordinator_parser,
            "inference-gateway": gateway_parser}


def bound_ports(container: dict[str, Any]) -> set[int]:
    """The TCP ports the container's process listens on, from its own arguments."""
    if not is_ours(container):  # redis: --port, default 6379
        args = container.get("args") or []
        return {int(args[args.index("--port") + 1]) if "--port" in args else 6379}
    parsed = parse_container(container)
    if parsed.torchrun is not None:
        return {parsed.torchrun.master_port}  # torchrun's store (on node rank 0)
    if parsed.program == "trainer":
        return set()
    ports = (parsed.args.port, parsed.args.metrics_port, getattr(parsed.args, "predict_port", None),
             getattr(parsed.args, "management_port", None))  # serve-triton: four ports
    return {p for p in ports if p is not None and p > 0}


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports") or [] if "name" in p}


def resolve_port(port: int | str, container: dict[str, Any]) -> int | None:
    return port if isinstance(port, int) else named_ports(container).get(port)


# -- 1. schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    kv = _kubernetes_validate()
    newest = kv.latest_version()
    versions = [OLDEST_VERSION, newest]
    assert tuple(map(int, newest.split(".")[:2])) >= (1, 33), f"kubernetes-validate ships schemas up to {newest} only"
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "StatefulSet", "Deployment", "Job", "Service", "ConfigMap", "Secret", "NetworkPolicy",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceAccount", "Role", "RoleBinding",
            "PersistentVolumeClaim"} <= kinds
    errors = []
    for version in versions:
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except Exception as e:  # collect every failure with its object
                errors.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {type(e).__name__}: {e}")
    assert not errors, "\n".join(errors)
    assert all(d["metadata"].get("namespace") == "recsys" for d in docs if d["kind"] != "Namespace")


def test_servicemonitor_is_an_optional_component(tmp_path):
    assert not any(d["kind"] == "ServiceMonitor" for o in OVERLAYS for d in render(o))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "recsys",
        # kustomize refuses absolute paths
        "resources": [os.path.relpath(KUBE / "overlays" / "cpu", tmp_path)],
        "components": [os.path.relpath(KUBE / "components" / "servicemonitor", tmp_path)]}))
    docs = _kustomize(tmp_path)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    scraped = [s for s in docs if s["kind"] == "Service"
               and selector_matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
    assert {s["metadata"]["name"] for s in scraped} == {"coordinator", "embedding-shard", "inference-gateway"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)


# -- 2. commands, ports, probes, env ----------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_parses_with_the_real_cli(overlay):
    programs = set()
    for w in workloads(overlay):
        for c in containers(w):
            if is_ours(c):
                programs.add(parse_container(c).program)
    assert programs == {"embedding-shard", "trainer", "coordinator", "inference-gateway"}
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    assert programs <= scripts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_declared_probed_served_and_scraped_port_is_bound(overlay):
    for w in workloads(overlay):
        for c in containers(w, init=False):
            bound = bound_ports(c)
            where = f"{overlay} {w['metadata']['name']}/{c['name']}"
            assert {p["containerPort"] for p in c.get("ports") or []} <= bound, where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe) or {}
                for kind in ("grpc", "tcpSocket", "httpGet"):
                    if kind in spec:
                        assert resolve_port(spec[kind]["port"], c) in bound, f"{where} {probe}"
        annotations = template(w)["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") == "true":
            metrics = {parse_container(c).args.metrics_port for c in containers(w, init=False) if is_ours(c)}
            assert int(annotations["prometheus.io/port"]) in metrics, w["metadata"]["name"]
        elif is_ours(containers(w, init=False)[0]) and component(w) not in ("trainer", "model-export"):
            pytest.fail(f"{w['metadata']['name']}: exports metrics but has no prometheus.io annotations")
    for svc in objects(overlay, "Service"):
        selected = [w for w in workloads(overlay) if selector_matches({"matchLabels": svc["spec"]["selector"]},
                                                                        pod_labels(w))]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for w in selected:
                assert any(resolve_port(port.get("targetPort", port["port"]), c) in bound_ports(c)
                           for c in containers(w, init=False)), f"Service {svc['metadata']['name']} {port}"


@pytest.fixture(scope="module")
def live_servers(tmp_path_factory):
    """One real shard, coordinator and gateway, started from the cpu overlay's arguments with only the
    cluster-specific ones (bind address, ports, peers, volumes) replaced for loopback; for each, its
    manifest's container ports -> the ports it bound here."""
    from protos.process import start_announced

    drop = {"--host", "--port", "--metrics-port", "--coordinator", "--advertise", "--redis", "--initial-plan",
            "--kubernetes", "--kube-namespace", "--shard-statefulset", "--shard-selector", "--model",
            "--shard-id-from-hostname", "--predict-port", "--management-port", "--workdir"}
    modules = {"embedding-shard": "embedding_service.cli", "coordinator": "coordinator.cli",
               "inference-gateway": "inference_gateway.cli"}
    running = {}
    try:
        for comp in ("embedding-shard", "coordinator", "inference-gateway"):
            (c,) = [c for c in containers(workload_of("cpu", comp), init=False)]
            args = [a for a in c["args"] if a.split("=", 1)[0] not in drop]
            args += ["--host=127.0.0.1", "--port=0", "--metrics-port=-1"]
            wd = tmp_path_factory.mktemp(comp)
            if comp == "coordinator":
                args += [f"--data-dir={wd}"]
            if comp == "inference-gateway":  # serve-native, without a model (the export has not run)
                args += ["--management-port=0", f"--workdir={wd / 'native'}"]
            proc, msg = start_announced([modules[comp], *args], wd, what=comp, timeout=300)
            live = {}
            for flag, key in (("--port", "port"), ("--predict-port", "predict_port"),
                              ("--management-port", "management_port")):
                manifest = next((int(a.split("=", 1)[1]) for a in c["args"] if a.startswith(f"{flag}=")), None)
                if manifest is not None:
                    live[manifest] = msg[key]
            running[comp] = (proc, live)
        yield {comp: ports for comp, (_, ports) in running.items()}
    finally:
        for proc, _ in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_grpc_probes_name_services_the_servers_register(live_servers):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    expected = {"embedding-shard": health_pb2.HealthCheckResponse.SERVING,
                "coordinator": health_pb2.HealthCheckResponse.SERVING,
                # the gateway registers its service NOT_SERVING until a model is loaded
                "inference-gateway": health_pb2.HealthCheckResponse.NOT_SERVING}
    checked = 0
    for overlay in OVERLAYS:
        for w in workloads(overlay):
            for c in containers(w, init=False):
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    grpc_probe = (c.get(probe) or {}).get("grpc")
                    if grpc_probe is None:
                        continue
                    comp = component(w)
                    port = live_servers[comp][resolve_port(grpc_probe["port"], c)]
                    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                        stub = health_pb2_grpc.HealthStub(channel)
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=grpc_probe.get("service", "")),
                                           timeout=10)  # an unregistered name raises NOT_FOUND
                    assert reply.status == expected[comp], f"{overlay} {comp} {probe} {grpc_probe}"
                    checked += 1
    assert checked >= 3 * 6
    with grpc.insecure_channel(f"127.0.0.1:{live_servers['embedding-shard'][50051]}") as channel, \
            pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # the check above could fail


@functools.cache
def _source_text(*packages: str) -> str:
    return "\n".join(p.read_text() for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


@functools.cache
def _torch_distributed_source() -> str:
    import torch

    return "\n".join(p.read_text() for p in (Path(torch.__file__).parent / "distributed").rglob("*.py"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_is_read(overlay):
    ours = _source_text(*PACKAGES)
    for w in workloads(overlay):
        for c in containers(w):
            text = json.dumps([c.get("command"), c.get("args"), c.get("readinessProbe"), c.get("livenessProbe")])
            for env in c.get("env") or []:
                name = env["name"]
                referenced = f"$({name})" in text or (not is_ours(c) and f"${name}" in text)
                if is_ours(c):
                    read = (re.search(rf"['\"]{name}['\"]", ours) is not None
                            or (name in ("MASTER_ADDR", "MASTER_PORT") and f'"{name}"' in _torch_distributed_source())
                            or name.startswith("NCCL_"))  # read by libnccl itself
                    assert read or referenced, f"{overlay} {c['name']}: env {name} is read by nothing"
                else:
                    assert referenced, f"{overlay} {c['name']}: env {name} is referenced by nothing"


# -- 3. network paths -----------------------------------------------------------------------------
OUTSIDE = Endpoint("external", None, ip="203.0.113.10")
API_SERVER = Endpoint("api-server", None, ip="172.18.0.2", ports={"https": 6443})
MONITORING = Endpoint("monitoring", "monitoring", {"app.kubernetes.io/name": "prometheus"},
                      {"kubernetes.io/metadata.name": "monitoring"})
KUBE_DNS = Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"},
                    {"dns": 53})
BASE_PATHS = {
    ("trainer", "embedding-shard", 50051), ("coordinator", "embedding-shard", 50051),
    ("embedding-shard", "embedding-shard", 50051),
    ("trainer", "coordinator", 50050), ("embedding-shard", "coordinator", 50050),
    ("coordinator", "redis", 6379),
    ("trainer", "trainer", 29500), ("trainer", "trainer", EPHEMERAL_PORT),
    ("external", "inference-gateway", 50052), ("monitoring", "inference-gateway", 50052),  # public to all
    ("monitoring", "coordinator", 9090), ("monitoring", "embedding-shard", 9100),
    ("monitoring", "inference-gateway", 9102),
}


def _pods(overlay: str) -> dict[str, Endpoint]:
    pods = {}
    for w in workloads(overlay):
        ports = {}
        for c in containers(w, init=False):
            ports.update(named_ports(c))
        namespace = w["metadata"]["namespace"]
        pods[component(w)] = Endpoint(component(w), namespace, pod_labels(w),
                                      {"kubernetes.io/metadata.name": namespace}, ports)
    return pods


def _open_paths(overlay: str, egress: bool = True) -> set[tuple[str, str, int]]:
    """Every (source, destination, port) the policies allow, over every pod, its bound ports and one
    ephemeral port, from every pod, the outside and the monitoring namespace (egress=False: what the
    destinations' ingress rules alone allow)."""
    policies = PolicySet(objects(overlay, "NetworkPolicy"))
    pods = _pods(overlay)
    sources = [*pods.values(), OUTSIDE, MONITORING]
    paths = set()
    for dst in pods.values():
        for port in {*dst.ports.values(), EPHEMERAL_PORT}:
            paths |= {(src.name, dst.name, port) for src in sources if policies.allowed(src, dst, port, egress=egress)}
    return paths


def test_network_policy_evaluator_semantics():
    """The evaluator itself, on policies whose meaning is known."""
    a = Endpoint("a", "ns", {"app": "a"}, ports={"grpc": 1})
    b = Endpoint("b", "ns", {"app": "b"}, ports={"grpc": 2})
    assert PolicySet([]).allowed(a, b, 2)  # nothing isolates: everything flows
    deny = {"metadata": {"name": "deny", "namespace": "ns"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not PolicySet([deny]).allowed(a, b, 2)
    allow = {"metadata": {"name": "b", "namespace": "ns"},
             "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                   "ports": [{"port": "grpc"}]}]}}
    assert PolicySet([deny, allow]).allowed(a, b, 2) and not PolicySet([deny, allow]).allowed(a, b, 3)
    assert not PolicySet([deny, allow]).allowed(b, a, 1) and not PolicySet([deny, allow]).allowed(OUTSIDE, b, 2)
    other_ns = Endpoint("a", "other", {"app": "a"})
    assert not PolicySet([deny, allow]).allowed(other_ns, b, 2)  # podSelector alone: the policy's namespace
    egress_deny = {"metadata": {"name": "e", "namespace": "ns"},
                   "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}}
    assert not PolicySet([deny, allow, egress_deny]).allowed(a, b, 2)  # both ends must allow


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_paths_the_system_uses(overlay):
    policies = PolicySet(objects(overlay, "NetworkPolicy"))
    pods = _pods(overlay)
    for policy in objects(overlay, "NetworkPolicy"):
        assert any(policies.selects(policy, p) for p in pods.values()), f"{policy['metadata']['name']} selects no pod"
        for rule in [*(policy["spec"].get("ingress") or []), *(policy["spec"].get("egress") or [])]:
            for peer in [*(rule.get("from") or []), *(rule.get("to") or [])]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selector_matches(peer["podSelector"], p.labels) for p in pods.values()), \
                        f"{policy['metadata']['name']}: a peer selects no pod"
    # every port a policy names is bound: by a pod it selects (ingress) or by a pod of its peers (egress)
    bound = {name: {p for w in workloads(overlay) if component(w) == name for c in containers(w, init=False)
                    for p in bound_ports(c)} for name in pods}
    for policy in objects(overlay, "NetworkPolicy"):
        selected = [p for p in pods.values() if policies.selects(policy, p)]
        for direction, key in (("ingress", None), ("egress", "to")):
            for rule in policy["spec"].get(direction) or []:
                targets = selected if key is None else [
                    p for p in pods.values() for peer in rule.get(key) or []
                    if "podSelector" in peer and selector_matches(peer["podSelector"], p.labels)]
                if not targets:  # egress to DNS or to the API server's addresses: not our pods
                    continue
                for entry in rule.get("ports") or []:
                    port = entry["port"]
                    assert any((t.ports.get(port) if isinstance(port, str) else port) in bound[t.name]
                               for t in targets), f"{policy['metadata']['name']} {direction}: port {port} unbound"
    expected = set(BASE_PATHS)
    if overlay == "gpu":  # one torch.distributed group: trainers and shards on every port
        group = ("trainer", "embedding-shard")
        expected |= {(s, d, p) for s in group for d in group for p in {*pods[d].ports.values(), EPHEMERAL_PORT}}
    opened = _open_paths(overlay)
    assert opened - expected == set(), f"{overlay}: open but not needed"
    assert expected - opened == set(), f"{overlay}: needed but closed"
    # each side holds on its own: ingress alone opens nothing more, except the public gateway ports
    public = {(p.name, "inference-gateway", 50052) for p in pods.values()}
    assert _open_paths(overlay, egress=False) == expected | public, f"{overlay}: ingress rules alone"
    for name in ("trainer", "inference-gateway", "embedding-shard"):  # spelled out: the forbidden ones
        assert not policies.allowed(pods[name], pods["redis"], 6379)
    assert not policies.allowed(OUTSIDE, pods["embedding-shard"], 50051)
    assert not policies.allowed(OUTSIDE, pods["inference-gateway"], 9102)
    assert not policies.allowed(OUTSIDE, pods["inference-gateway"], 50053)  # management: port-forward only
    assert not policies.allowed(pods["trainer"], pods["inference-gateway"], 50053)
    for pod in pods.values():
        assert policies.allowed(pod, KUBE_DNS, 53, "UDP") and policies.allowed(pod, KUBE_DNS, 53, "TCP"), pod.name
        assert policies.allowed(pod, API_SERVER, 6443) == (pod.name == "coordinator"), pod.name


# -- 4. security, identity, wiring -------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_profile(overlay):
    namespace = one(overlay, "Namespace", "recsys")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    allowed_volumes = {"configMap", "emptyDir", "projected", "secret", "downwardAPI", "persistentVolumeClaim",
                       "ephemeral", "csi", "name"}
    for w in workloads(overlay):
        spec, name = pod_spec(w), w["metadata"]["name"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for v in spec.get("volumes") or []:
            assert set(v) <= allowed_volumes, f"{name}: volume {v}"
        mounted = {v["name"] for v in spec.get("volumes") or []} | {
            t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert not sc.get("privileged") and not any(p.get("hostPort") for p in c.get("ports") or []), name
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts") or []}, f"{name}: no writable /tmp"
            assert {m["name"] for m in c.get("volumeMounts") or []} <= mounted
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], name
        # only the coordinator talks to the API server
        assert (spec.get("serviceAccountName") == "coordinator") == (component(w) == "coordinator"), name
        if component(w) != "coordinator":
            assert spec["automountServiceAccountToken"] is False, name


def test_the_image_user_is_the_manifests_user():
    user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert user and int(user.group(1)) != 0
    for w in workloads("cpu"):
        if is_ours(containers(w)[0]):
            assert pod_spec(w)["securityContext"]["runAsUser"] == int(user.group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_rbac_is_least_privilege_and_names_the_shard_statefulset(overlay):
    coord = parse_container(containers(workload_of(overlay, "coordinator"))[0]).args
    shards = workload_of(overlay, "embedding-shard")
    assert coord.kubernetes and coord.kube_namespace == SAMPLE_ENV["POD_NAMESPACE"]
    assert coord.shard_statefulset == shards["metadata"]["name"] and shards["kind"] == "StatefulSet"
    key, _, value = coord.shard_selector.partition("=")
    assert selector_matches({"matchLabels": {key: value}}, pod_labels(shards))
    assert not any(selector_matches({"matchLabels": {key: value}}, pod_labels(w))
                   for w in workloads(overlay) if w is not shards)
    (role,) = objects(overlay, "Role")
    assert not objects(overlay, "ClusterRole") and not objects(overlay, "ClusterRoleBinding")
    grants = {(g, r, v, tuple(rule.get("resourceNames") or ())) for rule in role["rules"]
              for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    name = (coord.shard_statefulset,)
    assert grants == {("", "pods", "get", ()), ("", "pods", "list", ()), ("", "pods", "watch", ()),
                      ("apps", "statefulsets", "get", name), ("apps", "statefulsets/scale", "get", name),
                      ("apps", "statefulsets/scale", "patch", name), ("apps", "statefulsets/scale", "update", name)}
    (binding,) = objects(overlay, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    deployment = workload_of(overlay, "coordinator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod_spec(deployment)["serviceAccountName"],
                                    "namespace": deployment["metadata"]["namespace"]}]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_in_arguments_name_services_and_ports_that_exist(overlay):
    shards, job = workload_of(overlay, "embedding-shard"), workload_of(overlay, "trainer")
    coord_port = parse_container(containers(workload_of(overlay, "coordinator"))[0]).args.port
    shard = parse_container(containers(shards, init=False)[0]).args
    # shards: stable name of the pod in the headless Service, the port it binds
    svc = one(overlay, "Service", shards["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert shard.advertise == f"{SAMPLE_ENV['POD_NAME']}.{svc['metadata']['name']}:{shard.port}"
    assert shard.shard_id_from_hostname and shard.host == "0.0.0.0"
    assert shards["spec"]["podManagementPolicy"] == "Parallel"
    host, port = shard.coordinator.split(":")
    assert one(overlay, "Service", host)["spec"]["ports"][0]["port"] == int(port) == coord_port
    # trainers: torchrun's node rank is the completion index, the rendezvous is index 0's stable name
    (wait,) = pod_spec(job)["initContainers"]
    (main,) = pod_spec(job)["containers"]
    run, waiting = parse_container(main), parse_container(wait)
    tspec = job["spec"]
    assert tspec["completionMode"] == "Indexed" and tspec["completions"] == tspec["parallelism"]
    assert run.torchrun.nnodes == str(tspec["completions"]) and run.torchrun.nproc_per_node == "1"
    assert "$(JOB_COMPLETION_INDEX)" in " ".join(main["args"]) and run.torchrun.max_restarts == 0
    subdomain = pod_spec(job)["subdomain"]
    tsvc = one(overlay, "Service", subdomain)
    assert tsvc["spec"]["clusterIP"] == "None" and tsvc["spec"]["publishNotReadyAddresses"] is True
    assert selector_matches({"matchLabels": tsvc["spec"]["selector"]}, pod_labels(job))
    assert run.torchrun.master_addr == f"{job['metadata']['name']}-0.{subdomain}"
    assert (waiting.args.command, waiting.args.host, waiting.args.port) == \
        ("wait-rendezvous", run.torchrun.master_addr, run.torchrun.master_port)
    env = {e["name"]: e for e in wait["env"]}  # the rank the wait step reads
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert waiting.args.coordinator == shard.coordinator
    # a dead trainer is replaced and resumes from the shared checkpoints
    assert pod_spec(job)["restartPolicy"] == "Never" and tspec["backoffLimit"] >= 1
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in \
        tspec["podFailurePolicy"]["rules"]
    args = run.args
    assert args.resume_if_present and args.checkpoint_dir
    if args.transport == "collective":  # gpu: the shard addresses and the group come from files and env
        assert args.shards.split(",") == [f"{shards['metadata']['name']}-{i}.{svc['metadata']['name']}:{shard.port}"
                                          for i in range(shards["spec"]["replicas"])]
        shard_env = {e["name"]: e.get("value") for e in containers(shards, init=False)[0]["env"]}
        assert (shard_env["MASTER_ADDR"], int(shard_env["MASTER_PORT"])) == \
            (run.torchrun.master_addr, run.torchrun.master_port)
        assert shard.device == "cuda"
    else:
        assert args.coordinator == shard.coordinator and shard.standby
    # shard and trainer mount one checkpoint claim at the path the trainers write
    claims = {}
    for w in (shards, job):
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        for c in containers(w, init=False):
            for m in c["volumeMounts"]:
                if m["mountPath"] == args.checkpoint_dir:
                    claims[component(w)] = volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
    assert set(claims) == {"embedding-shard", "trainer"} and len(set(claims.values())) == 1
    assert one(overlay, "PersistentVolumeClaim", claims["trainer"])


def _claim_at(workload: dict, path: str) -> str | None:
    """The PersistentVolumeClaim mounted over `path` in the workload's main containers."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for c in containers(workload, init=False):
        for m in c["volumeMounts"]:
            claim = volumes[m["name"]].get("persistentVolumeClaim")
            if claim and (path + "/").startswith(m["mountPath"].rstrip("/") + "/"):
                return claim["claimName"]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_export_writes_the_package_the_gateways_load(overlay):
    export, gateway = workload_of(overlay, "model-export"), workload_of(overlay, "inference-gateway")
    run = parse_container(containers(workload_of(overlay, "trainer"), init=False)[0]).args
    out = parse_container(containers(export)[0]).args
    served = parse_container(containers(gateway)[0]).args
    assert out.command == "export" and served.model == [out.out]
    assert _claim_at(export, out.out) == _claim_at(gateway, served.model[0]) is not None
    assert _claim_at(export, out.checkpoint) == _claim_at(workload_of(overlay, "trainer"), run.checkpoint_dir)
    assert out.config == run.config and _mounted_file(overlay, export, out.config) == \
        _mounted_file(overlay, workload_of(overlay, "trainer"), run.config)
    assert export["spec"]["suspend"] is True  # run by hand (or unsuspended) once a checkpoint exists


def _mounted_file(overlay: str, workload: dict, path: str) -> str:
    """The content of the ConfigMap key mounted at `path` in the workload (fails when nothing is)."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for c in containers(workload, init=False):
        for m in c["volumeMounts"]:
            directory = m["mountPath"].rstrip("/") + "/"
            if path.startswith(directory) and "configMap" in volumes[m["name"]]:
                cm = one(overlay, "ConfigMap", volumes[m["name"]]["configMap"]["name"])
                key = path[len(directory):]
                assert key in cm["data"], f"{path}: ConfigMap {cm['metadata']['name']} has no key {key}"
                return cm["data"][key]
    pytest.fail(f"{workload['metadata']['name']}: nothing mounted at {path}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_files_are_mounted_and_equal_the_repository_configs(overlay):
    from protos.model_config import ModelConfig
    from protos.plan import validate_plan

    job, coord = workload_of(overlay, "trainer"), workload_of(overlay, "coordinator")
    run = parse_container(pod_spec(job)["containers"][0]).args
    model_text = _mounted_file(overlay, job, run.config)
    source = ROOT / "configs" / ("tiny.yaml" if overlay == "dev" else "criteo_kaggle.yaml")
    assert model_text == source.read_text(), f"{overlay}: the model ConfigMap is not {source.name}"
    plan = _plan(_mounted_file(overlay, coord, parse_container(containers(coord)[0]).args.initial_plan))
    validate_plan(plan, ModelConfig.load(source))  # the same text, checked equal above
    assert plan.num_shards == workload_of(overlay, "embedding-shard")["spec"]["replicas"]
    if run.plan:  # gpu: trainers read the same plan the coordinator stores
        assert _plan(_mounted_file(overlay, job, run.plan)) == plan


def _plan(text: str):
    from google.protobuf import json_format

    from protos import common_pb2

    return json_format.Parse(text, common_pb2.ShardingPlan())


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    assert m, q
    return int(m.group(1)) * units.get(m.group(2), 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shard_memory_covers_the_plans_tables(overlay):
    """request >= 2 x (weights + optimizer state) of the largest shard + overhead (base/shards.yaml), and
    what a shard offers the planner (--capacity-mb) fits the request under the same rule."""
    from coordinator.moves import row_bytes

    shards, coord = workload_of(overlay, "embedding-shard"), workload_of(overlay, "coordinator")
    plan = _plan(_mounted_file(overlay, coord, parse_container(containers(coord)[0]).args.initial_plan))
    tables = {t.name: t for t in plan.tables}
    per_shard = [0] * plan.num_shards
    for s in plan.slices:
        per_shard[s.shard] += s.slice.num_rows * row_bytes(tables[s.slice.table], s.slice.num_cols)
    (container,) = containers(shards, init=False)
    args = parse_container(container).args
    request = _quantity_bytes(container["resources"]["requests"]["memory"])
    capacity = args.capacity_mb << 20
    assert max(per_shard) > 0
    assert request >= 2 * max(per_shard) + SHARD_OVERHEAD_BYTES, f"{overlay}: {request} < tables {per_shard}"
    assert max(per_shard) <= capacity and 2 * capacity + SHARD_OVERHEAD_BYTES <= request
    assert _quantity_bytes(container["resources"]["limits"]["memory"]) >= request
    job = workload_of(overlay, "trainer")
    trainers = job["spec"]["completions"]
    if args.config:  # gpu: per-shard files, each exactly the plan's part for this many trainers
        from protos.plan import shard_config

        for i in range(plan.num_shards):
            text = _mounted_file(overlay, shards, args.config.replace("{shard_id}", str(i)))
            assert json.loads(text) == shard_config(plan, i, num_trainers=trainers, collective=True)
    else:  # sync mode merges exactly this many trainers' updates per step
        assert args.num_trainers == trainers
    cpus = float(str(container["resources"]["requests"]["cpu"]).removesuffix("m")) / (
        1000 if str(container["resources"]["requests"]["cpu"]).endswith("m") else 1)
    assert args.compute_threads <= max(1, cpus)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_sigterm_drain(overlay):
    from coordinator.server import RunningCoordinator
    from embedding_service import server as shard_server
    from inference_gateway.native.supervisor import NativeConfig

    shard_drain = float(re.search(r"shard\.stop\(grace=([\d.]+)\)", inspect.getsource(shard_server.serve_forever))[1])
    gateway = parse_container(containers(workload_of(overlay, "inference-gateway"), init=False)[0]).args
    drains = {"embedding-shard": shard_drain,
              "coordinator": inspect.signature(RunningCoordinator.stop).parameters["grace"].default,
              "inference-gateway": NativeConfig(grace_s=gateway.grace_s).drain_s}  # with the manifest's --grace-s
    for comp, drain in drains.items():
        assert pod_spec(workload_of(overlay, comp))["terminationGracePeriodSeconds"] >= drain + 10, comp


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_is_serve_native_with_oip_clients_default_port(overlay):
    """serve-native serves Predict and the Open Inference Protocol on one port; the Service offers it as 50052
    and as 8001 (Triton's and KServe's clients' default), and LoadModel reads from the models volume."""
    gateway = workload_of(overlay, "inference-gateway")
    (c,) = containers(gateway, init=False)
    parsed = parse_container(c)
    assert parsed.args.command == "serve-native"
    assert _claim_at(gateway, parsed.args.model_store) == _claim_at(gateway, parsed.args.model[0]) == "models"
    assert parsed.args.model[0].startswith(parsed.args.model_store.rstrip("/") + "/")
    (svc,) = [s for s in objects(overlay, "Service") if s["metadata"]["name"] == "inference-gateway"]
    to = {p["port"]: resolve_port(p["targetPort"], c) for p in svc["spec"]["ports"]}
    assert to[50052] == to[8001] == parsed.args.port
    assert parsed.args.management_port not in to.values()  # management: port-forward only


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_autoscaler_and_spread(overlay):
    pdbs = {p["metadata"]["name"]: p for p in objects(overlay, "PodDisruptionBudget")}
    for comp in ("embedding-shard", "inference-gateway"):
        w = workload_of(overlay, comp)
        matching = [p for p in pdbs.values() if selector_matches(p["spec"]["selector"], pod_labels(w))]
        assert len(matching) == 1, comp
        spec = matching[0]["spec"]
        replicas = w["spec"]["replicas"]
        # a drain can always make progress, and never takes every replica at once
        assert spec.get("maxUnavailable", 0) >= 1 or spec.get("minAvailable", replicas) < replicas
        assert spec.get("minAvailable", 0) < replicas or replicas == 0
        for tsc in pod_spec(w).get("topologySpreadConstraints") or [{"labelSelector": None}]:
            assert tsc["labelSelector"] and selector_matches(tsc["labelSelector"], pod_labels(w)), comp
            assert tsc["topologyKey"] == "kubernetes.io/hostname"
    (hpa,) = objects(overlay, "HorizontalPodAutoscaler")
    gateway = workload_of(overlay, "inference-gateway")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == \
        (gateway["kind"], gateway["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_specifics(overlay):
    images = {c["image"] for w in workloads(overlay) for c in containers(w) if is_ours(c)}
    assert len(images) == 1
    gpus = {component(w): (containers(w, init=False)[0]["resources"].get("limits") or {}).get("nvidia.com/gpu")
            for w in workloads(overlay)}
    if overlay == "gpu":
        assert images.pop().endswith("-cuda")
        assert gpus["embedding-shard"] == 1 and gpus["trainer"] == 1
        for comp in ("embedding-shard", "trainer"):
            env = {e["name"] for e in containers(workload_of(overlay, comp), init=False)[0]["env"]}
            assert {"NCCL_SOCKET_IFNAME", "NCCL_DEBUG"} <= env
    else:
        assert images.pop().endswith("-cpu") and not any(gpus.values())
    if overlay == "dev":
        assert all(w["spec"].get("replicas", w["spec"].get("completions")) == 1
                   for w in workloads(overlay) if w["kind"] != "CronJob")


# -- 5. the image ---------------------------------------------------------------------------------
def _dockerfile() -> list[str]:
    """Instructions with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def _dockerignored(path: str) -> bool:
    import fnmatch

    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or path.split("/")[0] == p for p in patterns)


def test_dockerfile_copies_existing_paths_and_pins_the_projects_versions():
    instructions = _dockerfile()
    assert sum(i.upper().startswith("FROM ") for i in instructions) >= 2  # multi-stage
    copies = [i.split()[1:] for i in instructions if i.upper().startswith("COPY ") and "--from=" not in i]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^,;\s]+)", d).groups() for d in project["dependencies"]
                if re.fullmatch(r"([A-Za-z0-9_.-]+)==([^,;\s]+)", d))
    args = dict(re.fullmatch(r"ARG (\w+)=(\S+)", i).groups() for i in instructions if re.fullmatch(r"ARG \w+=\S+", i))
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["FBGEMM_VERSION"] == pins["fbgemm-gpu-cpu"]
    python = tuple(int(x) for x in args["PYTHON_VERSION"].split("."))
    assert python >= tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    text = " ".join(instructions)
    # the rest of the dependencies come from pyproject.toml itself, so they cannot drift
    assert 'tomllib.load(open("pyproject.toml"' in text and "pip install -r /tmp/requirements.txt" in text
    assert "COPY pyproject.toml" in text and "pip install --no-deps ." in text
    # run the Dockerfile's own extraction: with the two ARG pins it installs exactly pyproject's dependencies
    (run,) = [i for i in instructions if "tomllib" in i]
    extract = re.search(r"python (-c '.*?') > /tmp/requirements\.txt", run).group(1)
    out = subprocess.run(["sh", "-c", f"{shlex.quote(sys.executable)} {extract}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    installed = {*out.stdout.split(), f"torch=={args['TORCH_VERSION']}", f"fbgemm-gpu-cpu=={args['FBGEMM_VERSION']}"}
    assert installed == {d.replace(" ", "") for d in project["dependencies"]}
    assert re.search(r"^USER (\d+)", "\n".join(instructions), re.M).group(1) != "0"
    for name in ("git", ".venv"):
        assert _dockerignored(name if name != "git" else ".git")


def test_the_image_carries_serve_natives_frontend_and_the_libraries_it_links():
    """The build stage compiles the frontend after installing the package (the build step finds it there at
    start), and the runtime stage installs the Debian package of the grpc++, nghttp2 and OpenSSL libraries the
    binary links here (the image is Debian bookworm like this host)."""
    from inference_gateway.native.build import build

    instructions = _dockerfile()
    text = " ".join(instructions)
    install = text.index("pip install --no-deps .")
    assert text.index("python -m inference_gateway.native.build") > install
    assert {"libgrpc++-dev", "libnghttp2-dev", "libssl-dev"} <= set(text.split("FROM ")[1].split())  # the build stage
    runtime = text.split("FROM ")[2]
    ldd = subprocess.run(["ldd", str(build())], capture_output=True, text=True, timeout=60, check=True).stdout
    libs = re.findall(r"((?:libgrpc\+\+|libnghttp2|libssl)\.so\.[\d.]+) => (\S+)", ldd)
    assert {name.split(".so")[0] for name, _ in libs} == {"libgrpc++", "libnghttp2", "libssl"}, ldd
    for _, path in libs:
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True,
                               timeout=60).stdout.split(":")[0]
        assert owner and owner in runtime.split(), (path, owner)
    assert "inference_gateway.native.build import binary_path" in runtime and 'grep "not found"' in runtime


def test_the_image_carries_tritonserver_as_the_makefile_installs_it():
    """serve-triton stays in the image beside serve-native: the same nvidia-pytriton as `make install`, --no-deps
    after pip check, and the build fails when tritonserver or its Python stub would miss a library (the check run
    here too)."""
    from inference_gateway.triton_frontend import TritonDist

    instructions = _dockerfile()
    args = dict(re.fullmatch(r"ARG (\w+)=(\S+)", i).groups() for i in instructions if re.fullmatch(r"ARG \w+=\S+", i))
    make_pin = re.search(r"--no-deps nvidia-pytriton==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["PYTRITON_VERSION"] == make_pin
    runs = [i for i in instructions if i.startswith("RUN ")]
    install = next(n for n, i in enumerate(runs) if 'nvidia-pytriton==${PYTRITON_VERSION}' in i)
    assert "--no-deps" in runs[install] and install > next(n for n, i in enumerate(runs) if "pip check" in i)
    assert any("check_libraries()" in i for i in runs)
    TritonDist.find().check_libraries()
    # the runtime stage installs jemalloc and the build fails unless serve-triton's --allocator finds it
    assert any("libjemalloc2" in i and "apt-get install" in i for i in runs)
    assert any("preload(Allocator.JEMALLOC)" in i for i in runs)
