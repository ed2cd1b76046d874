#!/usr/bin/env bash
# gpu_session.sh: the CUDA backend's check and benchmark (issue 17) in ONE device call, run on the
# GPU machine from the folder scripts/gpu_pack.sh filled here (.carry/: sm_90a binaries, libraries,
# the small models, the helper scripts; nothing is built there unless those binaries do not start).
#
#   here first:  bash scripts/gpu_pack.sh [--gpt-fast DIR]
#   the call:    run(command="bash .carry/gpu_session.sh --budget 540 [--gpt-fast .carry/gpt-fast]",
#                    carry=[".carry"], timeout_s=600)      (the device tool runs it in the repo root)
#
# --budget S (default 540): seconds for the whole run, checked before each step; a step that no
#   longer fits is skipped, and the summary table at the end (partial then) says so.
# --gpt-fast DIR: gpt-fast's source (pytorch-labs/gpt-fast; never committed here), for steps 3 and 4.
# Every figure is printed as it is measured and appended to $OUT/gpu_results.txt (/tmp/gpu-session/
# without $OUT); each step's full output goes to a log beside it (at most 8 files, the tool's limit).
# Steps:
#   0  device and driver; the carried binaries start (ldd finds every library, else a build here);
#      random Llama-2-7B-shape models (bf16, then int8 and int4 copies) made in the background, niced
#   1  the gpu test suite (run_tests -ts=gpu); compute-sanitizer memcheck over its small cases
#   2  7B bf16, batch 1, 5-token prompt, 200 new tokens: tok/s, GB/s against the copy bandwidth
#   3  gpt-fast's generate.py (torch.compile) on random bf16 weights of the same shape, same lengths
#   4  int8 and int4 decode tok/s against bf16 (and gpt-fast int8 where time allows)
#   5  a 2,800-token prompt: prefill tok/s, and decode tok/s at that context
#   6  256 requests (64-token prompts, exponential output lengths, mean 128), --max-seqs 64,
#      continuous vs static: output tok/s, TTFT/TPOT p50/p99, equal texts, x batch-1 tok/s
set -uo pipefail
BUDGET=540
GPT_FAST=
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=$2; shift 2 ;;
        --gpt-fast) GPT_FAST=$(realpath -m "$2"); shift 2 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_session.sh: unknown option $1 (see --help)"; exit 2 ;;
    esac
done
C=$(cd "$(dirname "$0")" && pwd)
[ "$(basename "$C")" = scripts ] && C=$(dirname "$C")/.carry  # started as scripts/gpu_session.sh
ROOT=$(dirname "$C")
cd "$C" || { echo "gpu_session.sh: no $C: run scripts/gpu_pack.sh first"; exit 1; }
T0=$(date +%s)
LOGS=${OUT:-/tmp/gpu-session}
R=$LOGS/gpu_results.txt
LAST=/tmp/gpu-session-last.txt  # the latest step's output, to read figures from
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
M=$DIR/random-llama2-7b  # -bf16.bin, -int8.bin, -int4.bin: bench_gpu.sh's names
mkdir -p "$LOGS" "$DIR" "$C/lib.run"
export FASTGEN_MODELS=$C/models LD_LIBRARY_PATH=$C/lib.run${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PYTHONUNBUFFERED=1
PY=python3
"$PY" -c 'import numpy' 2>/dev/null || PY=/usr/bin/python3
export PYTHON=$PY
ROWS=() FAILED=0 BG='' BF16='' INT8=''

say() { echo "$*" | tee -a "$R"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
# fig NAME VALUE [TARGET] [VERDICT]: a figure, printed and saved now, and a row of the summary
fig() {
    ROWS+=("| $1 | $2 | ${3:-} | ${4:-} |")
    say "== [$(($(date +%s) - T0))s] $1: $2${3:+ (target $3${4:+: $4})}"
    [ "${4:-}" != FAIL ] || FAILED=1
}
summary() {
    say "" && say "| step | figure | target | |" && say "| --- | --- | --- | --- |"
    for row in "${ROWS[@]}"; do say "$row"; done
}
# fits NAME NEED: NEED seconds left for the step NAME? if not, its row says it was skipped
fits() { [ "$(left)" -ge "$2" ] || { fig "$1" "skipped: out of time ($(left) s left, ~$2 s needed)"; return 1; }; }
# run_for CAP LOG PATTERN CMD...: CMD for at most CAP s (less when less is left), all its output into
# $LOGS/LOG and $LAST, the lines matching PATTERN printed and saved as they come
run_for() {
    local t log=$LOGS/$2 pat=$3 cmd
    t=$(left); [ "$t" -gt "$1" ] && t=$1; [ "$t" -ge 1 ] || t=1
    shift 3; cmd="$*"
    say "-- [$(($(date +%s) - T0))s] ${cmd:0:240} (at most ${t}s; log $log)"
    timeout "$t" "$@" 2>&1 | tee "$LAST" | tee -a "$log" | grep --line-buffered -E "$pat" | tee -a "$R"
    local rc=${PIPESTATUS[0]}
    [ "$rc" != 124 ] || say "   timed out after ${t}s"
    return "$rc"
}
num() { sed -n "s#.*$1.*#\\1#p" "$LAST" | tail -1; }  # num REGEX-WITH-ONE-GROUP: from the latest output
col() { awk -F'|' -v i="$2" '{gsub(/ /, "", $i); print $i}' <<<"$1"; }  # col TABLE-ROW N
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'; }
verdict() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "-" && a + 0 >= b + 0) }' && echo ok || echo MISS; }
# wait_for NAME FILE NEED: until the background job has made FILE, while NEED seconds are left after it
wait_for() {
    while [ ! -s "$2" ]; do
        kill -0 "$BG" 2>/dev/null || { fig "$1" "no $2: the model job ended ($(tail -1 "$LOGS/models.log"))" "" FAIL; return 1; }
        [ "$(left)" -gt "$3" ] || { fig "$1" "skipped: out of time waiting for $2"; return 1; }
        sleep 2
    done
}
trap 'say "== stopped by a signal"; summary; exit 143' TERM INT
trap '[ -z "$BG" ] || { pkill -P "$BG"; kill "$BG"; } 2>/dev/null' EXIT

# ---- 0: the machine; do the carried binaries start?
say "== gpu_session.sh $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s, results in $R"
say "   $(head -2 PACKED 2>/dev/null | tr '\n' ' ')"
fig "0 device, driver" "$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -1)"
say "   $(nvcc --version 2>/dev/null | tail -1); python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1 | tail -1)"
BINS=(./generate ./quantize build/run_tests build/copybw)
# link_missing_libs: a link in lib.run/ for each library ldd does not find: the carried one, else one
# on this machine (NCCL from PyTorch's wheels, say); fails when it linked nothing new
link_missing_libs() {
    local n f new=1
    for n in $(ldd "${BINS[@]}" 2>/dev/null | awk '$2 == "=>" && $3 == "not" {print $1}' | sort -u); do
        [ ! -e "lib.run/$n" ] || continue
        f=$C/lib/$n
        [ -e "$f" ] || f=$(find /usr /opt /lib -name "$n" 2>/dev/null | head -1)
        [ -z "$f" ] || { ln -sf "$f" "lib.run/$n" && new=0; }
    done
    return "$new"
}
starts() {
    for _ in 1 2 3 4 5 6; do link_missing_libs || break; done  # a library found can need others
    ! ldd "${BINS[@]}" 2>&1 | grep -q 'not found' && build/copybw 64 >/dev/null 2>&1 &&
        build/run_tests -ts=nothing >/dev/null 2>&1 && ./generate --help >/dev/null 2>&1
}
build_here() {  # the fallback: make in the repo root with the carried headers, for this GPU's arch
    local cc arch=(-gencode "arch=compute_90a,code=sm_90a") f
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
    [ -z "$cc" ] || [ "$cc" = 90 ] || arch=(-gencode "arch=compute_$cc,code=sm_$cc")
    mkdir -p include && tar -xzf include.tar.gz -C include 2>&1 | tee -a "$R"
    for f in lib/*.so.* lib.run/*.so.*; do [ -e "$f" ] && ln -sf "$PWD/$f" "lib.run/$(basename "${f%%.so.*}").so"; done
    CPATH=$C/include:$C/include/openmpi LIBRARY_PATH=$C/lib.run run_for 300 build.log 'error|Error' \
        make -C "$ROOT" -j"$(nproc)" CUDA_ARCH="${arch[*]}" generate quantize build/run_tests &&
        cp "$ROOT/generate" "$ROOT/quantize" ./ && cp "$ROOT/build/run_tests" build/ &&
        nvcc -O3 "${arch[@]}" -o build/copybw "$ROOT/scripts/copybw.cu"
}
if starts; then
    fig "0 carried binaries" "start"
else
    say "   the carried binaries do not start: $( (ldd "${BINS[@]}" 2>&1 | grep 'not found' | sort -u; build/copybw 64 2>&1 |
        tail -1) | tr -s ' \t\n' ' ')"
    if build_here && starts; then
        fig "0 carried binaries" "did not start; built here"
    else
        fig "0 binaries" "the carried ones do not start, and the build here failed (build.log)" "" FAIL
        summary
        exit 1
    fi
fi
say "-- making $M-{bf16,int8,int4}.bin in the background, niced (log $LOGS/models.log)"
nice -n 19 bash scripts/bench_gpu.sh --models llama2-7b --dtypes bf16,int8,int4 --runs 0 --dir "$DIR" >"$LOGS/models.log" 2>&1 &
BG=$!

# ---- 1: the gpu suite (every kernel against its CPU twin, graphs, sampling, tiny models, stories260K)
if fits "1 gpu suite" 60; then
    run_for 150 tests.log '^\[doctest\] (test cases|assertions)|gpu tests skipped|ERROR|FATAL|TEST CASE' build/run_tests -ts=gpu -d
    rc=$?
    v=ok; { [ "$rc" = 0 ] && ! grep -q 'gpu tests skipped' "$LAST"; } || v=FAIL
    fig "1 gpu suite" "$(grep '^\[doctest\] test cases' "$LAST" | tail -1 | sed 's/^\[doctest\] //; s/ *| */, /g'), rc $rc" "all pass" "$v"
fi
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -z "$SAN" ]; then
    fig "1 memcheck" "skipped: no compute-sanitizer here"
elif fits "1 memcheck" 60; then
    run_for 100 memcheck.log 'ERROR SUMMARY|^\[doctest\] test cases' "$SAN" --tool memcheck --error-exitcode 9 build/run_tests -ts=gpu \
        -tc='*fused*,*rmsnorm*,*RoPE*,*negative slot*,*short contexts*,*sampling*,*tiny random*'
    rc=$?
    v=FAIL; [ "$rc" != 0 ] || v=ok; [ "$rc" != 124 ] || v="timed out"
    fig "1 memcheck (small cases)" "$(grep 'ERROR SUMMARY' "$LAST" | tail -1 | sed 's/^=* *//'), rc $rc" "0 errors" "$v"
fi

# ---- 2: 7B bf16, batch 1 (scripts/bench_gpu.sh: copy bandwidth, then best of 2 runs, greedy)
bench() {  # bench DTYPE: one bench_gpu.sh row for the 7B shape; sets TPS, GBS, COPY, RATIO
    TPS='' GBS='' COPY='' RATIO=''
    run_for 150 bench.log '^(== |copy_bw|device |   (run |row:|cuda:|memory plan))' bash scripts/bench_gpu.sh --models llama2-7b \
        --dtypes "$1" --runs 2 --tokens 200 --dir "$DIR"
    local row; row=$(grep '^   row: ' "$LAST" | tail -1)
    [ -n "$row" ] || return 1
    TPS=$(col "$row" 4) GBS=$(col "$row" 6) COPY=$(col "$row" 7) RATIO=$(col "$row" 8)
}
if fits "2 7B bf16 batch 1" 45 && wait_for "2 7B bf16 batch 1" "$M-bf16.bin" 40; then
    if bench bf16; then
        BF16=$TPS
        fig "2 7B bf16 decode tok/s (5-token prompt, 200 new)" "$TPS"
        fig "2 7B bf16 GB/s / copy GB/s" "$GBS / $COPY = $RATIO" ">= 0.85" "$(verdict "$RATIO" 0.85)"
    else
        fig "2 7B bf16 batch 1" "no result (bench.log)" "" FAIL
    fi
fi

# ---- 3: gpt-fast side by side (its generate.py main(), torch.compile, random bf16 weights of the 7B shape)
gptfast() {  # gptfast [--int8]: sets GF (its average tok/s) and GFBW (its GB/s)
    GF='' GFBW=''
    run_for 240 gptfast.log 'random weights|Compilation time|tokens/sec|Bandwidth|Error|error' "$PY" scripts/gptfast_bench.py \
        "$GPT_FAST" --tokenizer models/tokenizer.model --shape 7B --prompt-tokens 5 --max-new-tokens 200 --samples 3 "$@"
    GF=$(num 'Average tokens/sec: *\([0-9.]*\)') GFBW=$(num 'Bandwidth achieved: *\([0-9.]*\) GB/s')
    [ -n "$GF" ]
}
if [ -z "$GPT_FAST" ]; then
    fig "3 gpt-fast" "skipped: no --gpt-fast DIR given (its source is never in this repo; gpu_pack.sh --gpt-fast copies it)"
elif [ ! -f "$GPT_FAST/generate.py" ]; then
    fig "3 gpt-fast" "skipped: no $GPT_FAST/generate.py"
elif fits "3 gpt-fast bf16" 150; then
    if gptfast; then
        fig "3 gpt-fast bf16 tok/s (its average of 3; GB/s as it reports)" "$GF ($GFBW GB/s)"
        fig "3 fastgen / gpt-fast, bf16" "$(ratio "$BF16" "$GF")x" ">= 1.3x" "$(verdict "$(ratio "$BF16" "$GF")" 1.3)"
    else
        fig "3 gpt-fast bf16" "no result (gptfast.log)"
    fi
fi

# ---- 4: int8 and int4 (g32; embedding and classifier quantized too, as gpt-fast quantizes every linear)
for q in int8:1.7 int4:2.5; do
    d=${q%:*} target=${q#*:}
    { fits "4 7B $d batch 1" 45 && wait_for "4 7B $d batch 1" "$M-$d.bin" 40; } || continue
    if bench "$d"; then
        r=$(ratio "$TPS" "$BF16")
        fig "4 7B $d decode tok/s, x bf16" "$TPS, ${r}x ($GBS GB/s)" ">= ${target}x" "$(verdict "$r" "$target")"
        [ "$d" = int8 ] && INT8=$TPS
    else
        fig "4 7B $d batch 1" "no result (bench.log)" "" FAIL
    fi
done
if [ -n "$GPT_FAST" ] && [ -f "$GPT_FAST/generate.py" ] && fits "4 gpt-fast int8 (with steps 5-6 after it)" 280; then
    if gptfast --int8; then
        fig "4 gpt-fast int8 tok/s" "$GF ($GFBW GB/s)"
        fig "4 fastgen / gpt-fast, int8" "$(ratio "$INT8" "$GF")x"
    else
        fig "4 gpt-fast int8" "no result (gptfast.log)"
    fi
fi

# ---- 5: a 2,800-token prompt (BOS, "Once upon a time", 2,795 x " the"), 200 new tokens, greedy
if fits "5 7B bf16, 2,800-token prompt" 40 && wait_for "5 7B bf16, 2,800-token prompt" "$M-bf16.bin" 30; then
    run_for 90 bench.log '^(prompt |memory plan)' ./generate --device cuda --checkpoint "$M-bf16.bin" \
        --prompt "Once upon a time$(printf ' the%.0s' $(seq 2795))" --max-new-tokens 200 --temperature 0 --seed 1
    n=$(num 'prompt \([0-9]*\) tokens, prefill')
    if [ -n "$n" ]; then
        fig "5 prefill tok/s, $n-token prompt" "$(num 'prefill \([0-9.]*\) tok/s')"
        dec=$(num 'decode \([0-9.]*\) tok/s')
        fig "5 decode tok/s after it (context $n-$((n + 200)))" "$dec ($(ratio "$dec" "$BF16")x the 5-token prompt's)"
    else
        fig "5 long prompt" "no result (bench.log)" "" FAIL
    fi
fi

# ---- 6: continuous batching vs static on the 7B shape (scripts/bench_batch.sh; KV cache from free memory)
if fits "6 batching, 256 requests" 90 && wait_for "6 batching, 256 requests" "$M-bf16.bin" 80; then
    K=$DIR/batch
    run_for 240 batch.log '^(== |   (batch|requests|TTFT|peak)|\| )' bash scripts/bench_batch.sh --n 256 --seqs 64 \
        --prompt-tokens 64 --mean-output 128 --model "$M-bf16.bin" --modes static,continuous --keep "$K"
    for mode in static continuous; do
        row=$(grep "^| $mode |" "$LAST")
        [ -n "$row" ] || { fig "6 $mode" "no result (batch.log)" "" FAIL; continue; }
        fig "6 $mode: output tok/s" "$(col "$row" 4)"
        fig "6 $mode: TTFT ms p50 / p99, TPOT ms p50 / p99" "$(col "$row" 6) / $(col "$row" 8), $(col "$row" 9) / $(col "$row" 11) (preemptions $(col "$row" 14))"
        [ "$mode" = continuous ] || continue
        r=$(ratio "$(col "$row" 4)" "$BF16")
        fig "6 continuous output tok/s / batch-1 bf16 tok/s" "${r}x" ">= 25x" "$(verdict "$r" 25)"
    done
    fig "6 requests with equal texts, static vs continuous" "$("$PY" -c 'import json, sys
a, b = ({j["id"]: j["text"] for j in map(json.loads, open(p))} for p in sys.argv[1:])
print(sum(a[k] == b.get(k) for k in a), "of", len(a))' "$K/static.jsonl" "$K/continuous.jsonl" 2>&1 | tail -1)"
fi

say "== done in $(($(date +%s) - T0)) s; logs in $LOGS"
summary
exit "$FAILED"
