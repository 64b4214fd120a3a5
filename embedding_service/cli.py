"""`embedding-shard`: serve a shard, or inspect a running one."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from embedding_service.config import ShardConfig, SyncMode
from protos.cli_errors import file_error, run_command


def _table_arg(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) < 3:
        raise argparse.ArgumentTypeError(f"--table {spec!r}: expected NAME:ROWS:DIM[:OPTIMIZER[:LR]]")
    name, rows, dim = parts[0], int(parts[1]), int(parts[2])
    opt = {"type": parts[3] if len(parts) > 3 else "exact_rowwise_adagrad",
           "learning_rate": float(parts[4]) if len(parts) > 4 else 0.01}
    return {"name": name, "num_rows": rows, "dim": dim, "features": [name], "optimizer": opt}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedding-shard",
        description="Embedding shard service: holds table slices in fbgemm TBE modules and serves pooled "
                    "lookups and fused optimizer updates over gRPC.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start a shard server (prints one JSON line with the bound ports)",
                       description="Start a shard. Give --config (YAML or JSON: tables, slices, mode, server) "
                                   "or --table flags; flags override the file.")
    s.add_argument("--config", help="shard config file (YAML or JSON)")
    s.add_argument("--table", action="append", type=_table_arg, default=[],
                   help="NAME:ROWS:DIM[:OPTIMIZER[:LR]], a whole table whose one feature is NAME (repeatable)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port (0 picks a free one)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks; -1 disables)")
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--mode", choices=[m.value for m in SyncMode])
    s.add_argument("--num-trainers", type=int, help="trainers per step (sync mode merges their updates)")
    s.add_argument("--staleness", type=int, help="async mode: steps a trainer may run ahead of its updates")
    s.add_argument("--plan-version", type=int)
    s.add_argument("--shard-id", type=int)
    s.add_argument("--shard-id-from-hostname", action="store_true",
                   help="shard id = the trailing -N of $HOSTNAME (a StatefulSet pod's ordinal); a {shard_id} in "
                        "--config's path is filled in with it")
    s.add_argument("--compute-threads", type=int, help="TBE kernel threads (default: all cores but one)")
    s.add_argument("--seed", type=int, help="initialisation seed (same seed, same tables whatever the sharding)")
    s.add_argument("--max-pending-handles", type=int,
                   help="lookup handles awaiting their update, at most (default 1024); past it a Lookup gets "
                        "RESOURCE_EXHAUSTED and changes nothing")
    s.add_argument("--max-inflight-lookups", type=int,
                   help="Lookup requests inside the shard at once, running or waiting for their step "
                        "(default 256); past it RESOURCE_EXHAUSTED (Updates are never refused for load)")
    s.add_argument("--max-concurrent-rpcs", type=int,
                   help="RPCs gRPC admits at once, running or queued (default 4 x workers); past it gRPC answers "
                        "RESOURCE_EXHAUSTED")
    s.add_argument("--collective-timeout-s", type=float,
                   help="collective transport: no all-to-all waits longer for a peer, a frozen one makes it fail "
                        "(default 300)")
    s.add_argument("--clamp-ids", action="store_true", help="clamp out-of-range ids instead of rejecting them")
    s.add_argument("--max-message-mb", type=int, help="largest gRPC message accepted or sent")
    s.add_argument("--standby", action="store_true",
                   help="start holding nothing (plan version 0); the coordinator rolls a plan out to it")
    s.add_argument("--coordinator", help="HOST:PORT of the coordinator: register and heartbeat there")
    s.add_argument("--advertise", help="HOST:PORT others reach this shard at (default: the bound address)")
    s.add_argument("--capacity-mb", type=int, help="memory offered for weights + optimizer state (planning)")
    s.add_argument("--tls-cert", help="PEM certificate (chain): serve TLS only (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-ca", help="PEM of the CA of the TLS servers this shard calls (coordinator, peer shards); "
                   "the shard presents its own --tls-cert to them")
    s.add_argument("--tls-client-ca", help="PEM CA of client certificates: mutual TLS, every RPC needs a client "
                   "certificate it signed")
    s.add_argument("--checkpoint-root", help="Checkpoint / Restore read and write only under this directory "
                   "(default ./checkpoints)")
    s.add_argument("--token-file", help="control-plane bearer token (default: env RECSYS_CONTROL_TOKEN; none: "
                   "open unless mTLS); also presented to peer shards")
    s.add_argument("--publish-deltas", metavar="REDIS_URL",
                   help="online freshness: publish the rows each step changes to Redis Streams at this URL "
                        "(one stream per table, coalesced every --delta-interval-ms; a gateway --follow's them)")
    s.add_argument("--delta-interval-ms", type=float, help="coalescing interval of published deltas (default 100)")
    s.add_argument("--delta-dtype", choices=["fp32", "fp16"], help="row values on the wire (default fp32)")
    s.add_argument("--log-level", default="INFO")
    i = sub.add_parser("info", help="print a running shard's slices, memory and counters")
    i.add_argument("address", help="HOST:PORT")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--tls-ca", help="PEM CA certificate: connect over TLS, verifying the server against it")
    i.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    i.add_argument("--tls-key", help="PEM private key of --tls-cert")
    return p


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    raw: dict = {}
    if args.shard_id_from_hostname:
        from embedding_service.identity import ordinal_from_hostname

        if args.shard_id is not None:
            raise ValueError("--shard-id and --shard-id-from-hostname: give one")
        args.shard_id = ordinal_from_hostname()
        if args.config:
            args.config = args.config.replace("{shard_id}", str(args.shard_id))
    if args.config:
        import yaml

        with open(args.config) as f:
            try:
                raw = json.load(f) if args.config.endswith(".json") else yaml.safe_load(f)
            except (ValueError, yaml.YAMLError) as e:
                raise file_error(args.config, e) from None
        if not isinstance(raw, dict):
            raise file_error(args.config, ValueError("expected a mapping at the top level"))
    if args.table:
        raw["tables"] = args.table
        raw.pop("slices", None)
    if args.standby:
        raw["tables"], raw["slices"] = [], []
    elif "tables" not in raw:  # `tables: []` in a config file is a standby shard too
        raise SystemExit("embedding-shard serve: no tables; give --config or --table (or --standby)")
    server = dict(raw.get("server") or {})
    for key, val in (("host", args.host), ("port", args.port), ("metrics_port", args.metrics_port),
                     ("tls_cert", args.tls_cert), ("tls_key", args.tls_key), ("tls_client_ca", args.tls_client_ca)):
        if val is not None:
            server[key] = None if (key == "metrics_port" and val < 0) else val
    if args.max_concurrent_rpcs is not None:
        server["max_concurrent_rpcs"] = args.max_concurrent_rpcs
    if args.max_message_mb:
        server["max_message_bytes"] = args.max_message_mb * 1024 * 1024
    raw["server"] = server
    for key in ("device", "mode", "num_trainers", "staleness", "plan_version", "shard_id", "seed", "compute_threads",
                "coordinator", "advertise", "tls_ca", "checkpoint_root", "token_file", "max_pending_handles",
                "max_inflight_lookups", "collective_timeout_s"):
        val = getattr(args, key)
        if val is not None:
            raw[key] = val
    if args.capacity_mb is not None:
        raw["capacity_bytes"] = args.capacity_mb * 1024 * 1024
    if args.clamp_ids:
        raw["clamp_ids"] = True
    if args.publish_deltas:
        deltas = dict(raw.get("publish_deltas") or {}, redis_url=args.publish_deltas)
        if args.delta_interval_ms is not None:
            deltas["interval_s"] = args.delta_interval_ms / 1000
        if args.delta_dtype:
            deltas["dtype"] = args.delta_dtype
        raw["publish_deltas"] = deltas
    elif args.delta_interval_ms is not None or args.delta_dtype:
        raise ValueError("--delta-interval-ms / --delta-dtype: need --publish-deltas")
    try:
        return ShardConfig.from_dict(raw)
    except ValueError as e:  # the file's field (or the flag that overrode it)
        if args.config:
            raise file_error(args.config, e) from None
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"embedding-shard {args.command}", _main, args)


def _main(args: argparse.Namespace) -> int:
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            config = config_from_args(args)
            from protos.paths import ensure_root
            from protos.security import CONTROL_TOKEN_ENV, read_token

            read_token(config.token_file, CONTROL_TOKEN_ENV)  # an unreadable or empty token file stops the start
            ensure_root(config.checkpoint_root, "checkpoint_root")
        except (ValueError, OSError) as e:
            print(f"embedding-shard serve: {e}", file=sys.stderr)
            return 2
        from embedding_service.server import serve_forever

        return serve_forever(config)
    from google.protobuf import json_format

    from protos.shard_client import ShardClient

    with ShardClient(args.address, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
        info = client.info()
    if args.json:
        print(json.dumps(json_format.MessageToDict(info, preserving_proto_field_name=True)))
        return 0
    print(f"shard {info.shard_id}  plan v{info.plan_version}  {info.device}  {info.mode} x{info.num_trainers}")
    print(f"weights {info.weight_bytes / 2**20:.1f} MiB  optimizer {info.optimizer_bytes / 2**20:.1f} MiB  "
          f"resident {info.resident_bytes / 2**20:.1f} MiB")
    print(f"lookups {info.lookups}  updates {info.updates}  rows looked up {info.rows_looked_up}  "
          f"rows updated {info.rows_updated}  applied step {info.applied_step}")
    for s in info.slices:
        sl = s.slice
        print(f"  [{s.index}] {sl.table:<16} rows {sl.row_offset}+{sl.num_rows}  cols {sl.col_offset}+{sl.num_cols}"
              f"  {s.optimizer:<22} features {','.join(s.features)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
