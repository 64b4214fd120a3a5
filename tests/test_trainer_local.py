"""Data-parallel tables train with the plain-torch forms of fbgemm's exact optimizers."""

from __future__ import annotations

import pytest
import torch

from protos import common_pb2
from tests import reference
from trainer.local import table_optimizer


@pytest.mark.parametrize("kind", ["exact_sgd", "exact_adagrad", "exact_rowwise_adagrad"])
def test_dense_optimizers_match_the_exact_reference(kind):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(30, 4, generator=gen)
    table = common_pb2.TableConfig(name="t", num_rows=30, dim=4, optimizer=common_pb2.OptimizerConfig(
        type=common_pb2.OptimizerType.Value(kind.upper()), learning_rate=0.1))
    weight = torch.nn.Parameter(w0.clone())
    opt = table_optimizer(table, [weight])
    ref = reference.RefTable(w0, kind, 0.1)
    for _ in range(4):
        ids = torch.randint(0, 30, (12,), generator=gen)  # duplicates included
        grads = torch.randn(12, 4, generator=gen)
        weight.grad = torch.zeros_like(weight).index_add_(0, ids, grads)
        opt.step()
        reference.apply(ref, ids, grads.double())
    torch.testing.assert_close(weight.detach().double(), ref.weights, atol=1e-6, rtol=0)
    assert not torch.equal(weight.detach(), w0)


def test_unsupported_optimizer_named():
    table = common_pb2.TableConfig(name="t", num_rows=3, dim=4,
                                   optimizer=common_pb2.OptimizerConfig(type=common_pb2.LAMB))
    with pytest.raises(ValueError, match="table 't': optimizer LAMB"):
        table_optimizer(table, [torch.nn.Parameter(torch.zeros(3, 4))])
