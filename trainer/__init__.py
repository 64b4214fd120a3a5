"""Trainers: data, the DLRM dense model, routing ids and gradients to the shard services."""
