"""Row-wise quantization of embedding tables into the row layout fbgemm's IntNBit TBE reads.

A quantized row is `[scale fp16, bias fp16][packed values]` (INT8/INT4/INT2) or the plain values
(FP32/FP16), with no padding (CPU row alignment 1). The loader copies these rows into the TBE's
own, possibly padded, rows, so one package serves CPU and CUDA.
"""

from __future__ import annotations

import enum
import warnings

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import unpadded_row_size_in_bytes
from fbgemm_gpu.tbe.utils.quantize import quantize_embs

from protos import common_pb2


class TableDType(enum.Enum):
    """Storage type of one table in a package (TorchRec's per_table_weight_dtype)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"

    @property
    def sparse_type(self) -> SparseType:
        return SparseType[self.name]

    @classmethod
    def parse(cls, text: str, field: str = "dtype") -> TableDType:
        try:
            return cls(text.lower())
        except ValueError:
            raise ValueError(f"{field}: {text!r} is not one of {[d.value for d in cls]}") from None


class DenseQuantization(enum.Enum):
    """What the dense arch's Linear layers hold: float weights, or dynamic int8 (torch.ao)."""

    NONE = "none"
    INT8 = "int8"


def row_bytes(dim: int, dtype: TableDType) -> int:
    """Bytes of one stored row (scale/bias included, no alignment padding)."""
    return unpadded_row_size_in_bytes(dim, dtype.sparse_type)


def quantize_table(weights: torch.Tensor, dtype: TableDType) -> torch.Tensor:
    """float [rows, dim] -> uint8 [rows, row_bytes(dim, dtype)] in the TBE's row layout."""
    if weights.dim() != 2:
        raise ValueError(f"weights: expected [rows, dim], got shape {list(weights.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fbgemm's helper copy-constructs a tensor
        values, scale_bias = quantize_embs(weights.detach().float().contiguous(), dtype.sparse_type)
    values = values.reshape(weights.shape[0], -1)
    rows = values if scale_bias is None else torch.cat([scale_bias.reshape(weights.shape[0], -1), values], dim=1)
    expected = row_bytes(weights.shape[1], dtype)
    if rows.shape[1] != expected:  # fbgemm pads dims it cannot pack evenly; the TBE reads exactly `expected`
        raise ValueError(f"dim {weights.shape[1]}: {dtype.value} packs to {rows.shape[1]} bytes per row, the TBE "
                         f"reads {expected}; use a dim divisible by 8")
    return rows.contiguous()


def dequantize_table(rows: torch.Tensor, dim: int, dtype: TableDType) -> torch.Tensor:
    """uint8 [rows, row_bytes(dim, dtype)] in the TBE's row layout -> float [rows, dim] (quantize_table's inverse,
    up to its rounding)."""
    n = rows.shape[0]
    if dtype in (TableDType.FP32, TableDType.FP16):
        return rows.contiguous().view(torch.float32 if dtype is TableDType.FP32 else torch.float16).float().view(n, dim)
    scale_bias = rows[:, :4].contiguous().view(torch.float16).float()  # [n, 2]: scale, bias
    packed = rows[:, 4:]
    bits = {TableDType.INT8: 8, TableDType.INT4: 4, TableDType.INT2: 2}[dtype]
    per_byte = 8 // bits
    # element k of a byte sits at bits [k * bits, (k + 1) * bits): lowest first, as fbgemm packs
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    q = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :dim].float()
    return q * scale_bias[:, :1] + scale_bias[:, 1:]


def pooling_name(pooling: int) -> str:
    return "mean" if pooling == common_pb2.MEAN else "sum"
