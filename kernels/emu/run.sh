#!/usr/bin/env bash
# Runs the CUDA kernel sources on the CPU (no GPU, no nvcc: g++ ≥ 12 with C++20) against double
# precision references, to check indexing, tiling edges and tensor-core fragment layouts on a
# machine without a GPU. See emu/common.cuh for how CUDA is emulated and what is not checked
# (races, timing, anything the real hardware does differently from the PTX ISA's description).
#
# Then three runs that misread the wgmma layout on purpose (emu/wgmma.cuh, SD21_EMU_MUTATION)
# and must fail in the wgmma cases: they guard the emulator's own reading of the ISA; and one
# where a thread's wgmma differs from its warpgroup's, which the emulator must refuse.
#
# Usage: kernels/emu/run.sh   (prints one line per case; exit status non-zero on any failure)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="$(dirname "$here")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The emulator's own common.cuh and wgmma.cuh replace the real ones; every other header and
# source is copied (and rewritten below) next to them, so includes resolve to the emulated ones.
cp "$here/common.cuh" "$here/wgmma.cuh" "$here/check.cpp" "$work/"
for f in "$kernels"/*.cu "$kernels"/*.cuh; do
    [ -e "$here/$(basename "$f")" ] && continue
    # Shared memory → function statics (blocks run one at a time); dynamic shared memory → the
    # emulator's per-launch buffer.
    sed -E \
        -e 's/extern __shared__ (__align__\([0-9]+\) )?([A-Za-z_0-9]+) ([A-Za-z_0-9]+)\[\];/\2 *\3 = reinterpret_cast<\2 *>(emu::dyn_smem);/' \
        -e 's/__shared__/static/g' \
        "$f" >"$work/$(basename "$f")"
done
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I "$kernels" -I "$work" \
    -o "$work/check" "$work/check.cpp"
# Twice: cp.async landing as late as the ISA allows (a missing wait reads stale data), then as
# early (a stage refilled while a deferred wgmma still reads it is overwritten).
echo "== cp.async lands at its wait_group =="
stdbuf -oL "$work/check"
echo "== cp.async lands at issue =="
SD21_EMU_CP_ASYNC=early stdbuf -oL "$work/check"
echo "== misreadings of the wgmma layout, each of which must fail =="
status=0
for mutation in swap_lbo_sbo flip_trans_b accumulator_map; do
    if SD21_EMU_MUTATION="$mutation" "$work/check" >"$work/$mutation.log" 2>&1; then
        echo "FAIL $mutation passed: the emulator no longer checks this reading"
        status=1
    elif ! grep -q '^FAIL .*_sm90' "$work/$mutation.log"; then
        echo "FAIL $mutation failed, but in no wgmma case:"
        tail -5 "$work/$mutation.log"
        status=1
    else
        echo "ok   $mutation fails as it must ($(grep -c '^FAIL .*_sm90' "$work/$mutation.log") wgmma cases)"
    fi
done
# A thread whose wgmma differs from its warpgroup's, a cp.async stage read by wgmma without
# fence.proxy.async, and an accumulator changed between the fence and its wgmma must each stop
# the run with its check's message (in both cp.async modes).
for case in "non_uniform:the warpgroup's threads issued different wgmma groups" \
    "skip_proxy_fence:no fence.proxy.async by its writer" \
    "write_after_fence:registers changed between wgmma.fence"; do
    mutation="${case%%:*}" message="${case#*:}"
    for mode in late early; do
        if SD21_EMU_MUTATION="$mutation" SD21_EMU_CP_ASYNC="$mode" "$work/check" >"$work/$mutation.log" 2>&1 ||
            ! grep -q "$message" "$work/$mutation.log"; then
            echo "FAIL $mutation ($mode cp.async): the check did not stop the run"
            tail -3 "$work/$mutation.log"
            status=1
        else
            echo "ok   $mutation ($mode cp.async) stops the run as it must"
        fi
    done
done
exit "$status"
