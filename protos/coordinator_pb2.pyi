from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_KIND_UNSPECIFIED: _ClassVar[MemberKind]
    SHARD: _ClassVar[MemberKind]
    TRAINER: _ClassVar[MemberKind]

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_STATE_UNSPECIFIED: _ClassVar[MemberState]
    ALIVE: _ClassVar[MemberState]
    DEAD: _ClassVar[MemberState]

class PlanEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_EVENT_KIND_UNSPECIFIED: _ClassVar[PlanEventKind]
    CURRENT: _ClassVar[PlanEventKind]
    FENCE: _ClassVar[PlanEventKind]
    RESUME: _ClassVar[PlanEventKind]

class RolloutPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_PHASE_UNSPECIFIED: _ClassVar[RolloutPhase]
    IDLE: _ClassVar[RolloutPhase]
    VALIDATING: _ClassVar[RolloutPhase]
    FENCING: _ClassVar[RolloutPhase]
    PREPARING: _ClassVar[RolloutPhase]
    MIGRATING: _ClassVar[RolloutPhase]
    COMMITTING: _ClassVar[RolloutPhase]
    DONE: _ClassVar[RolloutPhase]
    ABORTED: _ClassVar[RolloutPhase]
MEMBER_KIND_UNSPECIFIED: MemberKind
SHARD: MemberKind
TRAINER: MemberKind
MEMBER_STATE_UNSPECIFIED: MemberState
ALIVE: MemberState
DEAD: MemberState
PLAN_EVENT_KIND_UNSPECIFIED: PlanEventKind
CURRENT: PlanEventKind
FENCE: PlanEventKind
RESUME: PlanEventKind
ROLLOUT_PHASE_UNSPECIFIED: RolloutPhase
IDLE: RolloutPhase
VALIDATING: RolloutPhase
FENCING: RolloutPhase
PREPARING: RolloutPhase
MIGRATING: RolloutPhase
COMMITTING: RolloutPhase
DONE: RolloutPhase
ABORTED: RolloutPhase

class Member(_message.Message):
    __slots__ = ("kind", "id", "address", "capacity_bytes", "device", "plan_version", "step", "state", "last_seen", "instance", "epoch")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    kind: MemberKind
    id: int
    address: str
    capacity_bytes: int
    device: str
    plan_version: int
    step: int
    state: MemberState
    last_seen: float
    instance: str
    epoch: int
    def __init__(self, kind: _Optional[_Union[MemberKind, str]] = ..., id: _Optional[int] = ..., address: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., device: _Optional[str] = ..., plan_version: _Optional[int] = ..., step: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., last_seen: _Optional[float] = ..., instance: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: Member
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_ms", "plan_version", "epoch")
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    plan_version: int
    epoch: int
    def __init__(self, lease_ms: _Optional[int] = ..., plan_version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("kind", "id", "instance", "plan_version", "step", "epoch")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    kind: MemberKind
    id: int
    instance: str
    plan_version: int
    step: int
    epoch: int
    def __init__(self, kind: _Optional[_Union[MemberKind, str]] = ..., id: _Optional[int] = ..., instance: _Optional[str] = ..., plan_version: _Optional[int] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "plan_version")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known: bool
    plan_version: int
    def __init__(self, known: _Optional[bool] = ..., plan_version: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("kind", "id", "instance")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    kind: MemberKind
    id: int
    instance: str
    def __init__(self, kind: _Optional[_Union[MemberKind, str]] = ..., id: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class PlanRecord(_message.Message):
    __slots__ = ("plan", "author", "reason", "created_at", "parent_version")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.ShardingPlan
    author: str
    reason: str
    created_at: float
    parent_version: int
    def __init__(self, plan: _Optional[_Union[_common_pb2.ShardingPlan, _Mapping]] = ..., author: _Optional[str] = ..., reason: _Optional[str] = ..., created_at: _Optional[float] = ..., parent_version: _Optional[int] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("record", "shard_addresses")
    class ShardAddressesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    record: PlanRecord
    shard_addresses: _containers.ScalarMap[int, str]
    def __init__(self, record: _Optional[_Union[PlanRecord, _Mapping]] = ..., shard_addresses: _Optional[_Mapping[int, str]] = ...) -> None: ...

class WatchPlanRequest(_message.Message):
    __slots__ = ("trainer_id",)
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    trainer_id: int
    def __init__(self, trainer_id: _Optional[int] = ...) -> None: ...

class PlanEvent(_message.Message):
    __slots__ = ("kind", "plan_version", "rollout_id", "target_version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: PlanEventKind
    plan_version: int
    rollout_id: str
    target_version: int
    def __init__(self, kind: _Optional[_Union[PlanEventKind, str]] = ..., plan_version: _Optional[int] = ..., rollout_id: _Optional[str] = ..., target_version: _Optional[int] = ...) -> None: ...

class ReportFencedRequest(_message.Message):
    __slots__ = ("trainer_id", "rollout_id", "step")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    trainer_id: int
    rollout_id: str
    step: int
    def __init__(self, trainer_id: _Optional[int] = ..., rollout_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class ReportFencedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanHistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class PlanHistoryResponse(_message.Message):
    __slots__ = ("current_version", "records")
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    current_version: int
    records: _containers.RepeatedCompositeFieldContainer[PlanRecord]
    def __init__(self, current_version: _Optional[int] = ..., records: _Optional[_Iterable[_Union[PlanRecord, _Mapping]]] = ...) -> None: ...

class ValidatePlanRequest(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.ShardingPlan
    def __init__(self, plan: _Optional[_Union[_common_pb2.ShardingPlan, _Mapping]] = ...) -> None: ...

class ValidatePlanResponse(_message.Message):
    __slots__ = ("violations",)
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    violations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, violations: _Optional[_Iterable[str]] = ...) -> None: ...

class ApplyPlanRequest(_message.Message):
    __slots__ = ("plan", "base_version", "author", "reason")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.ShardingPlan
    base_version: int
    author: str
    reason: str
    def __init__(self, plan: _Optional[_Union[_common_pb2.ShardingPlan, _Mapping]] = ..., base_version: _Optional[int] = ..., author: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("author", "reason")
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    author: str
    reason: str
    def __init__(self, author: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RolloutStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutProgress(_message.Message):
    __slots__ = ("rollout_id", "phase", "from_version", "to_version", "bytes_total", "bytes_done", "rows_total", "rows_done", "message", "pause_s", "fence_step")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    FENCE_STEP_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    phase: RolloutPhase
    from_version: int
    to_version: int
    bytes_total: int
    bytes_done: int
    rows_total: int
    rows_done: int
    message: str
    pause_s: float
    fence_step: int
    def __init__(self, rollout_id: _Optional[str] = ..., phase: _Optional[_Union[RolloutPhase, str]] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., rows_total: _Optional[int] = ..., rows_done: _Optional[int] = ..., message: _Optional[str] = ..., pause_s: _Optional[float] = ..., fence_step: _Optional[int] = ...) -> None: ...
