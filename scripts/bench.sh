#!/usr/bin/env bash
# bench.sh: CPU decode/prefill benchmarks for fastgen (not part of `make test`).
#
# Measures the machine's read bandwidth (scripts/membw.cpp), creates random-weight models once
# (cached in $FASTGEN_BENCH_DIR, default /tmp/fastgen-bench), and for each model and dtype runs
# ./generate: decode with a short prompt and prefill with a ~256-token prompt, each --runs times
# (medians reported: the machine may be shared). Prints decode tok/s, ms/token, achieved GB/s, its
# share of the measured read bandwidth, the bandwidth-bound prediction (read GB/s / bytes per
# token) and prefill tok/s, then a markdown table.
#
# Usage: scripts/bench.sh [--sizes 110m,1b] [--dtypes f32,bf16,f16,int8,int4] [--threads N] [--tokens N]
#                         [--prefill-tokens N] [--runs N] [--simd auto|avx2|...] [--dir DIR] [--quick]
# The same settings as env vars: SIZES, DTYPES, THREADS, TOKENS, PREFILL_TOKENS, RUNS, SIMD, FASTGEN_BENCH_DIR.
# --simd: the CPU kernels' SIMD target (generate --simd); the table header names the one that ran.
# Default dtypes: f32,bf16,f16 for 110m and f32,bf16 for 1b; --dtypes applies to every size.
# int8 / int4 (group 32) are quantized from the f32 model with `./quantize --quantize-embeddings`.
# --quick: 110m only, f32 and bf16, 32 new tokens, 64-token prefill, 1 run, small membw pass.
# --gpu: the GPU decode benchmark instead (scripts/bench_gpu.sh; the other arguments go to it).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "${1:-}" = "--gpu" ]; then shift; exec bash scripts/bench_gpu.sh "$@"; fi
SIZES=${SIZES:-110m,1b}
DTYPES=${DTYPES:-}
THREADS=${THREADS:-$(nproc)}
TOKENS=${TOKENS:-128}
PREFILL_TOKENS=${PREFILL_TOKENS:-256}
RUNS=${RUNS:-3}
SIMD=${SIMD:-auto}
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
MEMBW_ARGS="2048 7"
PY=/usr/bin/python3
TOKENIZER=../shared/models/tokenizer.model

while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES=$2; shift 2 ;;
        --dtypes) DTYPES=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        --prefill-tokens) PREFILL_TOKENS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --simd) SIMD=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --quick) SIZES=110m; DTYPES=${DTYPES:-f32,bf16}; TOKENS=32; PREFILL_TOKENS=64; RUNS=1
                 MEMBW_ARGS="512 3"; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

IFS=, read -ra size_list <<<"$SIZES"
for size in "${size_list[@]}"; do
    case "$size" in 110m|1b) ;; *) echo "bench.sh: unknown size '$size' (110m or 1b)" >&2; exit 2 ;; esac
done
[ -z "$DTYPES" ] || for dtype in ${DTYPES//,/ }; do
    case "$dtype" in f32|bf16|f16|int8|int4) ;; *) echo "bench.sh: unknown dtype '$dtype' (f32, bf16, f16, int8, int4)" >&2; exit 2 ;; esac
done

# --- build what we need --------------------------------------------------------------------
mkdir -p build "$DIR"
if [ ! -x build/membw ] || [ scripts/membw.cpp -nt build/membw ]; then
    g++ -std=c++17 -O3 -march=native -fopenmp -Wall -Wextra scripts/membw.cpp -o build/membw
fi
[ -x ./generate ] || make -j"$(nproc)" generate
case ",$DTYPES," in *,int8,*|*,int4,*) [ -x ./quantize ] || make -j"$(nproc)" quantize ;; esac

# --- machine and read bandwidth ------------------------------------------------------------
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores," \
     "$(free -g | awk '/^Mem:/{print $2}') GiB RAM; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');" \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== read bandwidth (build/membw $MEMBW_ARGS)"
# shellcheck disable=SC2086
membw() {  # prints membw's output; sets BW to the best all-thread read GB/s seen so far
    local out; out=$(OMP_NUM_THREADS=$THREADS build/membw $MEMBW_ARGS)
    echo "$out"
    BW=$(awk -v a="${BW:-0}" '/^read_bw_gbs/{print ($2 > a ? $2 : a)}' <<<"$out")
}
BW=0
membw

# --- models --------------------------------------------------------------------------------
shape_args() {  # size -> make_random_model.py shape flags
    case "$1" in
        110m) echo "--dim 768 --layers 12 --heads 12 --hidden 2048 --vocab 32000 --seq-len 1024" ;;
        1b) echo "--dim 2048 --layers 22 --heads 32 --kv-heads 4 --hidden 5632 --vocab 32000 --seq-len 2048" ;;
    esac
}
approx_mb() {  # size dtype -> approximate file size in MB (for the disk/RAM check)
    local params; case "$1" in 110m) params=134 ;; 1b) params=1100 ;; esac
    case "$2" in f32) echo $((params * 4)) ;; int8) echo $((params * 11 / 10)) ;; int4) echo $((params * 6 / 10)) ;;
        *) echo $((params * 2)) ;; esac
}
# Returns non-zero (with a message) when the model cannot be made or held in memory.
ensure_model() {  # size dtype path
    local size=$1 dtype=$2 path=$3 need avail_disk avail_ram
    need=$(approx_mb "$size" "$dtype")
    avail_ram=$(awk '/^MemAvailable:/{print int($2/1024)}' /proc/meminfo)
    if [ "$avail_ram" -lt $((need + 2048)) ]; then
        echo "-- skip $size $dtype: needs ~${need} MB of RAM (+2 GB slack), ${avail_ram} MB available"; return 1
    fi
    [ -s "$path" ] && return 0
    avail_disk=$(df -Pm "$DIR" | awk 'NR==2{print $4}')
    if [ "$avail_disk" -lt $((need + 1024)) ]; then
        echo "-- skip $size $dtype: needs ~${need} MB of disk in $DIR, ${avail_disk} MB free"; return 1
    fi
    echo "-- creating $path (~${need} MB)"
    if [ "$dtype" = int8 ] || [ "$dtype" = int4 ]; then
        local f32="$DIR/random-$size-f32.bin"
        ensure_model "$size" f32 "$f32" || return 1
        ./quantize -q --input "$f32" --mode "$dtype" --quantize-embeddings -o "$path.tmp"
        mv "$path.tmp" "$path"
        return 0
    fi
    # shellcheck disable=SC2046
    $PY scripts/make_random_model.py $(shape_args "$size") --dtype "${dtype^^}" \
        --tokenizer "$TOKENIZER" --out "$path.tmp" --seed 0 --quiet
    mv "$path.tmp" "$path"
}

# --- runs ----------------------------------------------------------------------------------
SHORT_PROMPT="Once upon a time"
TEXT="The quick brown fox jumps over the lazy dog while the little girl named Lily plays in the park. "
LONG_PROMPT=""
for _ in $(seq 1 $(((PREFILL_TOKENS + 22) / 23))); do LONG_PROMPT+=$TEXT; done  # ~23 tokens a copy

stats() {  # path prompt new_tokens -> the stats line; the SIMD target that ran into $DIR/.simd
    local out
    out=$(./generate --checkpoint "$1" --prompt "$2" --max-new-tokens "$3" --temperature 0 --seed 1 \
        --threads "$THREADS" --simd "$SIMD" 2>&1 >/dev/null)
    sed -nE 's/.*simd ([a-z0-9_]+).*/\1/p' <<<"$out" | head -1 >"$DIR/.simd"
    grep '^prompt ' <<<"$out"
}
field() { sed -n "s#.*$2.*#\1#p" <<<"$1"; }  # line regex-with-one-group
median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

ROWS=()
for size in "${size_list[@]}"; do
    if [ -n "$DTYPES" ]; then dts=$DTYPES; elif [ "$size" = 110m ]; then dts=f32,bf16,f16; else dts=f32,bf16; fi
    IFS=, read -ra dtype_list <<<"$dts"
    for dtype in "${dtype_list[@]}"; do
        path="$DIR/random-$size-$dtype.bin"
        ensure_model "$size" "$dtype" "$path" || continue
        echo "== $size $dtype ($path, threads $THREADS)"
        cat "$path" >/dev/null  # page the weights in so the first run is not a disk benchmark
        decs=() pres=()
        for r in $(seq 1 "$RUNS"); do
            line=$(stats "$path" "$SHORT_PROMPT" "$TOKENS")
            echo "   decode run $r:  $line"
            decs+=("$line")
        done
        for r in $(seq 1 "$RUNS"); do
            line=$(stats "$path" "$LONG_PROMPT" 1)
            echo "   prefill run $r: $line"
            pres+=("$line")
        done
        # decode: the run with the median tok/s (and the best tok/s); prefill: the median
        med=$(for l in "${decs[@]}"; do field "$l" 'decode \([0-9.]*\) tok/s'; done | median)
        best=$(for l in "${decs[@]}"; do field "$l" 'decode \([0-9.]*\) tok/s'; done | sort -g | tail -1)
        for l in "${decs[@]}"; do [ "$(field "$l" 'decode \([0-9.]*\) tok/s')" = "$med" ] && line=$l && break; done
        tps=$med
        ms=$(field "$line" ', \([0-9.]*\) ms/token')
        gbs=$(field "$line" 'ms/token, \([0-9.]*\) GB/s')
        ptoks=$(field "${pres[0]}" 'prompt \([0-9]*\) tokens, prefill')
        ptps=$(for l in "${pres[@]}"; do field "$l" 'prefill \([0-9.]*\) tok/s'; done | median)
        wmb=$(./generate --checkpoint "$path" --max-new-tokens 1 --threads 1 2>&1 >/dev/null |
              sed -n 's/.*, \([0-9.]*\) MB of weights.*/\1/p')
        ROWS+=("$size $dtype $wmb $tps $best $ms $gbs - - $ptps $ptoks")
    done
done

echo "== read bandwidth again (the machine may be shared; the better pass counts)"
membw
echo
echo "read bandwidth (best of two membw passes, $THREADS threads): $BW GB/s. Decode: \"$SHORT_PROMPT\", $TOKENS new"
echo "tokens, median (and best) of $RUNS runs; % of read bw and the prediction use the median run's GB/s."
echo "CPU kernels' SIMD target that ran: $(cat "$DIR/.simd" 2>/dev/null || echo '?') (--simd $SIMD; this CPU's flags:" \
     "$(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx_vnni\|asimd' /proc/cpuinfo | sort -u | tr '\n' ' '| sed 's/ $//'))"
echo "Prefill: a ~$PREFILL_TOKENS-token prompt, median of $RUNS runs."
echo
echo "| model | dtype | weight MB | decode tok/s | best tok/s | ms/token | GB/s | % of read bw | predicted tok/s | prefill tok/s |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do
    read -r size dtype wmb tps best ms gbs _ _ ptps ptoks <<<"$row"
    # % and prediction against the final BW (bytes per token = GB/s / tok/s)
    read -r pct pred < <(awk -v g="$gbs" -v b="$BW" -v t="$tps" 'BEGIN{printf "%.0f %.1f\n", 100*g/b, (g>0 ? t*b/g : 0)}')
    echo "| $size | $dtype | $wmb | $tps | $best | $ms | $gbs | $pct% | $pred | $ptps ($ptoks tok) |"
done
