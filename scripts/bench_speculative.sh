#!/usr/bin/env bash
# bench_speculative.sh: CPU benchmarks for speculative decoding (not part of `make test`).
#
# (a) Verify cost: builds scripts/bench_forward.cpp and times one forward over n = 1..9 tokens
#     (logits for every row, as verification needs) after a 64-token context, on the random-weight
#     110m and 1b models (f32, bf16; cached in $FASTGEN_BENCH_DIR, default /tmp/fastgen-bench, made
#     by scripts/make_random_model.py when missing) and on stories260K. --passes passes over all
#     models, interleaved; the table gives the median over passes of each pass's median.
# (b) End to end on the real pair in ../shared/models (stories260K and llama2xs_tok512, converted with
#     ./quantize into the bench dir): each model as target with the other as draft, 200 new tokens
#     from BOS, plain decoding, --speculate-k 1..8 with the draft model and prompt lookup
#     (--draft ngram) at a few k; at --temperature 0 and at --temperature 1 --seed 1. Every
#     configuration runs --runs times, interleaved; decode tok/s is the median. Greedy runs also check
#     that the text equals plain decoding's.
# Prints markdown tables at the end. Before each measurement it waits (up to 2 minutes) for the CPUs
# to be idle: on a 2-core machine one busy process stalls every OpenMP step.
# Env: FASTGEN_MODELS (default ../shared/models), FASTGEN_BENCH_DIR, and the settings below in capitals.
#
# Usage: scripts/bench_speculative.sh [--sizes 110m,1b] [--dtypes f32,bf16] [--threads N] [--passes N]
#                                     [--rounds N] [--runs N] [--max-k N] [--ngram-ks "1 2 4 8"]
#                                     [--no-forward] [--no-e2e] [--quick] [--dir DIR]
# --quick: 110m f32 only, 1 pass of 5 rounds, 2 end-to-end runs.
set -euo pipefail

cd "$(dirname "$0")/.."
SIZES=${SIZES:-110m,1b}
DTYPES=${DTYPES:-f32,bf16}
THREADS=${THREADS:-$(nproc)}
PASSES=${PASSES:-3}
ROUNDS=${ROUNDS:-15}
RUNS=${RUNS:-5}
MAX_K=${MAX_K:-8}
NGRAM_KS=${NGRAM_KS:-"1 2 4 8"}
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
DO_FORWARD=1
DO_E2E=1
PY=/usr/bin/python3
MODELS=${FASTGEN_MODELS:-../shared/models}
TOK512=$MODELS/tok512.model

while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES=$2; shift 2 ;;
        --dtypes) DTYPES=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --passes) PASSES=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --max-k) MAX_K=$2; shift 2 ;;
        --ngram-ks) NGRAM_KS=$2; shift 2 ;;
        --no-forward) DO_FORWARD=0; shift ;;
        --no-e2e) DO_E2E=0; shift ;;
        --dir) DIR=$2; shift 2 ;;
        --quick) SIZES=110m; DTYPES=f32; PASSES=1; ROUNDS=5; RUNS=2; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench_speculative.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# --- build ---------------------------------------------------------------------------------
mkdir -p build "$DIR"
if [ ! -x ./generate ] || [ ! -x ./quantize ] || [ ! -f build/model.o ]; then make -j"$(nproc)" generate quantize; fi
make -s build/bench_forward  # the Makefile's rule for scripts/bench_*.cpp

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores," \
     "$(free -g | awk '/^Mem:/{print $2}') GiB RAM; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "$(git diff --quiet HEAD -- . 2>/dev/null || echo '(+ uncommitted changes)');" \
     "threads $THREADS; load average $(cut -d' ' -f1-3 /proc/loadavg)"

wait_quiet() {  # wait up to 120 s for a second in which the CPUs are under 10% busy
    local busy=100 a b
    for _ in $(seq 1 120); do
        a=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
        sleep 1
        b=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
        busy=$(awk -v a="$a" -v b="$b" 'BEGIN{split(a, x); split(b, y); t = y[1] - x[1]; print (t > 0 ? int(100 - 100 * (y[2] - x[2]) / t) : 0)}')
        [ "$busy" -lt 10 ] && return 0
    done
    echo "-- warning: the CPUs stayed busy (${busy}% in the last second); measuring anyway"
}
median() { sort -g | awk '{a[NR]=$1} END{if (NR == 0) print "-"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# --- models --------------------------------------------------------------------------------
shape_args() {
    case "$1" in
        110m) echo "--dim 768 --layers 12 --heads 12 --hidden 2048 --vocab 32000 --seq-len 1024" ;;
        1b) echo "--dim 2048 --layers 22 --heads 32 --kv-heads 4 --hidden 5632 --vocab 32000 --seq-len 2048" ;;
        *) echo "bench_speculative.sh: unknown size '$1' (110m or 1b)" >&2; exit 2 ;;
    esac
}
ensure_random() {  # size dtype path
    [ -s "$3" ] && return 0
    echo "-- creating $3"
    # shellcheck disable=SC2046
    $PY scripts/make_random_model.py $(shape_args "$1") --dtype "${2^^}" \
        --tokenizer "$MODELS/tokenizer.model" --out "$3.tmp" --seed 0 --quiet
    mv "$3.tmp" "$3"
}
S260=$DIR/stories260K.bin
XS=$DIR/llama2xs_tok512.bin
for pair in "$MODELS/stories260K.bin:$S260" "$MODELS/llama2xs_tok512.bin:$XS"; do
    src=${pair%%:*} dst=${pair#*:}
    if [ ! -s "$dst" ] || [ "$src" -nt "$dst" ] || [ ./quantize -nt "$dst" ]; then
        ./quantize --input "$src" --tokenizer "$TOK512" --output "$dst" --quiet >/dev/null
    fi
done

# --- (a) verify cost -----------------------------------------------------------------------
FWD_NAMES=() FWD_PATHS=()
if [ "$DO_FORWARD" = 1 ]; then
    IFS=, read -ra size_list <<<"$SIZES"
    IFS=, read -ra dtype_list <<<"$DTYPES"
    for size in "${size_list[@]}"; do
        for dtype in "${dtype_list[@]}"; do
            p=$DIR/random-$size-$dtype.bin
            ensure_random "$size" "$dtype" "$p"
            FWD_NAMES+=("$size-$dtype") FWD_PATHS+=("$p")
        done
    done
    FWD_NAMES+=("stories260K-f32") FWD_PATHS+=("$S260")
    FWD_OUT=$(mktemp -d)
    for pass in $(seq 1 "$PASSES"); do
        for i in "${!FWD_PATHS[@]}"; do
            echo "== bench_forward ${FWD_NAMES[$i]}, pass $pass of $PASSES"
            cat "${FWD_PATHS[$i]}" >/dev/null
            wait_quiet
            build/bench_forward "${FWD_PATHS[$i]}" --threads "$THREADS" --rounds "$ROUNDS" |
                tee "$FWD_OUT/${FWD_NAMES[$i]}.$pass"
        done
    done
fi

# --- (b) end to end on the real pair -------------------------------------------------------
E2E_OUT=$(mktemp -d)
configs() {  # the configurations of one direction, one per line: label|generate flags
    echo "plain|"
    for k in $(seq 1 "$MAX_K"); do echo "draft k=$k|--draft-checkpoint @DRAFT@ --speculate-k $k"; done
    for k in $NGRAM_KS; do echo "ngram k=$k|--draft ngram --speculate-k $k"; done
}
DIRECTIONS=("stories260K:$S260:llama2xs:$XS" "llama2xs:$XS:stories260K:$S260")
TEMPS=("0" "1")
if [ "$DO_E2E" = 1 ]; then
    for run in $(seq 1 "$RUNS"); do
        echo "== end to end, run $run of $RUNS"
        wait_quiet
        for d in "${DIRECTIONS[@]}"; do
            IFS=: read -r tname TARGET dname DRAFT <<<"$d"
            for temp in "${TEMPS[@]}"; do
                c=0
                while IFS='|' read -r label flags; do
                    c=$((c + 1))
                    f="$E2E_OUT/$tname.t$temp.$c"
                    echo "$label" >"$f.label"
                    read -ra args <<<"${flags//@DRAFT@/$DRAFT}"
                    ./generate --checkpoint "$TARGET" "${args[@]}" --temperature "$temp" --seed 1 \
                        --max-new-tokens 200 --threads "$THREADS" >"$f.$run.out" 2>"$f.$run.err"
                    grep -o 'decode [0-9.]* tok/s' "$f.$run.err" | awk '{print $2}' >>"$f.tps"
                done < <(configs)
            done
        done
        grep -h 'decode [0-9.]* tok/s' "$E2E_OUT"/*.t0.1."$run".err | sed 's/^/   plain: /'
    done
fi

echo "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- tables --------------------------------------------------------------------------------
echo
if [ "$DO_FORWARD" = 1 ]; then
    echo "### Verify cost: one forward over n tokens after a 64-token context ($THREADS threads)"
    echo
    echo "ms per forward (logits for all n rows) and its ratio to n = 1 (within a round, median over $ROUNDS rounds);"
    echo "median of $PASSES interleaved passes. k drafts are verified by the forward over n = k + 1 tokens."
    echo
    hdr="| n |" sep="| ---: |"
    for name in "${FWD_NAMES[@]}"; do hdr+=" ${name/-/ } ms | ratio |"; sep+=" ---: | ---: |"; done
    echo "$hdr"; echo "$sep"
    max_n=$(awk '$1 ~ /^[0-9]+$/ {n = $1} END{print n}' "$FWD_OUT/${FWD_NAMES[0]}.1")
    for n in $(seq 1 "$max_n"); do
        row="| $n |"
        for name in "${FWD_NAMES[@]}"; do
            ms=$(cat "$FWD_OUT/$name".* | awk -v n="$n" '$1 == n && NF == 7 {print $2}' | median)
            ratio=$(cat "$FWD_OUT/$name".* | awk -v n="$n" '$1 == n && NF == 7 {print $5}' | median)
            row+=" $(printf '%.3g' "$ms") | $(printf '%.2f' "$ratio") |"
        done
        echo "$row"
    done
    echo
fi
if [ "$DO_E2E" = 1 ]; then
    for d in "${DIRECTIONS[@]}"; do
        IFS=: read -r tname _ dname _ <<<"$d"
        for temp in "${TEMPS[@]}"; do
            if [ "$temp" = 0 ]; then what="greedy (--temperature 0)"; else what="--temperature 1 --seed 1"; fi
            echo "### Target $tname, draft $dname; $what; 200 new tokens from BOS"
            echo
            echo "| drafter | decode tok/s | vs plain | acceptance | tokens / target forward | time draft / target |$([ "$temp" = 0 ] && echo ' text = plain |')"
            echo "| --- | ---: | ---: | ---: | ---: | ---: |$([ "$temp" = 0 ] && echo ' --- |')"
            base=""
            for c in $(seq 1 "$(configs | wc -l)"); do
                f="$E2E_OUT/$tname.t$temp.$c"
                label=$(cat "$f.label")
                tps=$(median <"$f.tps" | xargs printf '%.0f')
                [ -n "$base" ] || base=$tps
                spec=$(grep '^speculative:' "$f.1.err" || true)
                gen=$(sed -n 's/.*generated \([0-9]*\) tokens.*/\1/p' "$f.1.err")
                if [ -n "$spec" ]; then
                    acc=$(sed -n 's/.*acceptance \([0-9.]*%\) (\([0-9]* of [0-9]*\) drafts).*/\1 (\2)/p' <<<"$spec")
                    tpf=$(sed -n 's/.*, \([0-9.]*\) tokens per target forward.*/\1/p' <<<"$spec")
                    tdt=$(sed -n 's/.*time \([0-9]*%\) draft, \([0-9]*%\) target.*/\1 \/ \2/p' <<<"$spec")
                else
                    acc="-" tpf="1.00" tdt="- / 100%"
                fi
                [ "$gen" = 200 ] || label+=" ($gen tokens)"
                row="| $label | $tps | $(awk -v a="$tps" -v b="$base" 'BEGIN{printf "%.2fx", a/b}') | $acc | $tpf | $tdt |"
                if [ "$temp" = 0 ]; then
                    if cmp -s "$f.1.out" "$E2E_OUT/$tname.t0.1.1.out"; then row+=" yes |"; else row+=" **no** |"; fi
                fi
                echo "$row"
            done
            echo
        done
    done
    echo "decode tok/s: median of $RUNS interleaved runs; acceptance, tokens per forward and the time split from run 1"
    echo "(they are the same in every run: the seed is fixed)."
fi
rm -rf "${FWD_OUT:-/nonexistent}" "$E2E_OUT"
