#!/usr/bin/env bash
# gpu_session.sh: everything a GPU session checks, in ONE device call, logs under $OUT. Each step
# logs and the script goes on when one fails, so a single call yields the most information; steps
# that would overrun the call's time are skipped and say so.
#
#   here first:  bash scripts/gpu_pack.sh           (fills .carry/: headers, libs, fallback binaries, models)
#   the call:    run(command="bash scripts/gpu_session.sh", carry=[".carry"], timeout_s=600)
#   or a part:   bash scripts/gpu_session.sh build tests tp sanitizer ptxas smoke bench   (any subset, in order)
#
# Steps: build (make -j16 for this GPU's arch, with the carried headers; falls back to the carried
# binaries), tests (the gpu suite), tp (tensor parallel over NCCL, 2 ranks on 2 GPUs; only where
# nvidia-smi lists 2 or more, else one line saying it skipped), sanitizer (compute-sanitizer memcheck and racecheck on the
# kernel and tiny-model tests), ptxas (registers/spills, 16-byte loads in the SASS), smoke
# (stories260K greedy text, CPU vs GPU, through ./generate), bench (scripts/bench_gpu.sh).
# $OUT/summary.txt gets one line per step; the other files hold each step's full output (8 files at
# most, the device tool's limit: summary, build, tests, memcheck, racecheck, ptxas, smoke, bench).
#
# Owed on a GPU (never run yet), all in the tests step unless named:
#   - every kernel vs its CPU twin, now including grouped int8 (GGUF Q8_0) and int4 with minimums
#     (GGUF Q4_1): matmul (GEMV n <= 8, vector and one-weight-at-a-time paths; cuBLAS n > 8 over the
#     dequantize kernel; 576 columns, groups 32 and 64), fused Q/K/V and gate/up, embed;
#   - tiny GGUF-shaped models (Q8_0 embedding, Q4_1 layers, mixed groups) logits GPU vs CPU;
#   - SmolLM2-135M logits and greedy picks GPU vs CPU (skips without its model.bin, see below);
#   - the tiled prefill attention (WMMA bf16 hi+lo, runs of one sequence) beside flash-decoding in
#     one batch, 9 shapes (GQA 1-8, head_dim 32-256, block 16/32, a 1500-token prompt): look at
#     `-tc="*tiled attention*"` FIRST (it prints each case's error; f32-level, < 1e-4, is expected);
#   - CUDA graphs per batch-size bucket (model.cpp: padding entries with slot -1 write no K/V):
#     `-tc="*bucketed CUDA graphs*"` (logits vs CPU per step, cache outside the batch unchanged,
#     5 graphs), the negative-slot RoPE case, and tiny models' logits (3e-2; the CPU twin rounds
#     int8/int4 inputs to 15 bits, so int matmuls at n <= 8 are held to 1e-3);
#   - ptxas: attention_tiled_kernel<4/8/16> compiled to 128/168/254 registers, 0 spills on sm_90a;
#   - tensor parallel over NCCL (tp step, 2+ GPUs; never run on GPUs, passes under the emulator
#     with NCCL emulated over MPI, which cannot show stream ordering): `mpirun -np 2` worker (all-reduce
#     on the backend's stream behind 4 queued adds, exact sums; device and host broadcasts; tiny
#     f32/bf16/int8/int4/MoE models, 2 ranks vs 1 on the GPU, 3e-2, errors printed), stories260K
#     greedy text and batch-mode results through `mpirun -np 2 ./generate --device cuda` equal to
#     one GPU's; on 1 GPU the tests step checks only that 2 ranks on it are refused (needs mpirun);
#   - memcheck over the same kernel and tiny-model cases and the bucketed graphs, memcheck and
#     racecheck over the tiled attention's short-context cases (sanitizer step).
# The tolerances of the GPU-vs-CPU logit checks are estimates: record the printed errors.
#
# SmolLM2's model.bin (113 MB) is more than one call's 64 MiB carry, so it comes in three parts on
# one warm machine (30 s idle limit between calls). Here: `echo /.smol/ >> .git/info/exclude;
# split -n 3 -d models/smollm2-135m-instruct.bin /tmp/smol.part.`; then for part 00 and 01:
# `rm -rf .smol && mkdir .smol && cp /tmp/smol.part.0K .smol/` and run(command="bash
# scripts/gpu_session.sh stash", carry=[".smol"]); the last call carries [".carry", ".smol"] with
# part 02. Each call moves .smol/* into models/ (ignored, so kept on the machine) and joins the
# model once all three parts are there.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
C=$ROOT/.carry
export FASTGEN_MODELS=${FASTGEN_MODELS:-$( [ -d "$C/models" ] && echo "$C/models" || echo ../shared/models )}
BUDGET=${BUDGET:-560}  # seconds for the whole script (the call's limit is 600)
T0=$(date +%s)
STEPS=${*:-build tests tp sanitizer ptxas smoke bench}

log() { echo "== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME CAP CMD...: runs CMD with at most CAP seconds (less if the budget is short), output to $OUT/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local t; t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then log "$name: skipped (out of time)"; return 1; fi
    log "$name: start (limit ${t}s): $*"
    timeout "$t" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    log "$name: rc=$rc$([ $rc = 124 ] && echo ' (timed out)')"
    tail -n 12 "$OUT/$name.log"
    return $rc
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# ---- SmolLM2's model.bin, brought in parts (see the top): stash this call's part, join when complete
if [ -d .smol ] || ls models/smol.part.* >/dev/null 2>&1; then
    mkdir -p models
    [ -d .smol ] && cp .smol/smol.part.* models/ 2>/dev/null
    if [ ! -s models/smollm2-135m-instruct.bin ] && [ -s models/smol.part.00 ] && [ -s models/smol.part.01 ] && [ -s models/smol.part.02 ]; then
        cat models/smol.part.00 models/smol.part.01 models/smol.part.02 >models/smollm2-135m-instruct.bin.tmp &&
            mv models/smollm2-135m-instruct.bin.tmp models/smollm2-135m-instruct.bin
    fi
    log "SmolLM2 parts here: $(ls models/smol.part.* 2>/dev/null | tr '\n' ' '); model.bin: $(stat -c %s models/smollm2-135m-instruct.bin 2>/dev/null || echo absent)"
fi
[ "$STEPS" = stash ] && exit 0

# ---- the machine, and where its libraries are
{
    nvidia-smi; nvcc --version; uname -a; cat /etc/os-release 2>/dev/null | head -2
    echo "models: $FASTGEN_MODELS"; ls "$FASTGEN_MODELS"
} >/tmp/gpu-machine.txt 2>&1
head -14 /tmp/gpu-machine.txt | tee -a "$OUT/summary.txt"
NCCL=$(find /usr /opt -name 'libnccl.so.2' 2>/dev/null | head -1)
[ -n "$NCCL" ] && mkdir -p "$C/lib" && ln -sf "$NCCL" "$C/lib/libnccl.so"
export LD_LIBRARY_PATH=$C/lib:/usr/local/cuda/lib64${NCCL:+:$(dirname "$NCCL")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CC_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
case "$CC_ARCH" in 90) GENCODE="-gencode arch=compute_90a,code=sm_90a" ;; "") GENCODE="" ;; *) GENCODE="-gencode arch=compute_$CC_ARCH,code=sm_$CC_ARCH" ;; esac
log "GPU compute capability ${CC_ARCH:-?}; models in $FASTGEN_MODELS; NCCL ${NCCL:-not found}"

# ---- build
if want build; then
    if ! step build 240 env CPATH="$C/include:$C/include/mpi:$C/include/mpi/openmpi" LIBRARY_PATH="$C/lib${NCCL:+:$(dirname "$NCCL")}" \
            make -j16 ${GENCODE:+CUDA_ARCH="$GENCODE"} generate quantize build/run_tests \
       || ! ./build/run_tests -ts=nothing >/dev/null 2>&1; then
        log "build: using the carried binaries instead"
        mkdir -p build && cp "$C/bin/run_tests" build/ && cp "$C/bin/generate" "$C/bin/quantize" .
        ./build/run_tests -ts=nothing >/tmp/carried.log 2>&1 || { log "carried binaries do not run:"; tail -5 /tmp/carried.log | tee -a "$OUT/summary.txt"; }
    fi
    [ -x build/copybw ] || nvcc -O3 -o build/copybw scripts/copybw.cu 2>/dev/null || cp "$C/bin/copybw" build/ 2>/dev/null
fi

# ---- the gpu suite: every kernel against its CPU twin, tiny models, stories260K
want tests && step tests 150 ./build/run_tests -ts=gpu -d

# ---- tensor parallel over NCCL: one GPU per rank, so 2 GPUs at least (tp.log is a 9th file there)
if want tp; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "$NGPU" -lt 2 ]; then
        log "tp: skipped: nvidia-smi lists $NGPU GPU(s); tensor parallel over NCCL needs 2 (one per rank)"
    elif ! command -v mpirun >/dev/null; then
        log "tp: skipped: no mpirun on this machine (Open MPI)"
    else
        step tp 240 ./build/run_tests -ts=gpu -tc="*tensor parallel over NCCL*,*two ranks on one GPU*" -d
    fi
fi

# ---- memory and race checks on the small cases
if want sanitizer; then
    step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
        ./build/run_tests -ts=gpu -tc="*fused*,*rmsnorm*,*RoPE*,*negative slot*,*tiled attention*short*,*bucketed*,*tiny random*"
    step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
        ./build/run_tests -ts=gpu -tc="*RoPE*,*sampling*,*tiled attention*short*"
fi

# ---- what the compiler made of the kernels: registers, spills, 16-byte loads
if want ptxas; then
    step ptxas 90 nvcc -std=c++17 -O3 ${GENCODE:--arch=native} -Xptxas -v -c kernels.cu -o /tmp/kernels_sass.o
    if command -v cuobjdump >/dev/null; then
        cuobjdump -sass /tmp/kernels_sass.o >/tmp/sass.txt 2>&1
        log "ptxas: $(grep -c 'LDG.E.128' /tmp/sass.txt) 16-byte global loads (LDG.E.128) in the SASS; spills: $(grep -c 'bytes spill' "$OUT/ptxas.log") report lines, nonzero: $(grep -E '[1-9][0-9]* bytes spill' "$OUT/ptxas.log" | wc -l)"
    fi
fi

# ---- end to end through ./generate: the same greedy text on both backends
if want smoke; then
    smoke() {
        ./quantize -i "$FASTGEN_MODELS/stories260K.bin" -t "$FASTGEN_MODELS/tok512.model" -o /tmp/s260.bin -q || return 1
        ./generate --checkpoint /tmp/s260.bin --device cpu --temperature 0 --max-new-tokens 200 >/tmp/s260-cpu.txt || return 1
        ./generate --checkpoint /tmp/s260.bin --device cuda --temperature 0 --max-new-tokens 200 >/tmp/s260-gpu.txt || return 1
        ./generate --checkpoint /tmp/s260.bin --device auto --temperature 0.8 --top-k 40 --seed 3 --max-new-tokens 200 || return 1
        cat /tmp/s260-gpu.txt
        cmp /tmp/s260-cpu.txt /tmp/s260-gpu.txt && echo "greedy text: GPU == CPU"
    }
    step smoke 60 bash -c "$(declare -f smoke); smoke"
fi

# ---- the benchmark (random Llama-2-7B and Llama-3-8B shapes made here with --fast, bf16 then
# int8/int4 copies; each result line is printed as it is measured). Mixtral: `BENCH_MODELS=mixtral`.
want bench && step bench 400 env FASTGEN_MODELS="$FASTGEN_MODELS" bash scripts/bench_gpu.sh --runs 2 \
    --models "${BENCH_MODELS:-llama2-7b,llama3-8b}" --dtypes "${BENCH_DTYPES:-bf16,int8,int4}"

log "done; logs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
tail -n 8 "$OUT/bench.log" 2>/dev/null
