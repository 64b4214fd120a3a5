"""Closed- and open-loop load against a gateway from one asyncio loop (benchmarks, demo).

Requests are serialized once up front and sent as raw bytes through a generic unary call, so the
client spends its CPU on the wire, not on protobuf; the open loop counts latency from each request's
scheduled send time, so a slow server cannot hide queueing (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np

from protos.channels import status_name

METHOD = "/recsys.v1.InferenceGateway/Predict"
STREAM_METHOD = "/recsys.v1.InferenceGateway/PredictStream"
OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"  # pools of serialized ModelInferRequests
REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def refusal_name(e: grpc.aio.AioRpcError) -> str:
    return refusal_label(e.code(), e.details() or "")


def refusal_label(code: grpc.StatusCode, details: str) -> str:
    """The status code, and for RESOURCE_EXHAUSTED who refused: the gateway's admission (expected wait), its
    full queue, or gRPC's own limit on concurrent RPCs (--max-concurrent-rpcs); for UNAVAILABLE, whether
    Triton's queue was full on arrival or the request timed out in it."""
    markers = {grpc.StatusCode.UNAVAILABLE: (("Exceeds maximum queue size", "queue_full"),
                                             ("Request timeout expired", "queue_timeout")),
               grpc.StatusCode.RESOURCE_EXHAUSTED: (("expected queue wait", "admission"), ("queue full", "queue_full"),
                                                    ("Concurrent RPC limit", "rpc_limit"))}
    for marker, who in markers.get(code, ()):
        if marker in details:
            return f"{code.name}:{who}"
    return code.name


def stats(lat: list[float], errors: dict[str, int], elapsed: float, batch: int) -> dict:
    a = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"requests_per_s": round(len(lat) / elapsed, 1), "samples_per_s": round(len(lat) * batch / elapsed, 1),
            "ok": len(lat), "errors": dict(errors), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "p999_ms": round(float(np.percentile(a, 99.9)), 2)}


async def closed_loop(address: str, pool: list[bytes], concurrency: int, seconds: float, batch: int,
                      method: str = METHOD, until: Callable[[], bool] | None = None) -> dict:
    """method: any unary method taking the pool's serialized requests (e.g. KServe v2 ModelInfer);
    until: the measured phase lasts `seconds` and also until it returns True (load across an action)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        lat: list[float] = []
        errors: dict[str, int] = {}
        stop = time.perf_counter() + min(1.0, seconds)  # warm-up first
        measuring = False

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop or (measuring and until is not None and not until()):
                t0 = time.perf_counter()
                try:
                    await call(pool[i % len(pool)], timeout=10)
                    lat.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as e:
                    name = refusal_name(e)
                    errors[name] = errors.get(name, 0) + 1
                i += concurrency

        await asyncio.gather(*[worker(k) for k in range(min(concurrency, 8))])  # warm-up
        lat.clear()
        errors.clear()
        stop = time.perf_counter() + seconds
        measuring = True
        start = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(concurrency)])
        return stats(lat, errors, time.perf_counter() - start, batch)


async def open_loop(address: str, pool: list[bytes], rate: float, seconds: float, batch: int,
                    method: str = METHOD) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        lat: list[float] = []
        reject_lat: dict[str, list[float]] = {}
        errors: dict[str, int] = {}

        async def one(i: int, scheduled: float) -> None:
            try:
                await call(pool[i % len(pool)], timeout=10)
                lat.append(time.perf_counter() - scheduled)
            except grpc.aio.AioRpcError as e:
                name = refusal_name(e)
                errors[name] = errors.get(name, 0) + 1
                # refusals: ours (RESOURCE_EXHAUSTED), gRPC's own of RPCs past --max-pending-rpcs (CANCELLED)
                # and Triton's full queue or queue timeout (UNAVAILABLE)
                if e.code() in REFUSALS:
                    reject_lat.setdefault(name, []).append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, scheduled)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
        out = stats(lat, errors, time.perf_counter() - start, batch)
        out["offered_per_s"] = round(rate, 1)
        out["achieved_send_rate"] = round(total / sent_for, 1)
        every = [x for lat_of in reject_lat.values() for x in lat_of]
        if every:
            out["reject_p99_ms"] = round(float(np.percentile(np.asarray(every) * 1000, 99)), 2)
            # by code: RESOURCE_EXHAUSTED answered on arrival vs CANCELLED after waiting
            out["reject_ms_by_code"] = {code: {"p50": round(float(np.percentile(np.asarray(v) * 1000, 50)), 2),
                                               "p99": round(float(np.percentile(np.asarray(v) * 1000, 99)), 2)}
                                        for code, v in reject_lat.items()}
        out["rejected_share"] = round(len(every) / max(total, 1), 3)
        return out


async def stream_closed_loop(address: str, pool: list[bytes], streams: int, depth: int, seconds: float,
                             batch: int) -> dict:
    """`streams` PredictStream calls, each keeping `depth` requests in flight (concurrency streams x depth).

    Pool entries must carry distinct request_ids (responses may come back in any order)."""
    from protos import inference_pb2

    ids = [inference_pb2.PredictRequest.FromString(b).request_id for b in pool]
    if len(set(ids)) != len(ids):
        raise ValueError("pool: request_ids must be distinct")
    async with grpc.aio.insecure_channel(address) as channel:
        lat: list[float] = []
        errors: dict[str, int] = {}
        measuring = {"on": False}
        stop = time.perf_counter() + seconds + min(1.0, seconds)
        warm_until = stop - seconds

        async def one_stream(k: int) -> None:
            # a bound, so a server that stops answering ends the run with errors instead of hanging it
            call = channel.stream_stream(STREAM_METHOD)(timeout=seconds + min(1.0, seconds) + 60)
            credits = asyncio.Semaphore(depth)
            sent: dict[str, float] = {}

            async def writer() -> None:
                i = k
                while time.perf_counter() < stop:
                    await credits.acquire()
                    j = i % len(pool)
                    while ids[j] in sent:  # still in flight on this stream
                        i += 1
                        j = i % len(pool)
                    sent[ids[j]] = time.perf_counter()
                    await call.write(pool[j])
                    i += streams
                await call.done_writing()

            w = asyncio.ensure_future(writer())
            try:
                async for raw in call:
                    resp = inference_pb2.PredictResponse.FromString(raw)
                    t0 = sent.pop(resp.request_id)
                    now = time.perf_counter()
                    if now >= warm_until:
                        measuring["on"] = True
                        if resp.error.code:
                            name = status_name(resp.error.code)
                            errors[name] = errors.get(name, 0) + 1
                        else:
                            lat.append(now - t0)
                    credits.release()
                await w
            except grpc.aio.AioRpcError as e:  # the stream ended: what was in flight on it failed
                w.cancel()
                errors[e.code().name] = errors.get(e.code().name, 0) + max(len(sent), 1)

        await asyncio.gather(*[one_stream(k) for k in range(streams)])
        return stats(lat, errors, seconds, batch)
