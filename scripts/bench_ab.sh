#!/usr/bin/env bash
# scripts/bench_ab.sh: two builds of generate side by side on the same models (a change against the
# commit before it, say), alternating binary by binary and round by round, since the machine's
# bandwidth drifts by minutes. Not part of `make test`.
#
#   scripts/bench_ab.sh [--rounds 3] [--threads 2] [--tokens 128] A/generate B/generate MODEL.bin [MODEL.bin ...]
#
# A binary may carry flags: "B/generate --simd avx2". Per model and binary: decode of --tokens
# tokens after "Once upon a time", and prefill of a 278-token prompt (bench.sh's). Prints each
# figure as measured, then medians and B / A.
set -uo pipefail
ROUNDS=3 THREADS=2 TOKENS=128
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 3 ] || { sed -n '6p' "$0" >&2; exit 2; }
A=$1 B=$2; shift 2
TEXT="The quick brown fox jumps over the lazy dog while the little girl named Lily plays in the park. "
LONG=$(for _ in $(seq 14); do printf '%s' "$TEXT"; done)
echo "host: $(lscpu | sed -n 's/^Model name: *//p' | head -1); A = $A; B = $B; threads $THREADS"

declare -A r
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }
for round in $(seq 1 "$ROUNDS"); do
    for m in "$@"; do
        for side in A B; do
            bin=${!side}
            # shellcheck disable=SC2086
            d=$($bin --checkpoint "$m" --threads "$THREADS" --prompt "Once upon a time" --max-new-tokens "$TOKENS" --temperature 0 2>&1 >/dev/null |
                sed -nE 's/.*decode ([0-9.]+) tok\/s.*/\1/p' | tail -1)
            # shellcheck disable=SC2086
            p=$($bin --checkpoint "$m" --threads "$THREADS" --prompt "$LONG" --max-new-tokens 1 --temperature 0 2>&1 >/dev/null |
                sed -nE 's/.*prefill ([0-9.]+) tok\/s.*/\1/p' | tail -1)
            echo "round $round $(basename "$m") $side: decode $d prefill $p"
            r[$m,$side,d]+=" $d" r[$m,$side,p]+=" $p"
        done
    done
done
echo
echo "| model | A decode tok/s | B decode | B / A | A prefill tok/s | B prefill | B / A |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for m in "$@"; do
    ad=$(median <<<"${r[$m,A,d]}") bd=$(median <<<"${r[$m,B,d]}") ap=$(median <<<"${r[$m,A,p]}") bp=$(median <<<"${r[$m,B,p]}")
    awk -v n="$(basename "$m")" -v ad="$ad" -v bd="$bd" -v ap="$ap" -v bp="$bp" \
        'BEGIN {printf "| %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n", n, ad, bd, bd / ad, ap, bp, bp / ap}'
done
