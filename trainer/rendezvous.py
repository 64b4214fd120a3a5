"""Waits until a trainer pod can rendezvous: index 0's DNS name resolves AND its port accepts a TCP connect,
and the coordinator accepts one too.

On Kubernetes a headless Service publishes a pod's DNS name as soon as the pod has an IP, well before
the process in it listens; torchrun then fails its first connect and the Job counts a failure. This
is the most reported start-up failure of PyTorchJob and TorchX users, so the trainer's init container
checks both steps and says which one it is stuck on.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass


class RendezvousTimeout(TimeoutError):
    """An endpoint that did not resolve or accept a connection in time; the message says which step failed."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """HOST:PORT (IPv6 hosts in brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return Endpoint(host.strip("[]"), int(port))


def probe(endpoint: Endpoint, connect: bool = True, timeout_s: float = 2.0) -> str | None:
    """One attempt: None when the name resolves (and, with `connect`, a TCP connect succeeds), else why not."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"DNS name {endpoint.host!r} does not resolve ({e})"
    if not connect:
        return None
    errors = []
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout_s)
                s.connect(addr)
            return None
        except OSError as e:
            errors.append(f"{addr[0]}: {e.strerror or e}")
    return f"{endpoint.host!r} resolves but port {endpoint.port} does not accept connections ({'; '.join(errors)})"


def wait_for(endpoint: Endpoint, deadline: float, *, connect: bool = True, poll_s: float = 0.5,
             clock: Callable[[], float] = time.monotonic) -> None:
    """Polls `probe` until it succeeds; raises RendezvousTimeout with the last reason at `deadline`."""
    while True:
        reason = probe(endpoint, connect=connect, timeout_s=max(0.1, min(2.0, deadline - clock())))
        if reason is None:
            return
        if clock() >= deadline:
            raise RendezvousTimeout(f"gave up waiting for {endpoint}: {reason}")
        time.sleep(min(poll_s, max(0.0, deadline - clock())))


def wait_rendezvous(master: Endpoint, rank: int, coordinator: Endpoint | None, timeout_s: float,
                    poll_s: float = 0.5) -> None:
    """Rank > 0: master's DNS and a TCP connect to its rendezvous port. Rank 0 hosts the rendezvous store
    itself, so it only needs its own name to resolve (others connect to it by that name). Every rank
    then needs the coordinator to accept connections. One deadline covers all of it."""
    deadline = time.monotonic() + timeout_s
    wait_for(master, deadline, connect=rank > 0, poll_s=poll_s)
    if coordinator is not None:
        wait_for(coordinator, deadline, poll_s=poll_s)
