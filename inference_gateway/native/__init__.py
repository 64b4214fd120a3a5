"""serve-native: the gateway on a native gRPC frontend (frontend.cc: grpc++, a dynamic batcher and
admission) over supervised Python workers that score whole batches (worker.py), sharing one read-only
copy of the tables; build.py compiles the frontend, supervisor.py runs it all."""
