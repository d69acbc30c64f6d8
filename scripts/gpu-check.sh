#!/usr/bin/env bash
# The one command run on a GPU machine (no Rust there): runs the prebuilt CUDA test binary
# (every op vs the CPU backend, the tiny pipeline CUDA vs CPU), then, when they passed, the
# prebuilt sd21-bench (kernel table against the measured ceilings; a full-size SD 2.1 512²
# pipeline with random weights, side by side with diffusers when a Python with torch + diffusers
# is found there), and writes a JSON report.
#
# Before the call, here: scripts/build-gpu-bin.sh  (fills the git-ignored .gpu-bin/)
# The call:              run(command="bash scripts/gpu-check.sh", carry=[".gpu-bin"])
#
# - Fails cleanly (message, exit 2, a report saying why) when the prebuilt binary, the GPU, the
#   driver or cuBLAS is missing.
# - cuBLAS 13 lives inside PyPI packages on those machines (e.g. under /opt/torch/.venv), not on
#   the loader path: libcublas.so.13 and libcublasLt.so.13 are searched for and their folders put
#   on LD_LIBRARY_PATH (SD21_CUBLAS_DIR names a folder to try first).
# - First `sd21 selftest --device cuda` (the start-up self-test as a user runs it; reported as
#   `sd21_selftest`, table in $OUT/selftest.txt; a failure is reported, and the tests below
#   then say which kernel is wrong).
# - The tests include the start-up self-test (`the_start_up_self_test_passes_on_this_gpu`, what
#   `sd21 selftest --device cuda` prints; its table lands in the report as `selftest`) and a
#   full-size 768² VAE decode checked for finite pixels. Then, where compute-sanitizer exists,
#   memcheck, racecheck and synccheck on the small attention and convolution tests (reported as
#   `sanitizer`, logs in $OUT/sanitizer-*.log; not part of the exit code).
# - Tests run with SD21_EXPECT_GPU=1 (a test that would skip fails instead) and
#   SD21_REPO_ROOT=$PWD (fixtures), under `timeout` (SD21_GPU_TEST_TIMEOUT seconds, default 240).
# - Writes $OUT/gpu-check.json (OUT defaults to .gpu-bin/out) and the full log beside it; prints
#   the report's path and a summary; exits non-zero when any test failed.
# - `--no-gpu-probe` skips the GPU and cuBLAS checks and does not set SD21_EXPECT_GPU: only for
#   testing this script's own logic on a machine without a GPU (the tests then skip, and the
#   benchmarks run on the CPU at the smoke shapes and the tiny model).
# - Benchmarks: $OUT/kernels.{txt,json}, $OUT/pipeline.{txt,json}, each under `timeout`
#   (SD21_GPU_BENCH_TIMEOUT seconds each, default 120; every limit is also capped by what is left
#   of SD21_GPU_CHECK_BUDGET, default 570 s, so the whole check ends under the
#   run tool's 600 s per command). A failed benchmark fails the check (exit 3). The diffusers
#   reference uses SD21_TORCH_PYTHON, else /opt/torch/.venv/bin/python, else python3, whichever
#   imports torch and diffusers (else the first that imports torch, with the diffusers wheels that
#   build-gpu-bin.sh put in .gpu-bin/wheels unpacked onto PYTHONPATH); SD21_TORCH_PYTHON=none
#   times sd21 alone.
set -uo pipefail
cd "$(dirname "$0")/.."

probe=1
[ "${1:-}" = "--no-gpu-probe" ] && probe=0

out="${OUT:-.gpu-bin/out}"
mkdir -p "$out"
report="$out/gpu-check.json"
log="$out/cuda_ops.log"
bin=.gpu-bin/cuda_ops
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Every step's time limit is also capped by what is left of SD21_GPU_CHECK_BUDGET seconds
# (default 570: the run tool stops a command at 600), so the report is always written.
deadline=$(($(date +%s) + ${SD21_GPU_CHECK_BUDGET:-570}))
# limit DEFAULT: DEFAULT seconds, or what is left before the deadline (less 10 s for the report).
limit() {
    local left=$((deadline - $(date +%s) - 10))
    [ "$left" -lt 1 ] && left=1
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
gpu_info=""
cublas_dir=""
bench_status="not run"

# write_report STATUS MESSAGE [EXIT_CODE]: the JSON report (python3 when present, else a minimal
# one by hand).
write_report() {
    local status="$1" message="$2" code="${3:-0}"
    if command -v python3 >/dev/null 2>&1; then
        STATUS="$status" MESSAGE="$message" CODE="$code" STARTED="$started" GPU="$gpu_info" \
            CUBLAS="$cublas_dir" LOG="$log" RERUN_LOG="${rerun_log:-}" BUILD=.gpu-bin/BUILD.txt OUTDIR="$out" \
            BENCH_STATUS="$bench_status" SANITIZER="${sanitizer_summary:-not run}" \
            SELFTEST="${selftest_status:-not run}" python3 - >"$report" <<'PY'
import json, os, re
def read_json(name):
    path = os.path.join(os.environ["OUTDIR"], name)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
def parse(log_path):
    """Tests, checks, the summary line and the panics of one run of the test binary."""
    lines = open(log_path, errors="replace").read().splitlines() if os.path.exists(log_path) else []
    tests, checks, summary = {}, [], None
    selftest, in_selftest = [], False
    in_failures = False
    for line in lines:
        # With --nocapture and parallel tests, "test NAME ... " and its result can be split by
        # other output: a name is recorded when seen, its result when on the same line, and the
        # closing "failures:" list settles the failed ones.
        m = re.match(r"^test (\S+) \.\.\. ?(ok|FAILED|ignored)?", line)
        if m:
            tests[m.group(1)] = m.group(2) or tests.get(m.group(1)) or "unknown"
        # The start-up self-test's table (one println, so its lines stay together; with
        # --nocapture its first line may follow "test NAME ... ").
        if "self-test of " in line:
            selftest, in_selftest = [line[line.index("self-test of "):]], True
            continue
        if in_selftest:
            selftest.append(line)
            in_selftest = not re.match(r"^\d+ cases: ", line)
            continue
        if line == "failures:":
            in_failures = True
        elif in_failures:
            m = re.match(r"^    (\S+)$", line)
            if m:
                tests[m.group(1)] = "FAILED"
            elif line.strip() and not line.startswith("---- "):
                in_failures = False
        m = re.search(r"check (.+): rel_l2=(\S+) max_abs=(\S+)", line)
        if m:
            checks.append({"what": m.group(1), "rel_l2": float(m.group(2)), "max_abs": float(m.group(3))})
        m = re.search(r"check (tiny pipeline .+): mean \|diff\| = (\S+)/255, max = (\d+)/255", line)
        if m:
            checks.append({"what": m.group(1), "mean_abs_diff_255": float(m.group(2)), "max_abs_diff_255": int(m.group(3))})
        if line.startswith("test result:"):
            summary = line
    return {
        "summary": summary,
        "tests": tests,
        "passed": sorted(k for k, v in tests.items() if v == "ok"),
        "failed": sorted(k for k, v in tests.items() if v == "FAILED"),
        "checks": checks,
        "selftest": selftest,
        "panics": [l for l in lines if "panicked at" in l or l.startswith("thread '")][:50],
        "log": log_path,
    }
build = open(os.environ["BUILD"]).read().splitlines() if os.path.exists(os.environ["BUILD"]) else []
rerun = os.environ.get("RERUN_LOG")
print(json.dumps({
    "status": os.environ["STATUS"],
    "message": os.environ["MESSAGE"],
    "exit_code": int(os.environ["CODE"]),
    "started": os.environ["STARTED"],
    "gpu": os.environ["GPU"],
    "cublas_dir": os.environ["CUBLAS"],
    "build": build,
    **parse(os.environ["LOG"]),
    "rerun_without_wgmma_and_graphs": parse(rerun) if rerun else None,
    "sanitizer": os.environ["SANITIZER"],
    "sd21_selftest": {
        "status": os.environ["SELFTEST"],
        "table": (open(os.path.join(os.environ["OUTDIR"], "selftest.txt"), errors="replace").read().splitlines()
                  if os.path.exists(os.path.join(os.environ["OUTDIR"], "selftest.txt")) else []),
    },
    "benchmarks": {
        "status": os.environ["BENCH_STATUS"],
        "kernels": read_json("kernels.json"),
        "pipeline": read_json("pipeline.json"),
    },
}, indent=2))
PY
    else
        printf '{"status": "%s", "message": "%s", "exit_code": %s, "log": "%s"}\n' \
            "$status" "${message//\"/\'}" "$code" "$log" >"$report"
    fi
}

fail() {
    local code="$1" message="$2"
    echo "gpu-check: FAILED: $message" >&2
    write_report "error" "$message" "$code"
    echo "gpu-check: report: $report" >&2
    exit "$code"
}

# 1. The prebuilt binary.
if [ ! -x "$bin" ]; then
    fail 2 "no prebuilt test binary at $bin: run scripts/build-gpu-bin.sh before the call and carry .gpu-bin"
fi
[ -f .gpu-bin/BUILD.txt ] && sed 's/^/gpu-check: build: /' .gpu-bin/BUILD.txt >&2

if [ "$probe" = 1 ]; then
    # 2. A GPU and its driver.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        fail 2 "no GPU here: nvidia-smi is not installed"
    fi
    if ! gpu_info="$(nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)" ||
        [ -z "$gpu_info" ]; then
        fail 2 "no GPU here: nvidia-smi found no device ($gpu_info)"
    fi
    echo "gpu-check: GPU: $gpu_info" >&2
    # The driver library normally sits on the loader path; if it does not, find it.
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
        d="$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local -name libcuda.so.1 2>/dev/null | head -n1)"
        [ -n "$d" ] || fail 2 "libcuda.so.1 (the CUDA driver library) not found"
        export LD_LIBRARY_PATH="$(dirname "$d")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "gpu-check: driver library from $(dirname "$d")" >&2
    fi

    # 3. cuBLAS 13 (both libraries, one folder each; usually the same).
    find_lib() {
        local name="$1" d
        for d in "${SD21_CUBLAS_DIR:-}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
            [ -n "$d" ] && [ -e "$d/$name" ] && { echo "$d"; return 0; }
        done
        d="$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF; exit}')"
        [ -n "$d" ] && { dirname "$d"; return 0; }
        d="$(find /opt/torch/.venv /opt /usr/local /usr/lib -name "$name" 2>/dev/null | head -n1)"
        [ -n "$d" ] && { dirname "$d"; return 0; }
        return 1
    }
    cublas_dir="$(find_lib libcublas.so.13)" || fail 2 "libcublas.so.13 not found (set SD21_CUBLAS_DIR)"
    cublaslt_dir="$(find_lib libcublasLt.so.13)" || fail 2 "libcublasLt.so.13 not found (set SD21_CUBLAS_DIR)"
    export LD_LIBRARY_PATH="$cublas_dir:$cublaslt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "gpu-check: cuBLAS from $cublas_dir" >&2
    export SD21_EXPECT_GPU=1
fi

# 3b. The start-up self-test as a user runs it (`sd21 selftest`: every op family against the CPU
#     backend, the wgmma kernels against the portable ones), its table in $OUT/selftest.txt.
selftest_status="not run: no .gpu-bin/sd21 (scripts/build-gpu-bin.sh builds it)"
if [ -x .gpu-bin/sd21 ]; then
    selftest_device=cuda
    [ "$probe" = 0 ] && selftest_device=cpu
    echo "gpu-check: sd21 selftest --device $selftest_device" >&2
    timeout "$(limit 120)" .gpu-bin/sd21 selftest --device "$selftest_device" >"$out/selftest.txt" 2>&1
    selftest_rc=$?
    cat "$out/selftest.txt" >&2
    selftest_status="exit $selftest_rc (--device $selftest_device; $out/selftest.txt)"
fi

# 4. The tests.
export SD21_REPO_ROOT="$PWD" RUST_BACKTRACE=1
echo "gpu-check: running $bin (log: $log)" >&2
timeout "$(limit "${SD21_GPU_TEST_TIMEOUT:-240}")" "$bin" --nocapture --test-threads=4 >"$log" 2>&1
rc=$?

# 4b. A kernel fault is sticky: it breaks the process's GPU context and fails every test after
#     it, and a kernel that never finishes stops the run at its time limit. The newest, least
#     proven paths are the wgmma kernels and CUDA graphs: when the run failed, run again without
#     them (within what is left of the budget), so the portable kernels still get checked and
#     benchmarked (the report keeps both runs; the check still fails).
rerun_rc=""
if [ "$rc" != 0 ]; then
    rerun_log="$out/cuda_ops_portable.log"
    echo "gpu-check: tests failed (exit $rc); rerunning without the wgmma kernels and CUDA graphs (log: $rerun_log)" >&2
    SD21_WGMMA=0 timeout "$(limit "${SD21_GPU_TEST_TIMEOUT:-240}")" "$bin" --nocapture --test-threads=4 \
        --skip conv_portable_kernel_on_hopper_and_wgmma_active \
        --skip attention_mma_sync_kernel_on_hopper_and_wgmma_active \
        --skip unet_cuda_graph_replays_match_op_by_op >"$rerun_log" 2>&1
    rerun_rc=$?
    if [ "$rerun_rc" = 0 ]; then
        export SD21_WGMMA=0  # the benchmarks below then time the portable kernels
    fi
fi

# 4c. compute-sanitizer (memcheck, racecheck, synccheck) on the flash-attention and convolution
#     kernels at small shapes, where the tool exists on this machine. Its findings are reported;
#     they do not change the exit code (the tool's own limits and false positives are unknown
#     on these machines until it has run once).
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null ||
    find /opt /usr/local -name compute-sanitizer -type f 2>/dev/null | head -n1)"
sanitizer_summary=""
if [ "$probe" = 1 ] && [ -n "$sanitizer" ] && [ -x "$sanitizer" ]; then
    for tool in memcheck racecheck synccheck; do
        tool_log="$out/sanitizer-$tool.log"
        echo "gpu-check: $sanitizer --tool $tool (log: $tool_log)" >&2
        timeout "$(limit 90)" "$sanitizer" --tool "$tool" --error-exitcode 9 "$bin" --nocapture \
            --test-threads=1 --exact conv_awkward_shapes_match_cpu attention_awkward_shapes >"$tool_log" 2>&1
        sanitizer_summary="$sanitizer_summary$tool=exit $? ($(grep -c '^========= ' "$tool_log") tool lines); "
    done
else
    sanitizer_summary="not run: $([ "$probe" = 1 ] && echo 'no compute-sanitizer on this machine' || echo '--no-gpu-probe')"
fi
echo "gpu-check: sanitizer: $sanitizer_summary" >&2

# 5. The benchmarks, only on kernels that passed their tests.
bench=.gpu-bin/sd21-bench
bench_rc=0
if [ "$rc" = 0 ] || [ "$rerun_rc" = 0 ]; then
    if [ ! -x "$bench" ]; then
        bench_status="missing: no $bench (scripts/build-gpu-bin.sh builds it)"
        bench_rc=3
    else
        if [ "$probe" = 1 ]; then
            kernel_args=(--device cuda --shapes all)
            pipeline_args=(--device cuda --random sd21-512 --steps 20)
        else
            kernel_args=(--device cpu --shapes smoke --repeats 1)
            pipeline_args=(--device cpu --random tiny --steps 2 --repeats 1)
        fi
        # diffusers on the same work, when this machine has it (SD21_TORCH_PYTHON=none: never).
        torch_python=""
        candidates=("${SD21_TORCH_PYTHON:-}" /opt/torch/.venv/bin/python python3)
        [ "${SD21_TORCH_PYTHON:-}" = none ] && candidates=()
        for p in "${candidates[@]}"; do
            if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 &&
                "$p" -c "import torch, diffusers" >/dev/null 2>&1; then
                torch_python="$p"
                break
            fi
        done
        # No diffusers there (the usual case: PyTorch is installed, diffusers is not, nothing can
        # be downloaded): unpack the carried wheels (pure Python) onto PYTHONPATH and try again.
        if [ -z "$torch_python" ] && ls .gpu-bin/wheels/*.whl >/dev/null 2>&1; then
            pylib="$(mktemp -d)"
            for p in "${candidates[@]}"; do
                if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then
                    for w in .gpu-bin/wheels/*.whl; do "$p" -m zipfile -e "$w" "$pylib"; done
                    if PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}" "$p" -c "import torch, diffusers" >/dev/null 2>&1; then
                        export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
                        torch_python="$p"
                        echo "gpu-check: diffusers from the carried wheels ($(ls .gpu-bin/wheels | tr '\n' ' '))" >&2
                    else
                        echo "gpu-check: the carried diffusers wheels do not import with $p:" >&2
                        PYTHONPATH="$pylib" "$p" -c "import diffusers" 2>&1 | tail -n 3 >&2
                    fi
                    break
                fi
            done
        fi
        if [ -n "$torch_python" ]; then
            pipeline_args+=(--compare-torch --python "$torch_python")
            echo "gpu-check: diffusers reference with $torch_python" >&2
        else
            echo "gpu-check: no Python with torch + diffusers here: pipeline without the reference" >&2
        fi
        bench_timeout="${SD21_GPU_BENCH_TIMEOUT:-120}"
        echo "gpu-check: sd21-bench kernels ${kernel_args[*]}" >&2
        timeout "$(limit "$bench_timeout")" "$bench" kernels "${kernel_args[@]}" --json "$out/kernels.json" \
            >"$out/kernels.txt" 2>&1 || bench_rc=3
        echo "gpu-check: sd21-bench pipeline ${pipeline_args[*]}" >&2
        timeout "$(limit "$bench_timeout")" "$bench" pipeline "${pipeline_args[@]}" --json "$out/pipeline.json" \
            >"$out/pipeline.txt" 2>&1 || bench_rc=3
        cat "$out/kernels.txt" "$out/pipeline.txt"
        if [ "$bench_rc" = 0 ]; then
            bench_status="ok"
        else
            bench_status="failed: see kernels.txt and pipeline.txt"
        fi
    fi
fi

# 6. The report.
if [ "$rc" = 0 ] && [ "$bench_rc" != 0 ]; then
    status="failed"
    message="all CUDA tests passed; benchmarks $bench_status"
    rc="$bench_rc"
elif [ "$rc" = 0 ]; then
    status="ok"
    message="all CUDA tests passed; benchmarks ok"
elif [ "$rerun_rc" = 0 ]; then
    status="failed"
    message="CUDA tests failed (exit $rc$([ "$rc" = 124 ] && echo ': stopped at the time limit')); without the wgmma kernels and CUDA graphs they passed (cuda_ops_portable.log); benchmarks $bench_status (portable kernels)"
else
    status="failed"
    message="CUDA tests failed (exit $rc), and again without the wgmma kernels and CUDA graphs (exit $rerun_rc)"
    [ "$rc" = 124 ] && message="$message; exit 124: stopped at the time limit"
fi
[ "$probe" = 0 ] && message="$message (--no-gpu-probe: no GPU checked, tests may have skipped)"
write_report "$status" "$message" "$rc"
grep -E "^(check |test result:|skipped:)|panicked at" "$log" | tail -n 80
echo "gpu-check: $status: $message" >&2
echo "gpu-check: report: $report" >&2
exit "$rc"
