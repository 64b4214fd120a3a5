"""Embedding shard service: sharded fbgemm TBE tables behind gRPC."""
