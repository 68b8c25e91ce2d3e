#!/usr/bin/env bash
# All the GPU work in one command: build the kernels, run the GPU tests, benchmark against
# torch.optim.Adam(fused=True), bitsandbytes and torchao, and print a short table last.
#
#   scripts/gpu_check.sh [quick|tune]
#
# quick: a shorter benchmark; tune: the build, the error inputs, then only the kernel-tuning
# comparison of the end and GPT-2-medium's CUDA graph replays.
#
# Peers come from .peers/ when present (an ignored folder holding the unpacked wheels of
# bitsandbytes 0.49.2, libbitsandbytes_cuda130.so only, and torchao 0.18.0: see
# benchmarks/RESULTS.md for how it is made). Logs go to $OUT (or ./out) as well as stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .peers ] && export PYTHONPATH="$PYTHONPATH:$PWD/.peers"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCHADAM8_BUILD_DIR="${TORCHADAM8_BUILD_DIR:-/tmp/torchadam8-build}"
quick="${1:-}"

stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import bitsandbytes, torchao; print('bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1
echo "CC=${CC:-} CXX=${CXX:-} nvcc=$(command -v nvcc)"

stage "build (CPU + CUDA, sm ${TORCH_CUDA_ARCH_LIST})"
timeout 220 python3 -m torchadam8.build --require-cuda 2>&1 | tee "$out/build.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BUILD FAILED"; tail -40 "$out/build.log"; exit 1; }
# Which C++ runtime the library uses: a second, static one crashes number formatting (RESULTS, session 3)
lib=$(ls "$TORCHADAM8_BUILD_DIR"/*/adam8_kernels.so | head -1)
echo "libstdc++: $(ldd "$lib" | grep -o 'libstdc++[^ ]* => [^ ]*' || echo 'none shared');" \
  "$(nm -C --defined-only "$lib" | grep -c ' std::basic_ostream') std::basic_ostream symbols defined in it;" \
  "built by: $(readelf -p .comment "$lib" | grep -o 'GCC: .*' | sort -u | tr '\n' ' ')"

# The tuning variant (see the end) builds in the background while the tests run: the build is CPU
# work (about 35 s on the device's 16 cores), the tests GPU work, so the tuning costs only its benchmark.
# The variant swaps the default blocks per SM of the 8-bit update (4 without amsgrad, 3 with: adam.cu).
tune_env=(TORCHADAM8_CUDA_FLAGS="-DADAM8_8BIT_MIN_BLOCKS=3 -DADAM8_8BIT_MIN_BLOCKS_AMSGRAD=4"
          TORCHADAM8_BUILD_DIR=/tmp/torchadam8-build-tune)
if [ "$quick" != "quick" ]; then
  env "${tune_env[@]}" nice timeout 300 python3 -m torchadam8.build --require-cuda > "$out/build_tune.log" 2>&1 &
  tune_build=$!
fi

# No gdb on the device: a SIGSEGV handler preloaded into pytest prints the native backtrace.
gcc -shared -fPIC -o /tmp/segv_bt.so scripts/segv_bt.c && export LD_PRELOAD=/tmp/segv_bt.so
if [ "$quick" != "tune" ]; then
stage "GPU tests"
# Error inputs run apart (below), so a crash there cannot hide the other results. -k also
# matches module names: every test of test_cuda.py, the cuda-parametrized ones elsewhere, and
# test_paged's GPU tests (managed, synchronize, cuda_graph), not its CPU ones. The files never yet
# run on a GPU come first, so a timeout cuts the ones that have run before.
timeout 270 python3 -m pytest -v -p no:cacheprovider --durations=15 --continue-on-collection-errors \
  tests/test_paged.py tests/test_amp.py tests/test_cuda.py tests/test_ops.py tests/test_bnb_options.py \
  -k "(cuda or managed or synchronize) and not error_input" > "$out/tests.log" 2>&1
tests_rc=$?
fi

stage "error inputs (CPU and CUDA; two workers: a crash is reported, and after 3 the rest are cut)"
# No faulthandler: a crash then reaches the preloaded handler, which prints the native backtrace.
timeout 60 python3 -m pytest -v -p no:cacheprovider -p no:faulthandler -n 2 --max-worker-restart 2 tests/test_ops.py -k "error_input" \
  > "$out/tests_errors.log" 2>&1
errors_rc=$?
unset LD_PRELOAD
for log in "$out/tests.log" "$out/tests_errors.log"; do
  [ -f "$log" ] || continue
  grep -E "FAILED|ERROR|Fatal|Segmentation|SEGV|crashed" -A12 "$log" | head -40; tail -1 "$log"
done
if grep -q "crashed" "$out/tests_errors.log"; then
  # Error messages holding a number have crashed the process on this image, CPU and CUDA alike, with
  # the library linked to the shared libstdc++ (sessions 3 and 11, RESULTS): which runtime does the
  # library's number formatting bind to, with and without the peers loaded?
  trigger="import torch, torchadam8._extension as e; e.load(); torch.ops.adam8.quantize_blockwise(torch.randn(300), torch.linspace(-1, 1, 255), 256)"
  for pre in "" "import bitsandbytes, torchao; "; do
    LD_DEBUG=bindings,libs timeout 45 python3 -c "$pre$trigger" > /dev/null 2> /tmp/ld.txt
    echo "trigger ${pre:+after the peers }: rc $?; the libstdc++ initialized, the library's number formatting, and any"
    echo "iostream or locale symbol bound to something other than a libstdc++:"
    { grep -E "calling init: .*libstdc" /tmp/ld.txt | sort -u
      grep -E "binding file [^ ]*adam8_kernels.*M_insertI[ld]" /tmp/ld.txt | head -2
      grep -E "normal symbol .(_ZNSo|_ZNSt6locale|_ZNSt8ios_base|_ZNSt9basic_ios|_ZNSt7__cxx1119basic_ostringstream)" /tmp/ld.txt | grep -vE "to [^ ]*libstdc\+\+" | head -6; } | sed 's/^ *[0-9]*:\s*//'
  done
  # Loaded objects other than libstdc++ that export iostream / locale symbols (a static libstdc++ with
  # its symbols exported, as this machine's nvidia libcufile exports some): they can interpose.
  python3 - <<'PY'
import subprocess, torch, torchadam8._extension as e
e.load()
paths = sorted({l.split()[-1] for l in open("/proc/self/maps") if ".so" in l.split()[-1]})
for path in paths:
    syms = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
    hits = [w for w in ("_ZNSo9_M_insertIl", "_ZNSt6locale", "_ZNSt8ios_base", "_ZNKSt7num_put") if w in syms]
    if hits and "libstdc++" not in path:
        print("exports", ", ".join(hits), ":", path)
PY
fi

if [ "$quick" != "tune" ]; then

stage "benchmark"
if [ "$quick" = "quick" ]; then
  bench_args=(--sets gpt2-medium --dtypes bf16 --steps 10)
else
  bench_args=(--sets gpt2-medium,single --steps 10)  # small-many: graph replays below
fi
timeout 150 python3 -m torchadam8.bench --device cuda "${bench_args[@]}" 2>&1 | tee "$out/bench.log" | grep -v "^|" | tail -3
stage "benchmark, CUDA graph replays (no per-step host work)"
timeout 50 python3 -m torchadam8.bench --device cuda --graph --sets small-many,gpt2-medium --dtypes fp32 --steps 10 \
  --peers torchadam8,fused 2>&1 | tee "$out/bench_graph.log" | grep -v "^|" | tail -3

stage "benchmark, paged states (managed memory), with and without page-out"
timeout 50 python3 -m torchadam8.bench --device cuda --paged --sets gpt2-medium --dtypes fp32 --steps 10 \
  --peers torchadam8,fused 2>&1 | tee "$out/bench_paged.log" | grep -v "^|" | tail -3

stage "eager host work per step (292 tiny CUDA tensors, interleaved with fused Adam)"
timeout 40 python3 benchmarks/host_overhead.py --device cuda --rounds 20 2>&1 | tee "$out/host.log" | tail -4

stage "summary"
echo "tests: $(tail -1 "$out/tests.log") (rc $tests_rc); error inputs: $(tail -1 "$out/tests_errors.log") (rc $errors_rc)"
cat "$out/bench.log" "$out/bench_graph.log" "$out/bench_paged.log" "$out/host.log" 2>/dev/null | grep -E "^(#|\|)" | grep -vE "^\|---|^## " || echo "no benchmark table"
fi

# Kernel tuning, after the summary and only while there is time left (SECONDS: since the script
# started; the whole check should stay near 8 minutes so that a rerun fits the device budget): the
# 8-bit update's default build against the variant (tune_env), one tensor of 256M values, with and
# without amsgrad, fused Adam beside it. (One log: the device tool brings back only a few files.)
if [ "$quick" = "tune" ] || { [ "$quick" != "quick" ] && [ "$SECONDS" -lt 400 ]; }; then
  stage "tuning: the 8-bit update, default build vs ${tune_env[0]}"
  wait "$tune_build"; echo "tuning build: rc $? ($(tail -1 "$out/build_tune.log"))"
  tune_args=(--device cuda --sets single --numel 268435456 --steps 20 --peers torchadam8.adam8bit,fused)
  for build in default variant; do
    if [ "$build" = default ]; then run=(timeout 60); else run=(env "${tune_env[@]}" timeout 60); fi
    for ams in "" --amsgrad; do
      echo "# build: $build $ams" >> "$out/tune.log"
      "${run[@]}" python3 -m torchadam8.bench "${tune_args[@]}" $ams >> "$out/tune.log" 2>&1
    done
  done
  grep -E "^# build|^### |^\| (torchadam8|torch Adam)" "$out/tune.log"
  if [ "$quick" = "tune" ]; then
    stage "CUDA graph replays, GPT-2-medium (default build)"
    timeout 50 python3 -m torchadam8.bench --device cuda --graph --sets gpt2-medium --dtypes fp32,bf16 --steps 10 \
      --peers torchadam8,fused 2>&1 | tee "$out/bench_graph.log" | grep -E "^### |^\| (torchadam8|torch Adam)"
  fi
else
  [ -n "${tune_build:-}" ] && kill "$tune_build" 2>/dev/null
  echo "(tuning skipped: ${SECONDS} s used)"
fi
