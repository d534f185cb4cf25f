#!/usr/bin/env bash
# The GPU check, one prepared command for a lent H100/H200 (torch and triton installed, nothing
# downloaded), under 8 minutes: build with csrc/cuda, `pytest -m gpu`, then wall and GPU time of
# the host-bound optimizer step, masked SGD and AdamW (GPT-2 small and ResNet-50 sets) against
# torch's fused step + float-mask multiplies, re-masking, the csrc/cuda AdamW path beside Triton's,
# masked_linear against F.linear(x, W*M) and torch's BSR matmul, selection against topk/kthvalue,
# 2:4 masks against topk + scatter, 2:4 inference (to_semi_structured) against dense F.linear,
# whole training steps (sparse phase against dense, and a 2:4 phase on sparse tensor cores);
# optionally (SUITES=1, TRAIN=1, SWEEP=1) the per-backend suites on CUDA tensors, the train job and
# the tile sweep. Every step gets what is left of BUDGET seconds (capped per step) and the check
# goes on after a failure, so one call yields every result it can.
#
#   OUT=/some/dir BUDGET=450 bash benchmarks/gpu_check.sh
#
# Writes OUT/log.txt (everything printed) and OUT/results.tar (bench JSONs, junit XML, `info`),
# packed again after each step so a run cut short keeps what it finished. Optional: wheels in
# .whl/ (expecttest for torch's optimizer test inputs, mnist1d for the train job) are installed
# into a temporary site folder first, offline.
set -u
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-450}
MIN_RUN_TIME=${MIN_RUN_TIME:-0.15}
mkdir -p "$OUT/r"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
export PYTHONUNBUFFERED=1

pack() { tar -C "$OUT" -cf "$OUT/results.tar" r 2>/dev/null; }

# step CAP CMD...: run CMD with at most CAP seconds and never past the budget
step() {
    local cap=$1; shift
    local left=$(( BUDGET - (SECONDS - start) ))
    local limit=$(( left < cap ? left : cap ))
    if (( limit < 15 )); then echo "=== SKIPPED (budget spent): $*"; last_rc=124; return; fi
    echo "=== [$(( SECONDS - start ))s] $* (limit ${limit}s)"
    timeout -k 5 "$limit" "$@"
    last_rc=$?
    echo "=== rc=$last_rc at $(( SECONDS - start ))s"
    pack
}

nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi

# csrc/cuda for the H100/H200 only (sm_90): one architecture keeps the build short
# (auto: a failed CUDA build falls back to the CPU kernels, and the Triton steps still run;
# `info` then says why). The checkout stays importable even if pip fails.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} DSD_KERNELS_BUILD_EXT=auto
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DSD="python3 -m dsd_kernels.app.cli"
step 200 python3 -m pip install --no-deps --no-build-isolation -e .
step 30 bash -c "$DSD info | tee $OUT/r/info.txt"

# the device's copy bandwidth, the yardstick for the memory-bound ops' GB/s
step 30 python3 -c "
import torch
from torch.utils.benchmark import Timer
x = torch.empty(2**28, device='cuda'); y = torch.empty_like(x)
t = Timer('y.copy_(x)', globals=dict(x=x, y=y)).blocked_autorange(min_run_time=1).median
print(f'copy of 1 GiB fp32: {t * 1e3:.3f} ms, {2 * x.numel() * 4 / t / 1e9:.0f} GB/s read+written')
" | tee $OUT/r/copy-bandwidth.txt
# the C++ CPU kernels' argument checks in this build (a TORCH_CHECK must raise, not crash)
cat > /tmp/cpp_check_probe.py <<'PY'
import torch, dsd_kernels as dk
import dsd_kernels._C  # noqa: F401  (the extension registers torch.ops.dsd_kernels_cpp)
from dsd_kernels.masks import Mask
w = torch.randn(70, 130)
words = Mask.from_bool(torch.rand(70, 130) > 0.5).packed
for when in ("before any CUDA work", "after a CUDA selection"):
    if when.startswith("after"):
        dk.ops.magnitude_masks(torch.randn(1000, device="cuda"), 0.5)
        torch.cuda.synchronize()
    try:
        torch.ops.dsd_kernels_cpp.masked_linear_forward(torch.randn(4, 130), w, words, None,
                                                        torch.ones(3, 2, dtype=torch.int32))
        print(f"probe ({when}): no error raised")
    except RuntimeError as err:
        print(f"probe ({when}): RuntimeError raised as it should:", str(err).splitlines()[0])
PY
# the machine's compiler and CPU (the probe raises on this repo's CPU machine, CUDA build of torch
# 2.11 under Python 3.11 and 3.12 included), and a native backtrace if it crashes here: gdb where
# the image has it, else a preloaded SIGSEGV handler that prints the C++ frames (after a crash only)
g++ --version | head -1; grep -m1 "model name" /proc/cpuinfo; ldd dsd_kernels/_C.so | grep -E "gomp|stdc|gcc_s"
step 30 python3 -X faulthandler /tmp/cpp_check_probe.py
if (( last_rc != 139 )); then
    :
elif command -v gdb >/dev/null; then
    step 60 gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 /tmp/cpp_check_probe.py
else
    cat > /tmp/segv_trace.c <<'C'
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
static void on_segv(int sig) {
  void* frames[64];
  const char msg[] = "native frames at the fault:\n";
  write(2, msg, sizeof msg - 1);
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) { signal(SIGSEGV, on_segv); }
C
    gcc -shared -fPIC -O1 -o /tmp/segv_trace.so /tmp/segv_trace.c \
        && step 30 bash -c "env LD_PRELOAD=/tmp/segv_trace.so python3 /tmp/cpp_check_probe.py 2>&1 | tee /tmp/segv.txt"
    # the extension's frames by name (its offsets mean nothing once this machine is gone)
    grep -o '_C.so(+0x[0-9a-f]*)' /tmp/segv.txt | grep -o '0x[0-9a-f]*' \
        | xargs -r addr2line -C -f -i -e dsd_kernels/_C.so
fi

step 120 python3 -m pytest -m gpu -p no:cacheprovider -q -s -rfE --junitxml="$OUT/r/gpu.xml"

[[ ${SWEEP:-0} == 1 ]] && step 60 python3 benchmarks/sweep_tile_words.py --out "$OUT/r/sweep-tile-words.json"

# the bench, one process, all suites into one file (written after every case)
step ${BENCH_CAP:-200} $DSD bench --ops ${BENCH_OPS:-host_step masked_sgd masked_adamw apply_masks masked_linear magnitude_select nm_masks} \
    --min-run-time "$MIN_RUN_TIME" --out "$OUT/r/bench.json"
# 2:4 inference: dk.nn.to_semi_structured against dense F.linear
step 60 python3 benchmarks/semi_structured.py --out "$OUT/r/semi-structured.json"
# whole training steps, sparse phase against dense (issue 39): the CPU bench's cases on the GPU
# (MLP stack, ResNet-18, GPT-2 small; MaskedSGD/MaskedAdamW, OptimizerMasks, peers, block DSD),
# and a 2:4 sparse phase on sparse tensor cores
[[ ${TRAINING_BENCH:-1} == 1 ]] && step ${TRAINING_CAP:-150} $DSD bench --ops training --device cuda \
    --min-run-time "$MIN_RUN_TIME" --out "$OUT/r/training-cuda.json"
[[ ${TRAINING_BENCH:-1} == 1 ]] && step 60 python3 benchmarks/semi_structured_training.py \
    --out "$OUT/r/semi-structured-training.json"

# masked_linear again with autotuning off (DSD_KERNELS_AUTOTUNE=0: the static launch configs),
# to set beside the autotuned run above
[[ ${STATIC_LINEAR:-0} == 1 ]] && step ${STATIC_CAP:-90} env DSD_KERNELS_AUTOTUNE=0 $DSD bench --ops masked_linear \
    --min-run-time "$MIN_RUN_TIME" --out "$OUT/r/bench-masked-linear-static.json"

# the ops' own tests on CUDA tensors, per backend (the `backend` fixture): one pytest per file, so
# that a crash in one (a segfault ends the process) leaves the others' results; -v names each test
[[ ${SUITES:-0} == 1 ]] && for file in ${SUITE_FILES:-tests/test_masked_linear.py tests/test_magnitude_select.py \
            tests/test_masked_sgd.py tests/test_masked_adamw.py tests/test_triton_launches.py \
            tests/test_masked_sgd_drop_in.py tests/test_apply_masks.py tests/test_dsd_any_optimizer.py}; do
    step ${SUITE_CAP:-90} python3 -X faulthandler -m pytest -p no:cacheprovider -v -rfE \
        -m "not slow and not distributed and not aot" --timeout 60 \
        --junitxml="$OUT/r/suite-$(basename "$file" .py).xml" "$file"
done
[[ ${TRAIN:-0} == 1 ]] && step 60 $DSD train --quick --device cuda --no-progress --out /tmp/train-cuda
echo "=== done at $(( SECONDS - start ))s"
pack
