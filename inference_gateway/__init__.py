"""Inference gateway: quantized packaged DLRM models served over gRPC with dynamic batching."""
