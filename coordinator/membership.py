"""Who is in the job: shards and trainers register, heartbeat within a lease, or count as dead.

Stored in Redis (one hash per kind, `{ns}:members:{KIND}`: id -> serialized coordinator_pb2.Member)
so a restarted or second coordinator sees the same members. Liveness is computed on read from
`last_seen` and the lease, with `clock` injectable for tests; nothing has to sweep.

Epochs fence replaced members: every Register of a new process issues the next epoch for its kind+id
(a counter in `{ns}:epochs:{KIND}` that survives Leave), and a member that already holds an epoch
keeps it only while no later one was issued. A shard frozen past its lease and replaced therefore
cannot come back: its heartbeats and re-registration name an epoch that is no longer the latest and
raise `StaleEpoch` (FAILED_PRECONDITION), so it is never counted alive again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from coordinator.redis_backend import require_bytes
from protos import coordinator_pb2

KINDS = (coordinator_pb2.SHARD, coordinator_pb2.TRAINER)
CAS_TRIES = 50
# One member's compare-and-set, one round trip. KEYS: members hash, epochs hash; ARGV: field, the record and
# the epoch as the caller last saw them ("" when absent), the new record, the new epoch ("": unchanged).
# Writes only if neither changed since: unlike a WATCH on the shared hashes, other members' writes in
# between do not make it retry. Returns 1, or {record, epoch} as they are now (the caller decides again
# without another read).
_CAS = """
local raw = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local epoch = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if raw ~= ARGV[2] or epoch ~= ARGV[3] then return {raw, epoch} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[5]) end
return 1
"""


class StaleEpoch(Exception):
    """A member claims an epoch that a later registration superseded: it was replaced and must stop."""

    def __init__(self, kind: int, id: int, claimed: int, latest: int, holder: str = "") -> None:
        self.kind, self.id, self.claimed, self.latest = kind, id, claimed, latest
        who = f"{coordinator_pb2.MemberKind.Name(kind).lower()} {id}"
        by = f" (held by instance {holder[:8]})" if holder else ""
        super().__init__(f"{who}: epoch {claimed} was superseded by epoch {latest}{by}; "
                         f"this member was replaced and must not write")


def _kind_name(kind: int, what: str = "kind") -> str:
    if kind not in KINDS:
        raise ValueError(f"{what}: expected SHARD or TRAINER, got {kind}")
    return coordinator_pb2.MemberKind.Name(kind)


class Membership:
    """Members by kind and id, shared by every coordinator replica through Redis; thread-safe."""

    def __init__(self, redis_client: redis.Redis, namespace: str = "recsys", lease_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s: must be > 0, got {lease_s}")
        require_bytes(redis_client, "Membership")
        self.redis = redis_client
        self.namespace = namespace
        self.lease_s = lease_s
        self.clock = clock
        self._cas = redis_client.register_script(_CAS)
        # (members key, id) -> (record, epoch) as this coordinator last wrote or read them: the expected
        # values of the next compare-and-set. Only ever a guess (Redis decides); bounded by the fleet.
        self._seen: dict[tuple[str, str], tuple[bytes | None, bytes | None]] = {}

    def _key(self, kind: int, what: str = "kind") -> str:
        return f"{self.namespace}:members:{_kind_name(kind, what)}"

    def _epochs_key(self, kind: int) -> str:
        return f"{self.namespace}:epochs:{_kind_name(kind)}"

    def register(self, member: coordinator_pb2.Member) -> int:
        """Stores the member as ALIVE, seen now, and returns its epoch. `member.epoch == 0` (a new process)
        is issued the next epoch, replacing whoever held the id; a held epoch is kept unless a later one
        was issued since (then `StaleEpoch`: that member was replaced)."""
        key = self._key(member.kind, "member.kind")
        if member.id < 0:
            raise ValueError(f"member.id: must be >= 0, got {member.id}")
        if not member.instance:
            raise ValueError("member.instance: required (unique per process)")
        if member.kind == coordinator_pb2.SHARD and not member.address:
            raise ValueError(f"member.address: required for shard {member.id} (HOST:PORT of its gRPC server)")
        ekey, field = self._epochs_key(member.kind), str(member.id)
        raw, eraw = self._read(key, ekey, field)
        for _ in range(CAS_TRIES):
            held = coordinator_pb2.Member.FromString(raw) if raw is not None else None
            latest = max(int(eraw or 0), held.epoch if held is not None else 0)
            if not member.epoch and held is not None and held.instance == member.instance:
                epoch = held.epoch  # the same process again (its Register timed out after it was stored)
            elif member.epoch:
                holder = held.instance if held is not None else ""
                if member.epoch < latest or (held is not None and held.epoch == member.epoch
                                             and held.instance != member.instance):
                    raise StaleEpoch(member.kind, member.id, member.epoch, latest, holder)
                epoch = member.epoch  # the holder re-registers (its lease lapsed, or Redis lost it)
            else:
                epoch = latest + 1
            record = coordinator_pb2.Member()
            record.CopyFrom(member)
            record.epoch = epoch
            record.state = coordinator_pb2.ALIVE
            record.last_seen = self.clock()
            new, new_epoch = record.SerializeToString(), str(max(latest, epoch)).encode()
            won, raw, eraw = self._swap(key, ekey, field, raw, eraw, new, new_epoch)
            if won:
                return epoch
        raise RuntimeError(f"{_kind_name(member.kind).lower()} {member.id}: register lost {CAS_TRIES} races "
                           f"for its record")

    def _read(self, key: str, ekey: str, field: str) -> tuple[bytes | None, bytes | None]:
        """A member's record and latest epoch, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(key, field)
        pipe.hget(ekey, field)
        raw, eraw = pipe.execute()
        return raw, eraw

    def _swap(self, key: str, ekey: str, field: str, raw: bytes | None, eraw: bytes | None, new: bytes,
              new_epoch: bytes | None) -> tuple[bool, bytes | None, bytes | None]:
        """The compare-and-set: (True, the stored record and epoch) or (False, what Redis holds instead).
        Either way this coordinator remembers the pair, so the member's next heartbeat needs no read."""
        got = self._cas(keys=[key, ekey], args=[field, raw or b"", eraw or b"", new, new_epoch or b""])
        if got == 1:
            raw, eraw = new, new_epoch or eraw
            self._seen[(key, field)] = (raw, eraw)
            return True, raw, eraw
        raw, eraw = got[0] or None, got[1] or None
        self._seen[(key, field)] = (raw, eraw)
        return False, raw, eraw

    def heartbeat(self, kind: int, id: int, instance: str, plan_version: int, step: int, epoch: int = 0) -> bool:
        """Renews the lease. False when the member is unknown, another instance holds its id, or its
        lease already ran out (the coordinator may have acted on its death): the caller registers again.
        A nonzero `epoch` other than the latest issued raises `StaleEpoch` (0: not checked, as before).

        One round trip: a compare-and-set script on this member's field against the record this
        coordinator last wrote or saw (a WATCH on the whole hash would make every member's heartbeat abort
        every other's). When another writer changed it meanwhile (a second coordinator, a Register), the
        script answers what Redis holds and the decision is made again; a refusal is never based on the
        remembered copy alone."""
        key = self._key(kind)
        ekey, field = self._epochs_key(kind), str(id)
        seen = self._seen.get((key, field))
        verified = seen is None
        raw, eraw = self._read(key, ekey, field) if seen is None else seen
        for _ in range(CAS_TRIES):
            record = coordinator_pb2.Member.FromString(raw) if raw is not None else None
            latest = max(int(eraw or 0), record.epoch if record is not None else 0)
            stale = bool(epoch) and epoch < latest
            now = self.clock()
            if stale or record is None or record.instance != instance or now - record.last_seen > self.lease_s:
                if not verified:  # decided on the remembered copy: refuse only on what Redis holds
                    raw, eraw = self._read(key, ekey, field)
                    self._seen[(key, field)] = (raw, eraw)
                    verified = True
                    continue
                if stale:
                    raise StaleEpoch(kind, id, epoch, latest, record.instance if record is not None else "")
                return False
            record.last_seen = now
            record.plan_version = plan_version
            record.step = step
            record.state = coordinator_pb2.ALIVE
            won, raw, eraw = self._swap(key, ekey, field, raw, eraw, record.SerializeToString(), None)
            if won:
                return True
            verified = True
        raise RuntimeError(f"{_kind_name(kind).lower()} {id}: heartbeat lost {CAS_TRIES} races for its record")

    def get(self, kind: int, id: int) -> coordinator_pb2.Member | None:
        raw = self.redis.hget(self._key(kind), str(id))
        return self._with_state(raw) if raw is not None else None

    def members(self, kind: int | None = None) -> list[coordinator_pb2.Member]:
        """Every registered member (of one kind, or all), by kind then id, with its state as of now."""
        out = []
        for k in KINDS if kind is None else (kind,):
            raws = self.redis.hvals(self._key(k))
            out.extend(self._with_state(r) for r in raws)
        return sorted(out, key=lambda m: (m.kind, m.id))

    def alive(self, kind: int) -> dict[int, coordinator_pb2.Member]:
        """The live members of a kind by id, in id order. One pass that sorts only the live ids (every
        GetPlan asks this of every shard)."""
        now, out = self.clock(), {}
        for raw in self.redis.hvals(self._key(kind)):
            m = coordinator_pb2.Member.FromString(raw)
            if now - m.last_seen <= self.lease_s:
                m.state = coordinator_pb2.ALIVE
                out[m.id] = m
        return dict(sorted(out.items()))

    def remove(self, kind: int, id: int) -> bool:
        """Forgets a member (it left on purpose); True if it was registered."""
        key = self._key(kind)
        self._seen.pop((key, str(id)), None)
        return bool(self.redis.hdel(key, str(id)))

    def _with_state(self, raw: bytes) -> coordinator_pb2.Member:
        m = coordinator_pb2.Member.FromString(raw)
        dead = self.clock() - m.last_seen > self.lease_s
        m.state = coordinator_pb2.DEAD if dead else coordinator_pb2.ALIVE
        return m
