#!/usr/bin/env bash
# bench_prefix.sh: the shared-prefix benchmark for the prefix cache (not part of `make test`).
#
# Batch: N requests sharing one system prompt of --system-tokens tokens, each with its own question
# of --question-tokens tokens and exactly --output-tokens answer tokens (EOS ignored), all queued at
# time 0, through `generate --prompts-file` with the prefix cache on and off (--no-prefix-cache):
# TTFT percentiles, output tok/s, prompt tokens reused.
# Multi-turn: --conversations chats of --turns turns each (the same system prompt, then short user
# messages; every turn re-sends the whole conversation, as chat clients do) through
# `generate --serve` and the openai client, the chats running at once, each turn waiting for its
# answer: TTFT p50 of the first turns and of the later ones, with the cache and without.
# Models: the 110M shape (random weights, 2048 positions: made by scripts/make_random_model.py if
# missing) and SmolLM2-135M (scripts/get_smollm2.sh), or any --model PATH.
#
# Usage: scripts/bench_prefix.sh [--models 110m,smollm2] [--model PATH] [--parts batch,serve]
#          [--n 64] [--system-tokens 1000] [--question-tokens 32] [--output-tokens 64] [--seqs 16]
#          [--max-batch-tokens 512] [--conversations 8] [--turns 6] [--threads N] [--keep DIR]
# --keep DIR: leave the requests and results in DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
MODELS=110m,smollm2
MODEL_PATH=
PARTS=batch,serve
N=64
SYSTEM_TOKENS=1000
QUESTION_TOKENS=32
OUTPUT_TOKENS=64
SEQS=16
MAX_BATCH_TOKENS=512
CONVERSATIONS=8
TURNS=6
THREADS=$(nproc)
DIR=${FASTGEN_BENCH_DIR:-/tmp/fastgen-bench}
PY=${PYTHON:-/usr/bin/python3}       # numpy (make_random_model.py)
CLIENT_PY=${CLIENT_PYTHON:-python3}  # the openai client (scripts/setup.sh installs it)
KEEP=

while [ $# -gt 0 ]; do
    case "$1" in
        --models) MODELS=$2; shift 2 ;;
        --model) MODEL_PATH=$2; shift 2 ;;
        --parts) PARTS=$2; shift 2 ;;
        --n) N=$2; shift 2 ;;
        --system-tokens) SYSTEM_TOKENS=$2; shift 2 ;;
        --question-tokens) QUESTION_TOKENS=$2; shift 2 ;;
        --output-tokens) OUTPUT_TOKENS=$2; shift 2 ;;
        --seqs) SEQS=$2; shift 2 ;;
        --max-batch-tokens) MAX_BATCH_TOKENS=$2; shift 2 ;;
        --conversations) CONVERSATIONS=$2; shift 2 ;;
        --turns) TURNS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --keep) KEEP=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench_prefix.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$DIR"
[ -x ./generate ] || make -j"$(nproc)" generate
if [ -n "$KEEP" ]; then
    WORK=$KEEP && mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/fastgen-bench-prefix.XXXXXX)
fi
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    [ -n "$KEEP" ] || rm -rf "$WORK"
}
trap cleanup EXIT

model_path() {  # name -> model.bin, made or fetched once
    case "$1" in
        110m)
            local m=$DIR/random-110m-2k-bf16.bin
            if [ ! -s "$m" ]; then
                echo "-- creating $m (110m shape, 2048 positions, bf16)" >&2
                $PY scripts/make_random_model.py --dim 768 --layers 12 --heads 12 --hidden 2048 --vocab 32000 \
                    --seq-len 2048 --dtype BF16 --tokenizer ../shared/models/tokenizer.model --out "$m.tmp" --seed 0 \
                    --quiet >&2
                mv "$m.tmp" "$m"
            fi
            echo "$m" ;;
        smollm2) bash scripts/get_smollm2.sh "$DIR" | tail -1 ;;
        *) echo "bench_prefix.sh: unknown model '$1' (110m, smollm2, or --model PATH)" >&2; exit 2 ;;
    esac
}

# Words that are one token each in the Llama sentencepiece and SmolLM2 vocabularies, so a text of k
# of them is about k tokens.
$PY - "$N" "$SYSTEM_TOKENS" "$QUESTION_TOKENS" "$OUTPUT_TOKENS" >"$WORK/requests.jsonl" <<'EOF'
import json, random, sys
n, system, question, out = (int(a) for a in sys.argv[1:5])
words = " the a of and to in is it that was for on with as at by".split()
rng = random.Random(0)
sys_prompt = "System:" + "".join(" " + rng.choice(words) for _ in range(system - 2))
for i in range(n):
    q = f" Question {i}:" + "".join(" " + rng.choice(words) for _ in range(question - 4))
    print(json.dumps({"id": f"r{i}", "prompt": sys_prompt + q, "max_new_tokens": out, "ignore_eos": True}))
EOF

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');" \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"

if [ -n "$MODEL_PATH" ]; then MODEL_LIST=$MODEL_PATH; else MODEL_LIST=$MODELS; fi
ROWS=()
SERVE_ROWS=()
IFS=, read -ra model_list <<<"$MODEL_LIST"
IFS=, read -ra part_list <<<"$PARTS"
for name in "${model_list[@]}"; do
    if [ -n "$MODEL_PATH" ]; then model=$MODEL_PATH && name=$(basename "$MODEL_PATH" .bin); else model=$(model_path "$name"); fi
    cat "$model" >/dev/null  # page the weights in
    for part in "${part_list[@]}"; do
        case "$part" in
        batch)
            echo "== $name: $N requests, ~$SYSTEM_TOKENS-token shared system prompt + ~$QUESTION_TOKENS-token question, $OUTPUT_TOKENS output tokens; $THREADS threads"
            for cache in on off; do
                flag=; [ "$cache" = off ] && flag=--no-prefix-cache
                err=$(./generate --checkpoint "$model" --prompts-file "$WORK/requests.jsonl" \
                      --output "$WORK/$name-$cache.jsonl" --temperature 0 --seed 1 --threads "$THREADS" \
                      --max-seqs "$SEQS" --max-batch-tokens "$MAX_BATCH_TOKENS" $flag 2>&1 >/dev/null) ||
                    { echo "$err" >&2; exit 1; }
                echo "-- prefix cache $cache"
                grep -E '^(batch:|requests|TTFT|peak|prefix cache:)' <<<"$err" | sed 's/^/   /'
                n_done=$(wc -l <"$WORK/$name-$cache.jsonl")
                [ "$n_done" -eq "$N" ] || { echo "bench_prefix.sh: $name ($cache) finished $n_done of $N" >&2; exit 1; }
                f() { sed -n "s#.*$1.*#\1#p" <<<"$err" | head -1; }
                reused=$(f 'prefix cache: \([0-9]* of [0-9]*\) prompt tokens reused')
                ROWS+=("$name|$cache|$(f 'in \([0-9.]*\) s |')|$(f 'tokens, \([0-9.]*\) tok/s')|$(f 'TTFT ms p50 \([0-9.]*\) ')|$(f 'TTFT ms p50 [0-9.]* p90 \([0-9.]*\) ')|$(f 'TPOT ms p50 \([0-9.]*\) ')|$(f 'preemptions \([0-9]*\)')|${reused:-0}")
            done
            ;;
        serve)
            echo "== $name: $CONVERSATIONS conversations of $TURNS turns through generate --serve; $THREADS threads"
            for cache in on off; do
                flag=; [ "$cache" = off ] && flag=--no-prefix-cache
                log=$WORK/serve-$name-$cache.log
                ./generate --checkpoint "$model" --serve --port 0 --model-name bench --threads "$THREADS" \
                    --max-seqs "$SEQS" --max-batch-tokens "$MAX_BATCH_TOKENS" $flag 2>"$log" &
                pid=$!
                SERVER=$pid
                port=
                for _ in $(seq 600); do
                    port=$(sed -n 's#^ready: .*http://[^:]*:\([0-9]*\) .*#\1#p' "$log")
                    [ -n "$port" ] && break
                    kill -0 $pid 2>/dev/null || break
                    sleep 0.1
                done
                [ -n "$port" ] || { cat "$log" >&2; echo "bench_prefix.sh: the server did not start" >&2; exit 1; }
                line=$($CLIENT_PY - "$port" "$CONVERSATIONS" "$TURNS" "$SYSTEM_TOKENS" "$OUTPUT_TOKENS" <<'EOF'
import random, statistics, sys, threading, time
import openai
port, convs, turns, system, out = (int(a) for a in sys.argv[1:6])
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
words = " the a of and to in is it that was for on with as at by".split()
rng = random.Random(0)
sys_prompt = "System:" + "".join(" " + rng.choice(words) for _ in range(system - 2))
first, later, cached, prompt = [], [], [0], [0]
lock = threading.Lock()
def chat(c):
    r = random.Random(c)
    msgs = [{"role": "system", "content": sys_prompt}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Chat {c} turn {t}:" + "".join(" " + r.choice(words) for _ in range(20))})
        t0, ttft, text = time.perf_counter(), None, ""
        for ch in client.chat.completions.create(model="bench", messages=msgs, max_tokens=out, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}):
            if ch.choices and ch.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += ch.choices[0].delta.content
            if ch.usage:
                with lock:
                    prompt[0] += ch.usage.prompt_tokens
                    d = ch.usage.prompt_tokens_details
                    cached[0] += (d.cached_tokens or 0) if d else 0
        msgs.append({"role": "assistant", "content": text})
        with lock:
            (first if t == 0 else later).append(1e3 * (ttft if ttft is not None else time.perf_counter() - t0))
threads = [threading.Thread(target=chat, args=(c,)) for c in range(convs)]
for th in threads: th.start()
for th in threads: th.join()
print(f"{statistics.median(first):.1f}|{statistics.median(later):.1f}|{max(later):.1f}|{cached[0]} of {prompt[0]}")
EOF
)
                kill -TERM $pid
                wait $pid || true
                SERVER=
                echo "-- prefix cache $cache: turn-1 TTFT p50 | later turns TTFT p50 | later max | prompt tokens reused: $line"
                SERVE_ROWS+=("$name|$cache|$line")
            done
            ;;
        *) echo "bench_prefix.sh: unknown part '$part' (batch, serve)" >&2; exit 2 ;;
        esac
    done
done

if [ ${#ROWS[@]} -gt 0 ]; then
    echo
    echo "| model | prefix cache | wall s | output tok/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | preemptions | prompt tokens reused |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
fi
if [ ${#SERVE_ROWS[@]} -gt 0 ]; then
    echo
    echo "| model | prefix cache | turn 1 TTFT p50 ms | turns 2+ TTFT p50 ms | turns 2+ TTFT max ms | prompt tokens reused |"
    echo "| --- | --- | ---: | ---: | ---: | ---: |"
    for row in "${SERVE_ROWS[@]}"; do echo "| ${row//|/ | } |"; done
fi
