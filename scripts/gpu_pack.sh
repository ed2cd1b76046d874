#!/usr/bin/env bash
# gpu_pack.sh: run HERE (the CPU machine) before a GPU session's one device call. Builds the CUDA
# binaries for sm_90a only (H100/H200; the Makefile's portable host ARCH) in build/gpu-pack/, from a
# copy of this working tree (the checkout's own ./generate, ./quantize and build/ stay as they are),
# and fills .carry/ (ignored by git) with what scripts/gpu_session.sh needs on a bare GPU machine:
#   .carry/gpu_session.sh, generate, quantize, build/run_tests, build/copybw (scripts/copybw.cu)
#   .carry/lib/       the shared libraries they need that the GPU image may lack (ldd: sentencepiece,
#                     Open MPI, pcre2, highway, ...; not glibc, the compiler's runtime, CUDA or NCCL)
#   .carry/include.tar.gz  headers for a build there, used only if the carried binaries do not start
#   .carry/models/    the small models the gpu tests read, and tokenizer.model for the 7B shapes
#   .carry/scripts/   bench_gpu.sh, bench_batch.sh, make_random_model.py, modelbin.py, gptfast_bench.py
#   .carry/gpt-fast/  with --gpt-fast DIR: gpt-fast's Python files (a checkout, or a git directory
#                     such as a fetched mirror); never committed
# Refuses (exit 1) when .carry/ comes to more than 60 MiB: the device tool carries 64 MiB in all.
#
# Usage: bash scripts/gpu_pack.sh [--gpt-fast DIR]
# Then one device call: run(command="bash .carry/gpu_session.sh --budget 540", carry=[".carry"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
die() { echo "gpu_pack.sh: $*" >&2; exit 1; }
GPT_FAST=
while [ $# -gt 0 ]; do
    case "$1" in
        --gpt-fast) GPT_FAST=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null) || die "no nvcc here: the CUDA binaries cannot be built"
SM90=(-gencode "arch=compute_90a,code=sm_90a")
MODELS=${FASTGEN_MODELS:-../shared/models}
C=.carry
P=$PWD/build/gpu-pack

# ---- build from a copy of the working tree (tracked and untracked-not-ignored files)
rm -rf "$P/src"
mkdir -p "$P/src" "$P/obj" || die "cannot make $P"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null |
    tar -xf - -C "$P/src" || die "cannot copy the working tree to $P/src"
echo "== building generate, quantize, run_tests for sm_90a in $P (log: $P/build.log)"
env -u ARCH make -C "$P/src" -j"$(nproc)" BUILD="$P/obj" NVCC="$NVCC" CUDA_ARCH="${SM90[*]}" \
    generate quantize "$P/obj/run_tests" >"$P/build.log" 2>&1 || { tail -20 "$P/build.log"; die "the build failed"; }
"$NVCC" -O3 "${SM90[@]}" -o "$P/obj/copybw" scripts/copybw.cu || die "cannot build scripts/copybw.cu"
BINS=("$P/src/generate" "$P/src/quantize" "$P/obj/run_tests")
ldd "$P/src/generate" | grep -q libcudart || die "$P/src/generate has no CUDA backend (nvcc not used?)"

# ---- .carry/
rm -rf "$C"
mkdir -p "$C/build" "$C/lib" "$C/models" "$C/scripts" || die "cannot make $C"
cp "$P/src/generate" "$P/src/quantize" scripts/gpu_session.sh "$C/" || die "cannot copy the binaries"
cp "$P/obj/run_tests" "$P/obj/copybw" "$C/build/" || die "cannot copy the binaries"
for lib in $(ldd "${BINS[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
    case $(basename "$lib") in
        libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|ld-linux*) ;;  # glibc
        libstdc++.so*|libgcc_s.so*|libgomp.so*) ;;  # the compiler's runtime: the GPU image's is newer, keep it
        libcuda.so*|libcudart.so*|libcublas*|libnccl*|libnvidia*) ;;  # the GPU image's own CUDA
        *) cp -L "$lib" "$C/lib/" || die "cannot copy $lib" ;;
    esac
done
MPI_INC=$(mpicxx --showme:incdirs 2>/dev/null | cut -d' ' -f1)
NCCL_H=/usr/include/nccl.h
[ -f "$NCCL_H" ] || NCCL_H=$(dirname "$NVCC")/../include/nccl.h
tar -czf "$C/include.tar.gz" -C /usr/include CLI doctest nlohmann hwy sentencepiece_processor.h pcre2.h \
    -C "${MPI_INC:-/usr/lib/x86_64-linux-gnu/openmpi/include}" . -C "$(dirname "$NCCL_H")" nccl.h ||
    echo "gpu_pack.sh: warning: headers incomplete: a build on the GPU machine (the fallback) may fail" >&2
for m in stories260K.bin llama2xs_tok512.bin tok512.model tok512.bin tokenizer.model; do
    cp "$MODELS/$m" "$C/models/" 2>/dev/null || echo "gpu_pack.sh: warning: no $MODELS/$m (the tests that read it skip or fail)" >&2
done
[ -s "$C/models/tokenizer.model" ] || die "no $MODELS/tokenizer.model: the random 7B models embed it"
cp scripts/bench_gpu.sh scripts/bench_batch.sh scripts/make_random_model.py scripts/modelbin.py \
    scripts/gptfast_bench.py "$C/scripts/" || die "cannot copy the scripts"
if [ -n "$GPT_FAST" ]; then
    G=(model.py generate.py quantize.py tokenizer.py tp.py)
    mkdir -p "$C/gpt-fast"
    if [ -f "$GPT_FAST/generate.py" ]; then
        cp "${G[@]/#/$GPT_FAST/}" "$C/gpt-fast/" || die "cannot copy gpt-fast's ${G[*]} from $GPT_FAST"
    else
        git --git-dir="$GPT_FAST" archive HEAD "${G[@]}" | tar -xf - -C "$C/gpt-fast" ||
            die "--gpt-fast $GPT_FAST: neither a checkout with generate.py nor a git directory holding ${G[*]}"
    fi
fi
{
    echo "packed $(date -u '+%Y-%m-%d %H:%M UTC') from commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes')"
    echo "$("$NVCC" --version | tail -1); CUDA_ARCH=${SM90[*]}; host $(uname -m), $(ldd --version | head -1)"
} >"$C/PACKED"
cat "$C/PACKED"

# ---- size: the device tool carries the working tree and .carry, 64 MiB together
kib=$(du -sk "$C" | cut -f1)
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
du -sh "$C"/* | sort -h | tail -6
echo "== $C: $((kib / 1024)) MiB ($kib KiB); the working tree beside it: $((tree_kib / 1024)) MiB"
[ "$kib" -le $((60 * 1024)) ] || die "$C is $((kib / 1024)) MiB, over the 60 MiB that fits the device tool's 64 MiB carry"
[ $((kib + tree_kib)) -le $((64 * 1024)) ] || die "$C and the working tree come to more than 64 MiB together"
echo "== ready: run(command=\"bash .carry/gpu_session.sh --budget 540${GPT_FAST:+ --gpt-fast .carry/gpt-fast}\", carry=[\".carry\"], timeout_s=600)"
