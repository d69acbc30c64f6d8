# syntax=docker/dockerfile:1
#
# sd21 in two stages:
#   build    — NVIDIA's CUDA devel image (nvcc) + the Rust toolchain from rustup; the same build CI
#              does (.ci/run): SD21_REQUIRE_CUDA=1, so every kernel in kernels/ is compiled into the
#              binary and a missing nvcc fails the build; libclang for bindgen (kernels/params.h);
#              oneDNN for the CPU backend's GEMM (SD21_REQUIRE_ONEDNN=1).
#   runtime  — NVIDIA's CUDA runtime image of the same version (cudart, cuBLAS, cuBLASLt, NVRTC);
#              only the binary, a non-root user, weights in the /weights volume.
#
# Pick the CUDA version your driver supports (`nvidia-smi` shows the highest one):
#   docker build --build-arg CUDA_VERSION=13.0.2 -t sd21 .
# run_api.sh builds the image when it is missing and runs it as the original API did.
# The GPU driver (libcuda) comes from the host through the NVIDIA container toolkit (--gpus all).

ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04
ARG BUILD_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}

# ---------------------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG RUST_TOOLCHAIN=stable
# GPU architectures the kernels are compiled for (SASS for each, PTX for the newest); build.rs.
ARG SD21_CUDA_ARCHS=80,86,89,90

ENV DEBIAN_FRONTEND=noninteractive
# build-essential: the host compiler for nvcc and the C parts of dependencies (ring);
# libclang-dev: bindgen, as .ci/run installs it; libdnnl-dev: oneDNN, the CPU backend's GEMM
# (build.rs links it). Versions come with the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl libclang-dev \
       libdnnl-dev \
    && rm -rf /var/lib/apt/lists/*

ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_TOOLCHAIN}" \
    && rustc --version && cargo --version

WORKDIR /src
COPY . .

# As in .ci/run: nvcc named explicitly, and its absence is a build error.
ENV NVCC=/usr/local/cuda/bin/nvcc \
    SD21_REQUIRE_CUDA=1 \
    SD21_REQUIRE_ONEDNN=1 \
    SD21_CUDA_ARCHS=${SD21_CUDA_ARCHS}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sd21 \
    && install -m 0755 target/release/sd21 /usr/local/bin/sd21

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
# curl: the health check. libdnnl-dev pulls in the oneDNN library the binary links (its -dev
# package is named alike on every Ubuntu release, the library's soname package is not) and libgomp.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libdnnl-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 sd21 \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/sd21 sd21 \
    && mkdir -p /weights \
    && chown sd21:sd21 /weights

COPY --from=build /usr/local/bin/sd21 /usr/local/bin/sd21

# Serve on every interface inside the container; the model is a name (downloaded into /weights
# on first start, resumable) or a folder under /weights. Every SD21_* flag of `sd21 serve` can be
# set with -e (run_api.sh passes them on).
ENV SD21_HOST=0.0.0.0 \
    SD21_PORT=8000 \
    SD21_MODEL=sd21-base \
    SD21_WEIGHTS_DIR=/weights
VOLUME ["/weights"]
EXPOSE 8000

USER 10001:10001
WORKDIR /home/sd21

# /health answers as soon as the server listens; the first start may first download the model
# (about 2.6 GB), hence the long start period. Change the port with SD21_PORT (not --port), so
# the check follows.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${SD21_PORT}/health\" || exit 1"]

ENTRYPOINT ["sd21"]
CMD ["serve"]
