from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureRef(_message.Message):
    __slots__ = ("feature", "slice")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    feature: str
    slice: int
    def __init__(self, feature: _Optional[str] = ..., slice: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("plan_version", "trainer_id", "step", "no_grad", "batch_size", "features", "lengths", "values", "weights", "output_dtype", "trainer_epoch")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    trainer_id: int
    step: int
    no_grad: bool
    batch_size: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureRef]
    lengths: _common_pb2.Tensor
    values: _common_pb2.Tensor
    weights: _common_pb2.Tensor
    output_dtype: _common_pb2.DType
    trainer_epoch: int
    def __init__(self, plan_version: _Optional[int] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ..., no_grad: _Optional[bool] = ..., batch_size: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureRef, _Mapping]]] = ..., lengths: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., trainer_epoch: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("handle", "embeddings", "dims")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    embeddings: _common_pb2.Tensor
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handle: _Optional[str] = ..., embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., dims: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("plan_version", "handle", "grad", "trainer_epoch")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    TRAINER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    handle: str
    grad: _common_pb2.Tensor
    trainer_epoch: int
    def __init__(self, plan_version: _Optional[int] = ..., handle: _Optional[str] = ..., grad: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., trainer_epoch: _Optional[int] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("applied_step", "merged_trainers")
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    MERGED_TRAINERS_FIELD_NUMBER: _ClassVar[int]
    applied_step: int
    merged_trainers: int
    def __init__(self, applied_step: _Optional[int] = ..., merged_trainers: _Optional[int] = ...) -> None: ...

class LookupRowsRequest(_message.Message):
    __slots__ = ("plan_version", "table", "ids")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    table: FeatureRef
    ids: _common_pb2.Tensor
    def __init__(self, plan_version: _Optional[int] = ..., table: _Optional[_Union[FeatureRef, _Mapping]] = ..., ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LookupRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _common_pb2.Tensor
    def __init__(self, rows: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("plan_version", "directory", "step")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    directory: str
    step: int
    def __init__(self, plan_version: _Optional[int] = ..., directory: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("manifest_path", "bytes_written")
    MANIFEST_PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    manifest_path: str
    bytes_written: int
    def __init__(self, manifest_path: _Optional[str] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("plan_version", "directory")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    directory: str
    def __init__(self, plan_version: _Optional[int] = ..., directory: _Optional[str] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("step", "bytes_read")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    step: int
    bytes_read: int
    def __init__(self, step: _Optional[int] = ..., bytes_read: _Optional[int] = ...) -> None: ...

class ExportRowsRequest(_message.Message):
    __slots__ = ("plan_version", "slice", "row_start", "row_end", "chunk_rows", "crc32")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_END_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    slice: int
    row_start: int
    row_end: int
    chunk_rows: int
    crc32: bool
    def __init__(self, plan_version: _Optional[int] = ..., slice: _Optional[int] = ..., row_start: _Optional[int] = ..., row_end: _Optional[int] = ..., chunk_rows: _Optional[int] = ..., crc32: _Optional[bool] = ...) -> None: ...

class RowChunk(_message.Message):
    __slots__ = ("plan_version", "table", "slice", "row_start", "weights", "optimizer_state", "sha256", "crc32")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    table: str
    slice: int
    row_start: int
    weights: _common_pb2.Tensor
    optimizer_state: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    sha256: bytes
    crc32: int
    def __init__(self, plan_version: _Optional[int] = ..., table: _Optional[str] = ..., slice: _Optional[int] = ..., row_start: _Optional[int] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., optimizer_state: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., sha256: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class ImportRowsResponse(_message.Message):
    __slots__ = ("rows", "chunks")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    chunks: int
    def __init__(self, rows: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SliceInfo(_message.Message):
    __slots__ = ("index", "slice", "features", "weight_bytes", "optimizer_bytes", "optimizer")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    index: int
    slice: _common_pb2.TableSlice
    features: _containers.RepeatedScalarFieldContainer[str]
    weight_bytes: int
    optimizer_bytes: int
    optimizer: str
    def __init__(self, index: _Optional[int] = ..., slice: _Optional[_Union[_common_pb2.TableSlice, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., weight_bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ..., optimizer: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("shard_id", "plan_version", "device", "mode", "num_trainers", "slices", "weight_bytes", "optimizer_bytes", "resident_bytes", "lookups", "updates", "rows_looked_up", "rows_updated", "applied_step", "staged_version")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAINERS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ROWS_LOOKED_UP_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    STAGED_VERSION_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    plan_version: int
    device: str
    mode: str
    num_trainers: int
    slices: _containers.RepeatedCompositeFieldContainer[SliceInfo]
    weight_bytes: int
    optimizer_bytes: int
    resident_bytes: int
    lookups: int
    updates: int
    rows_looked_up: int
    rows_updated: int
    applied_step: int
    staged_version: int
    def __init__(self, shard_id: _Optional[int] = ..., plan_version: _Optional[int] = ..., device: _Optional[str] = ..., mode: _Optional[str] = ..., num_trainers: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[SliceInfo, _Mapping]]] = ..., weight_bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., updates: _Optional[int] = ..., rows_looked_up: _Optional[int] = ..., rows_updated: _Optional[int] = ..., applied_step: _Optional[int] = ..., staged_version: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: _common_pb2.ShardAssignment
    def __init__(self, assignment: _Optional[_Union[_common_pb2.ShardAssignment, _Mapping]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("weight_bytes", "optimizer_bytes")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    optimizer_bytes: int
    def __init__(self, weight_bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ...) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("plan_version", "source", "source_plan_version", "source_slice", "row_start", "row_end", "src_col_start", "num_cols", "dest_slice", "dest_row_start", "dest_col_start", "chunk_rows")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SLICE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_END_FIELD_NUMBER: _ClassVar[int]
    SRC_COL_START_FIELD_NUMBER: _ClassVar[int]
    NUM_COLS_FIELD_NUMBER: _ClassVar[int]
    DEST_SLICE_FIELD_NUMBER: _ClassVar[int]
    DEST_ROW_START_FIELD_NUMBER: _ClassVar[int]
    DEST_COL_START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    source: str
    source_plan_version: int
    source_slice: int
    row_start: int
    row_end: int
    src_col_start: int
    num_cols: int
    dest_slice: int
    dest_row_start: int
    dest_col_start: int
    chunk_rows: int
    def __init__(self, plan_version: _Optional[int] = ..., source: _Optional[str] = ..., source_plan_version: _Optional[int] = ..., source_slice: _Optional[int] = ..., row_start: _Optional[int] = ..., row_end: _Optional[int] = ..., src_col_start: _Optional[int] = ..., num_cols: _Optional[int] = ..., dest_slice: _Optional[int] = ..., dest_row_start: _Optional[int] = ..., dest_col_start: _Optional[int] = ..., chunk_rows: _Optional[int] = ...) -> None: ...

class PullRowsResponse(_message.Message):
    __slots__ = ("rows", "chunks", "bytes", "sha256")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    rows: int
    chunks: int
    bytes: int
    sha256: bytes
    def __init__(self, rows: _Optional[int] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("plan_version", "applied_step")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    applied_step: int
    def __init__(self, plan_version: _Optional[int] = ..., applied_step: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("plan_version",)
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    def __init__(self, plan_version: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("plan_version",)
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    def __init__(self, plan_version: _Optional[int] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...
