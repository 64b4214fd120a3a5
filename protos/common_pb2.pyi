from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]

class ShardingType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARDING_TYPE_UNSPECIFIED: _ClassVar[ShardingType]
    DATA_PARALLEL: _ClassVar[ShardingType]
    TABLE_WISE: _ClassVar[ShardingType]
    ROW_WISE: _ClassVar[ShardingType]
    COLUMN_WISE: _ClassVar[ShardingType]
    TABLE_ROW_WISE: _ClassVar[ShardingType]

class PoolingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_MODE_UNSPECIFIED: _ClassVar[PoolingMode]
    SUM: _ClassVar[PoolingMode]
    MEAN: _ClassVar[PoolingMode]

class OptimizerType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_TYPE_UNSPECIFIED: _ClassVar[OptimizerType]
    EXACT_SGD: _ClassVar[OptimizerType]
    EXACT_ADAGRAD: _ClassVar[OptimizerType]
    EXACT_ROWWISE_ADAGRAD: _ClassVar[OptimizerType]
    ADAM: _ClassVar[OptimizerType]
    PARTIAL_ROWWISE_ADAM: _ClassVar[OptimizerType]
    LAMB: _ClassVar[OptimizerType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
UINT8: DType
INT8: DType
SHARDING_TYPE_UNSPECIFIED: ShardingType
DATA_PARALLEL: ShardingType
TABLE_WISE: ShardingType
ROW_WISE: ShardingType
COLUMN_WISE: ShardingType
TABLE_ROW_WISE: ShardingType
POOLING_MODE_UNSPECIFIED: PoolingMode
SUM: PoolingMode
MEAN: PoolingMode
OPTIMIZER_TYPE_UNSPECIFIED: OptimizerType
EXACT_SGD: OptimizerType
EXACT_ADAGRAD: OptimizerType
EXACT_ROWWISE_ADAGRAD: OptimizerType
ADAM: OptimizerType
PARTIAL_ROWWISE_ADAM: OptimizerType
LAMB: OptimizerType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("type", "learning_rate", "eps", "weight_decay", "beta1", "beta2")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    type: OptimizerType
    learning_rate: float
    eps: float
    weight_decay: float
    beta1: float
    beta2: float
    def __init__(self, type: _Optional[_Union[OptimizerType, str]] = ..., learning_rate: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ...) -> None: ...

class TableConfig(_message.Message):
    __slots__ = ("name", "num_rows", "dim", "features", "pooling", "optimizer", "init_min", "init_max")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    INIT_MIN_FIELD_NUMBER: _ClassVar[int]
    INIT_MAX_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    dim: int
    features: _containers.RepeatedScalarFieldContainer[str]
    pooling: PoolingMode
    optimizer: OptimizerConfig
    init_min: float
    init_max: float
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., pooling: _Optional[_Union[PoolingMode, str]] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., init_min: _Optional[float] = ..., init_max: _Optional[float] = ...) -> None: ...

class TableSlice(_message.Message):
    __slots__ = ("table", "row_offset", "num_rows", "col_offset", "num_cols", "sharding_type")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    COL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_COLS_FIELD_NUMBER: _ClassVar[int]
    SHARDING_TYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int
    sharding_type: ShardingType
    def __init__(self, table: _Optional[str] = ..., row_offset: _Optional[int] = ..., num_rows: _Optional[int] = ..., col_offset: _Optional[int] = ..., num_cols: _Optional[int] = ..., sharding_type: _Optional[_Union[ShardingType, str]] = ...) -> None: ...

class ShardAssignment(_message.Message):
    __slots__ = ("plan_version", "shard_id", "tables", "slices")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    shard_id: int
    tables: _containers.RepeatedCompositeFieldContainer[TableConfig]
    slices: _containers.RepeatedCompositeFieldContainer[TableSlice]
    def __init__(self, plan_version: _Optional[int] = ..., shard_id: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableConfig, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[TableSlice, _Mapping]]] = ...) -> None: ...

class PlacedSlice(_message.Message):
    __slots__ = ("slice", "shard")
    SLICE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    slice: TableSlice
    shard: int
    def __init__(self, slice: _Optional[_Union[TableSlice, _Mapping]] = ..., shard: _Optional[int] = ...) -> None: ...

class ShardingPlan(_message.Message):
    __slots__ = ("version", "num_shards", "tables", "slices", "data_parallel")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableConfig]
    slices: _containers.RepeatedCompositeFieldContainer[PlacedSlice]
    data_parallel: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableConfig, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[PlacedSlice, _Mapping]]] = ..., data_parallel: _Optional[_Iterable[str]] = ...) -> None: ...
