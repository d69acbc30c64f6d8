#!/usr/bin/env bash
# Builds, here, the test binaries that scripts/gpu-check.sh runs on a GPU machine (which has
# no Rust toolchain): `cargo test --release --no-run` with every kernel compiled (nvcc from
# scripts/install-nvcc.sh unless NVCC is set; SD21_REQUIRE_CUDA=1), then copies each test
# executable, stripped, into the git-ignored folder .gpu-bin/ with a BUILD.txt saying what was
# built from what, and the release sd21 (gpu-check.sh runs `sd21 selftest`) and sd21-bench
# beside them (gpu-check.sh runs its kernel and pipeline benchmarks), plus the wheels of diffusers (pure Python) in .gpu-bin/wheels/: the GPU
# machines have PyTorch and transformers but not diffusers, and cannot download (gpu-check.sh unpacks
# them when its Python lacks diffusers, so sd21 is timed side by side with diffusers there). Carry
# that folder with the run: `carry: [".gpu-bin"]`.
#
# Usage: scripts/build-gpu-bin.sh [TEST_TARGET ...]   (default: cuda_ops)
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(cuda_ops)

if [ -z "${NVCC:-}" ]; then
    NVCC="$(scripts/install-nvcc.sh)"
fi
export NVCC SD21_REQUIRE_CUDA=1

out=.gpu-bin
mkdir -p "$out"
args=()
for t in "${targets[@]}"; do args+=(--test "$t"); done

json="$(mktemp)"
trap 'rm -f "$json"' EXIT
echo "build-gpu-bin: cargo test --release --no-run ${args[*]} (NVCC=$NVCC)" >&2
cargo test --release --no-run "${args[@]}" --message-format=json-render-diagnostics >"$json"
echo "build-gpu-bin: cargo build --release --bin sd21-bench --bin sd21" >&2
cargo build --release --bin sd21-bench --bin sd21
for b in sd21-bench sd21; do
    cp "target/release/$b" "$out/$b"
    strip "$out/$b"
    echo "build-gpu-bin: $out/$b ($(du -h "$out/$b" | cut -f1))" >&2
done

# diffusers for the side-by-side reference (torch_reference.py pins it; importlib_metadata is its
# one dependency those machines lack). Without network here the check times sd21 alone.
wheels="$out/wheels"
mkdir -p "$wheels"
if ! ls "$wheels"/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
    rm -f "$wheels"/*.whl
    if ! python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
        diffusers==0.42.1 importlib_metadata==8.7.0 >&2; then
        echo "build-gpu-bin: WARNING: could not download the diffusers wheels; gpu-check.sh will time sd21 without the diffusers reference" >&2
    fi
fi

for t in "${targets[@]}"; do
    # The compiler-artifact line of test target $t carries its executable's path.
    exe="$(python3 - "$json" "$t" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact":
        continue
    target = msg.get("target", {})
    if target.get("name") == name and "test" in target.get("kind", []) and msg.get("executable"):
        print(msg["executable"])
PY
)"
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        echo "build-gpu-bin: no executable found for test target $t" >&2
        exit 1
    fi
    cp "$exe" "$out/$t"
    strip "$out/$t"
    echo "build-gpu-bin: $out/$t ($(du -h "$out/$t" | cut -f1)) from $exe" >&2
done

{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu-bin' || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), glibc $(ldd --version | head -n1 | awk '{print $NF}')"
    echo "nvcc: $("$NVCC" --version | grep release)"
    echo "archs: ${SD21_CUDA_ARCHS:-80,86,89,90 (default)}"
    echo "targets: ${targets[*]} + sd21 + sd21-bench"
    echo "wheels: $(cd "$wheels" && ls ./*.whl 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
} >"$out/BUILD.txt"

total=$(du -sm "$out" | cut -f1)
echo "build-gpu-bin: $out holds ${total} MiB (the run tool carries at most 64 MiB in all)" >&2
if [ "$total" -gt 60 ]; then
    echo "build-gpu-bin: WARNING: $out is close to or over the carry limit" >&2
fi
