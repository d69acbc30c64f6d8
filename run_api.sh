#!/usr/bin/env bash
# Runs the sd21 API in Docker, as the original API's run_api.sh did: builds the image when it is
# missing, then serves http://localhost/generate/ (host port 80 → the server's 8000) with every
# GPU, the weights folder mounted at /weights, and /docs for the interactive page.
#
#   ./run_api.sh                      serve SD 2.1-base (downloaded into ./weights on first start)
#   SD21_MODEL=sd21 ./run_api.sh      serve SD 2.1 768 (v-prediction)
#   ./run_api.sh --max-steps 50       extra arguments go to `sd21 serve`
#
# Settings of this script (not passed into the container):
#   SD21_IMAGE      image name (default sd21:latest)
#   SD21_REBUILD=1  rebuild the image even when it exists
#   CUDA_VERSION    CUDA of the image (default: the Dockerfile's); match your driver (nvidia-smi)
#   SD21_HTTP_PORT  host port (default 80)
#   SD21_WEIGHTS    host weights folder (default ./weights next to this script)
#   SD21_GPUS       docker --gpus value (default all; "none" runs on the CPU)
# Every other SD21_* variable (SD21_MODEL, SD21_API_KEY, SD21_QUEUE_SIZE, …) and HF_TOKEN,
# HF_ENDPOINT, HF_HUB_OFFLINE are passed to the server.
set -euo pipefail
cd "$(dirname "$0")"

image="${SD21_IMAGE:-sd21:latest}"
port="${SD21_HTTP_PORT:-80}"
weights="${SD21_WEIGHTS:-$PWD/weights}"
gpus="${SD21_GPUS:-all}"

if ! command -v docker >/dev/null 2>&1; then
    echo "run_api.sh: docker is not installed (or not on PATH)" >&2
    exit 1
fi

if [ "${SD21_REBUILD:-0}" = 1 ] || ! docker image inspect "$image" >/dev/null 2>&1; then
    build_args=()
    if [ -n "${CUDA_VERSION:-}" ]; then
        build_args+=(--build-arg "CUDA_VERSION=$CUDA_VERSION")
    fi
    echo "run_api.sh: building $image (first time: several minutes)" >&2
    docker build --progress=plain ${build_args[@]+"${build_args[@]}"} -t "$image" .
fi

# The server runs as the user calling this script (also under sudo), so downloaded weights
# belong to them.
uid="${SUDO_UID:-$(id -u)}"
gid="${SUDO_GID:-$(id -g)}"
if [ ! -d "$weights" ]; then
    mkdir -p "$weights"
    if [ -n "${SUDO_UID:-}" ]; then
        chown "$uid:$gid" "$weights"
    fi
fi
weights="$(cd "$weights" && pwd)"

run_args=(--rm --init -p "$port:8000" -v "$weights:/weights" --user "$uid:$gid")
if [ "$gpus" != none ]; then
    run_args+=(--gpus "$gpus")
fi
if [ -t 0 ] && [ -t 1 ]; then
    run_args+=(-it)
fi
# Pass SD21_* settings on, except this script's own and those the image fixes (address, port,
# weights folder).
while IFS= read -r name; do
    case "$name" in
        SD21_IMAGE | SD21_REBUILD | SD21_HTTP_PORT | SD21_WEIGHTS | SD21_GPUS) ;;
        SD21_HOST | SD21_PORT | SD21_WEIGHTS_DIR) ;;
        SD21_* | HF_TOKEN | HF_ENDPOINT | HF_HUB_OFFLINE) run_args+=(-e "$name") ;;
        *) ;;
    esac
done < <(compgen -e)

url="http://localhost"
if [ "$port" != 80 ]; then
    url="$url:$port"
fi
echo "sd21: POST $url/generate/ — interactive docs at $url/docs (once the model has loaded;" \
    "the first start downloads it into $weights)" >&2

exec docker run "${run_args[@]}" "$image" serve "$@"
