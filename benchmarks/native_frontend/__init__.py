"""A prototype native frontend (frontend.cc: grpc++ and a dynamic batcher) over Python batch workers
(worker.py), measured by benchmarks.native_floor; not part of the product."""
