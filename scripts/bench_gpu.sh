#!/usr/bin/env bash
# bench_gpu.sh: GPU decode benchmark (scripts/bench.sh --gpu runs it; needs a CUDA build and a GPU).
#
# Measures the card's device-to-device copy bandwidth (scripts/copybw.cu; bytes read + written),
# creates random-weight bf16 models with Llama-2-7B and Llama-3-8B shapes once (in $DIR; 13.5 and
# 16 GB), int8 / int4 (group 32, classifier and embedding too, as gpt-fast quantizes every linear)
# copies of them with ./quantize, and for each runs ./generate --device cuda with a 5-token prompt
# (BOS + "Once upon a time") and 200 new tokens, greedy, --runs times. Reports tokens/s, achieved
# GB/s (weights read per token plus the KV cache at the mean context, as generate prints it), the
# copy bandwidth and the ratio (the issue's target: 0.85), the speed against the same shape's bf16
# (targets: int8 1.7x, int4 2.5x), then a markdown table with the device, driver and commit.
# `mixtral` is Mixtral-8x7B's layer shape (8 experts of width 14336, top-2, GQA 32/8) with 8 of its
# 32 layers (24 GB in bf16): GB/s counts the bytes a step reads (attention, router, 2 experts).
#
# Usage: scripts/bench_gpu.sh [--models llama2-7b,llama3-8b,mixtral] [--dtypes bf16,int8,int4]
#                             [--tokens N] [--runs N] [--dir DIR]
# --runs 0 only creates the models (scripts/gpu_session.sh does so in the background).
# Env: FASTGEN_MODELS (for tokenizer.model; default ../shared/models), FASTGEN_BENCH_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
MODELS=llama2-7b,llama3-8b
DTYPES=bf16,int8,int4
TOKENS=200
RUNS=3
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
TOKENIZER=${FASTGEN_MODELS:-../shared/models}/tokenizer.model
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --models) MODELS=$2; shift 2 ;;
        --dtypes) DTYPES=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$DIR" build
[ -x ./generate ] || { echo "bench_gpu.sh: ./generate is missing (make first)"; exit 1; }
case ",$DTYPES," in *,int8,*|*,int4,*) [ -x ./quantize ] || { echo "bench_gpu.sh: ./quantize is missing (make first)"; exit 1; } ;; esac
if [ ! -x build/copybw ] || [ scripts/copybw.cu -nt build/copybw ]; then
    nvcc -O3 -o build/copybw scripts/copybw.cu || { echo "bench_gpu.sh: cannot build scripts/copybw.cu"; exit 1; }
fi

echo "== device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?');" \
     "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
out=$(build/copybw 1024) || { echo "$out"; exit 1; }
echo "$out"
COPY=$(awk '/^copy_bw_gbs/{print $2}' <<<"$out")

shape_args() {
    case "$1" in
        llama2-7b) echo "--dim 4096 --layers 32 --heads 32 --hidden 11008 --vocab 32000 --seq-len 4096" ;;
        llama3-8b) echo "--dim 4096 --layers 32 --heads 32 --kv-heads 8 --hidden 14336 --vocab 128256 --seq-len 8192 --rope-theta 500000" ;;
        mixtral) echo "--dim 4096 --layers 8 --heads 32 --kv-heads 8 --hidden 14336 --vocab 32000 --seq-len 4096 --rope-theta 1000000 --experts 8 --experts-per-tok 2" ;;
        *) echo "bench_gpu.sh: unknown model '$1' (llama2-7b, llama3-8b, mixtral)" >&2; return 1 ;;
    esac
}
ROWS=()
IFS=, read -ra model_list <<<"$MODELS"
IFS=, read -ra dtype_list <<<"$DTYPES"
for m in "${model_list[@]}"; do
    args=$(shape_args "$m") || continue
    base="$DIR/random-$m-bf16.bin"
    bf16_tps=""
    for dtype in "${dtype_list[@]}"; do
        path="$DIR/random-$m-$dtype.bin"
        if [ ! -s "$path" ]; then
            echo "-- creating $path"
            t0=$(date +%s)
            if [ "$dtype" = bf16 ]; then
                # shellcheck disable=SC2086
                $PY scripts/make_random_model.py $args --dtype BF16 --tokenizer "$TOKENIZER" --out "$path.tmp" --seed 0 \
                    --quiet --fast && mv "$path.tmp" "$path" || { echo "-- cannot create $path"; continue; }
            elif [ -s "$base" ]; then
                ./quantize -q --input "$base" --mode "$dtype" --quantize-embeddings -o "$path" \
                    || { echo "-- cannot quantize $base to $dtype"; continue; }
            else
                echo "-- no $base to quantize (put bf16 first in --dtypes)"; continue
            fi
            echo "   created in $(( $(date +%s) - t0 )) s"
        fi
        echo "== $m $dtype ($path)"
        best_line="" best=0
        for r in $(seq 1 "$RUNS"); do
            log=$(./generate --device cuda --checkpoint "$path" --prompt "Once upon a time" --max-new-tokens "$TOKENS" \
                  --temperature 0 --seed 1 2>&1 >/dev/null)
            [ "$r" = 1 ] && grep -E '^(cuda:|memory plan|model )' <<<"$log" | sed 's/^/   /'
            line=$(grep '^prompt ' <<<"$log")
            if [ -z "$line" ]; then echo "   run $r failed:"; tail -5 <<<"$log" | sed 's/^/   /'; continue; fi
            echo "   run $r: $line"
            tps=$(sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p' <<<"$line")
            if awk -v a="$tps" -v b="$best" 'BEGIN{exit !(a > b)}'; then best=$tps best_line=$line; fi
        done
        [ -n "$best_line" ] || continue
        [ "$dtype" = bf16 ] && bf16_tps=$best
        ms=$(sed -n 's/.*, \([0-9.]*\) ms\/token.*/\1/p' <<<"$best_line")
        gbs=$(sed -n 's/.*ms\/token, \([0-9.]*\) GB\/s.*/\1/p' <<<"$best_line")
        ratio=$(awk -v g="$gbs" -v c="$COPY" 'BEGIN{printf "%.3f", g / c}')
        speedup=$(awk -v a="$best" -v b="$bf16_tps" 'BEGIN{if (b > 0) printf "%.2fx", a / b; else printf "-"}')
        ROWS+=("| $m | $dtype | $best | $ms | $gbs | $COPY | $ratio | $speedup |")
        echo "   row: ${ROWS[-1]}"  # now, so a run cut short by a time limit keeps what it measured
    done
done
echo
echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null); commit $(git rev-parse --short HEAD 2>/dev/null);"
echo "command: scripts/bench_gpu.sh --models $MODELS --dtypes $DTYPES --tokens $TOKENS --runs $RUNS (best of $RUNS runs; 5-token prompt, $TOKENS new tokens, greedy)"
echo
echo "| model | weights | decode tok/s | ms/token | achieved GB/s | copy GB/s (read+write) | ratio (target 0.85) | vs bf16 |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do echo "$row"; done
