#!/usr/bin/env bash
# scripts/bench_peer.sh: fastgen against llama.cpp on the same GGUF files, CPU, side by side.
# Not part of `make test`. llama.cpp is not built or fetched here: pass the llama-bench binary of a
# build you made yourself (its public source, in a folder outside this repository).
#
#   scripts/bench_peer.sh --llama-bench PATH [--simd auto|avx2|...] [--threads 2] [--rounds 3]
#                         [--tokens 128] FILE.gguf [FILE.gguf ...]
#
# Per file: `./quantize --input FILE.gguf` converts it once (auto mode keeps GGUF's Q8_0/Q4_0/Q4_1
# blocks exactly; F16/BF16 stay as they are) next to it as FILE.fastgen.bin; then, round by round
# and engine by engine (the machine's bandwidth drifts by minutes), decode of --tokens tokens after a
# 1-token prompt and prefill of a --tokens-token prompt: llama-bench -p 0 -n T and -p T -n 0;
# generate with the same counts: decode after the prompt "Once" (it stops early only at EOS, and
# says how many tokens it made), prefill of "the" repeated to T tokens (generate prints the count).
# Prints every figure as measured, then a table of medians and the ratio fastgen / llama.cpp.
set -uo pipefail
cd "$(dirname "$0")/.."

LB="" SIMD=auto THREADS=2 ROUNDS=3 TOKENS=128 FILES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --llama-bench) LB=$2; shift 2 ;;
        --simd) SIMD=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "bench_peer: unknown option $1" >&2; exit 2 ;;
        *) FILES+=("$1"); shift ;;
    esac
done
[ -x "$LB" ] || { echo "bench_peer: --llama-bench PATH (an executable llama-bench) is required" >&2; exit 2; }
[ ${#FILES[@]} -gt 0 ] || { echo "bench_peer: give one or more GGUF files" >&2; exit 2; }
[ -x ./generate ] && [ -x ./quantize ] || make -j"$(nproc)" generate quantize >/dev/null || exit 1

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
flags=$(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx_vnni\|asimd' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "host: $cpu; SIMD flags: $flags; threads $THREADS; fastgen --simd $SIMD; commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"

long_prompt=$(python3 -c "print(' '.join(['the'] * $TOKENS))")

declare -A results
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }
for f in "${FILES[@]}"; do
    bin=${f%.gguf}.fastgen.bin
    [ -s "$bin" ] || ./quantize -q --input "$f" --output "$bin" || exit 1
done
for round in $(seq 1 "$ROUNDS"); do
    for f in "${FILES[@]}"; do
        name=$(basename "$f" .gguf) bin=${f%.gguf}.fastgen.bin
        ld=$("$LB" -m "$f" -t "$THREADS" -p 0 -n "$TOKENS" -r 1 -o csv 2>/dev/null | tail -1 | awk -F, '{gsub(/"/, "", $(NF-1)); print $(NF-1)}')
        lp=$("$LB" -m "$f" -t "$THREADS" -p "$TOKENS" -n 0 -r 1 -o csv 2>/dev/null | tail -1 | awk -F, '{gsub(/"/, "", $(NF-1)); print $(NF-1)}')
        out=$(./generate --checkpoint "$bin" --simd "$SIMD" --threads "$THREADS" --prompt "Once" --max-new-tokens "$TOKENS" \
              --temperature 0 2>&1 >/dev/null)
        fd=$(sed -nE 's/.*decode ([0-9.]+) tok\/s.*/\1/p' <<<"$out" | tail -1)
        out=$(./generate --checkpoint "$bin" --simd "$SIMD" --threads "$THREADS" --prompt "$long_prompt" --max-new-tokens 1 \
              --temperature 0 2>&1 >/dev/null)
        fp=$(sed -nE 's/.*prefill ([0-9.]+) tok\/s.*/\1/p' <<<"$out" | tail -1)
        pn=$(sed -nE 's/^prompt ([0-9]+) tokens.*/\1/p' <<<"$out" | tail -1)
        simd=$(sed -nE 's/.*simd ([a-z0-9_]+).*/\1/p' <<<"$out" | head -1)
        echo "round $round $name: llama.cpp decode $ld prefill $lp | fastgen ($simd) decode $fd prefill $fp ($pn tokens)"
        results[$name,ld]+=" $ld" results[$name,lp]+=" $lp" results[$name,fd]+=" $fd" results[$name,fp]+=" $fp"
    done
done
echo
echo "| weights | llama.cpp decode tok/s | fastgen decode | ratio | llama.cpp pp$TOKENS tok/s | fastgen prefill | ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for f in "${FILES[@]}"; do
    name=$(basename "$f" .gguf)
    ld=$(median <<<"${results[$name,ld]}") lp=$(median <<<"${results[$name,lp]}")
    fd=$(median <<<"${results[$name,fd]}") fp=$(median <<<"${results[$name,fp]}")
    awk -v n="$name" -v ld="$ld" -v fd="$fd" -v lp="$lp" -v fp="$fp" \
        'BEGIN {printf "| %s | %.1f | %.1f | %.2fx | %.1f | %.1f | %.2fx |\n", n, ld, fd, fd / ld, lp, fp, fp / lp}'
done
