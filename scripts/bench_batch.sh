#!/usr/bin/env bash
# bench_batch.sh: the Anyscale-style batching benchmark (not part of `make test`).
#
# N requests with prompts of a fixed length and output lengths drawn from an exponential
# distribution (mean 128, at least 1; EOS ignored so every request produces exactly its length),
# all queued at time 0, run four ways through `generate --prompts-file`: one at a time
# (--max-seqs 1), static batches of --seqs (each group waits for its longest member; finished
# members computed as padding, as fixed-shape batching runs them), the same groups without the
# padding (static-unpadded: finished members leave the forward), and continuous batching with up to
# --seqs running. Prints each run's stats lines and a markdown table: output tok/s, total tok/s,
# TTFT and TPOT percentiles, forward steps, tokens computed, preemptions.
#
# Usage: scripts/bench_batch.sh [--n 64] [--seqs 16] [--prompt-tokens 64] [--mean-output 128]
#                               [--max-batch-tokens 512] [--model PATH] [--threads N]
#                               [--modes one,static,static-unpadded,continuous] [--keep DIR]
# --keep DIR: leave the requests (requests.jsonl) and each mode's results (MODE.jsonl) in DIR.
# Default model: $FASTGEN_BENCH_DIR/random-110m-bf16.bin (made by scripts/make_random_model.py if missing).
set -euo pipefail

cd "$(dirname "$0")/.."
N=64
SEQS=16
PROMPT_TOKENS=64
MEAN_OUTPUT=128
MAX_BATCH_TOKENS=512
THREADS=$(nproc)
MODES=one,static,static-unpadded,continuous
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
MODEL=$DIR/random-110m-bf16.bin
PY=${PYTHON:-/usr/bin/python3}
KEEP=

while [ $# -gt 0 ]; do
    case "$1" in
        --n) N=$2; shift 2 ;;
        --seqs) SEQS=$2; shift 2 ;;
        --prompt-tokens) PROMPT_TOKENS=$2; shift 2 ;;
        --mean-output) MEAN_OUTPUT=$2; shift 2 ;;
        --max-batch-tokens) MAX_BATCH_TOKENS=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --keep) KEEP=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench_batch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$DIR"
[ -x ./generate ] || make -j"$(nproc)" generate
if [ ! -s "$MODEL" ]; then
    echo "-- creating $MODEL (110m shape, bf16)"
    $PY scripts/make_random_model.py --dim 768 --layers 12 --heads 12 --hidden 2048 --vocab 32000 --seq-len 1024 \
        --dtype BF16 --tokenizer ../shared/models/tokenizer.model --out "$MODEL.tmp" --seed 0 --quiet
    mv "$MODEL.tmp" "$MODEL"
fi

# --- the workload: fixed-length prompts (" the" is one token), exponential output lengths ----------
if [ -n "$KEEP" ]; then
    WORK=$KEEP && mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/fastgen-bench-batch.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
$PY - "$N" "$PROMPT_TOKENS" "$MEAN_OUTPUT" >"$WORK/requests.jsonl" <<'EOF'
import json, random, sys
n, prompt_tokens, mean = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(0)
for i in range(n):
    out = max(1, min(900, round(rng.expovariate(1.0 / mean))))
    prompt = f"Request {i}:" + " the" * (prompt_tokens - 5)
    print(json.dumps({"id": f"r{i}", "prompt": prompt, "max_new_tokens": out, "ignore_eos": True}))
EOF
total_out=$($PY -c "import json,sys; print(sum(json.loads(l)['max_new_tokens'] for l in open(sys.argv[1])))" "$WORK/requests.jsonl")
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');" \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== $N requests, ~$PROMPT_TOKENS-token prompts, exponential output lengths (mean $MEAN_OUTPUT, total $total_out tokens), model $MODEL, $THREADS threads"
cat "$MODEL" >/dev/null  # page the weights in

ROWS=()
IFS=, read -ra mode_list <<<"$MODES"
for mode in "${mode_list[@]}"; do
    case "$mode" in
        one) args="--max-seqs 1" ;;
        static) args="--batching static --max-seqs $SEQS" ;;
        static-unpadded) args="--batching static-unpadded --max-seqs $SEQS" ;;
        continuous) args="--batching continuous --max-seqs $SEQS" ;;
        *) echo "bench_batch.sh: unknown mode '$mode' (one, static, static-unpadded, continuous)" >&2; exit 2 ;;
    esac
    echo "== $mode: ./generate ... $args --max-batch-tokens $MAX_BATCH_TOKENS"
    # shellcheck disable=SC2086
    err=$(./generate --checkpoint "$MODEL" --prompts-file "$WORK/requests.jsonl" --output "$WORK/$mode.jsonl" \
          --temperature 0 --seed 1 --threads "$THREADS" --max-batch-tokens "$MAX_BATCH_TOKENS" $args 2>&1 >/dev/null)
    grep -E '^(batch:|requests|TTFT|peak)' <<<"$err" | sed 's/^/   /'
    n_done=$(wc -l <"$WORK/$mode.jsonl")
    [ "$n_done" -eq "$N" ] || { echo "bench_batch.sh: $mode finished $n_done of $N requests" >&2; exit 1; }
    f() { sed -n "s#.*$1.*#\1#p" <<<"$err" | head -1; }
    ROWS+=("$mode|$(f 'in \([0-9.]*\) s |')|$(f 'tokens, \([0-9.]*\) tok/s')|$(f 'total \([0-9.]*\) tok/s')|$(f 'TTFT ms p50 \([0-9.]*\) ')|$(f 'TTFT ms p50 [0-9.]* p90 \([0-9.]*\) ')|$(f 'TTFT ms p50 [0-9.]* p90 [0-9.]* p99 \([0-9.]*\) ')|$(f 'TPOT ms p50 \([0-9.]*\) ')|$(f 'TPOT ms p50 [0-9.]* p90 \([0-9.]*\) ')|$(f 'TPOT ms p50 [0-9.]* p90 [0-9.]* p99 \([0-9.]*\)')|$(f 'forward steps \([0-9]*\)')|$(f 'tokens computed \([0-9]*\)')|$(f 'preemptions \([0-9]*\)')")
done

echo
echo "| mode | wall s | output tok/s | total tok/s | TTFT p50 ms | TTFT p90 | TTFT p99 | TPOT p50 ms | TPOT p90 | TPOT p99 | forward steps | tokens computed | preemptions |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
