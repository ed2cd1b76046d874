#!/usr/bin/env bash
# gpu_pack.sh: run HERE (the CPU machine) before a GPU session's device call: fills .carry/ (ignored
# by git) with what scripts/gpu_session.sh needs on a bare GPU machine that cannot reach any
# package registry: the build's headers and libraries from this machine (sentencepiece, CLI11,
# doctest, nlohmann-json, Open MPI), prebuilt binaries as a fallback (x86-64-v3, sm_80..sm_90a),
# and the models the tests read (stories260K, tok512.model, tokenizer.model). About 20 MB.
# Then: run(command="bash scripts/gpu_session.sh", carry=[".carry"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >>"$exclude"
MODELS=${FASTGEN_MODELS:-../shared/models}
rm -rf "$C"
mkdir -p "$C/bin" "$C/lib" "$C/include" "$C/models"

# prebuilt binaries (portable CPU target; the GPU machine's own build is preferred when it works)
make -j"$(nproc)" BUILD=build/carry ARCH=-march=x86-64-v3 build/carry/run_tests generate quantize >/dev/null
cp build/carry/run_tests generate quantize "$C/bin/"
rm -f generate quantize && make -j"$(nproc)" generate quantize >/dev/null  # this machine's own build back
nvcc -O3 -o "$C/bin/copybw" scripts/copybw.cu

# libraries the binaries need that a CUDA image may lack (CUDA's own come from the image)
for lib in $(ldd "$C/bin/run_tests" | awk '$3 ~ /^\// {print $3}' | sort -u); do
    case $(basename "$lib") in
        libc.so*|libm.so*|libstdc++*|libgcc_s*|libdl.so*|libpthread*|librt.so*|libz.so*|libudev*|libcuda*|libcublas*|libnccl*) ;;
        *) cp -L "$lib" "$C/lib/" ;;
    esac
done
# link-time names for a build there
cp -L /usr/lib/x86_64-linux-gnu/libsentencepiece.so "$C/lib/"
cp -L /usr/lib/x86_64-linux-gnu/libmpi.so "$C/lib/"
# headers
cp -r /usr/include/CLI /usr/include/doctest /usr/include/nlohmann "$C/include/"
cp /usr/include/sentencepiece_processor.h /usr/include/sentencepiece_trainer.h "$C/include/" 2>/dev/null || true
mkdir -p "$C/include/mpi" && cp -r /usr/lib/x86_64-linux-gnu/openmpi/include/. "$C/include/mpi/"
# models
cp "$MODELS/stories260K.bin" "$MODELS/tok512.model" "$MODELS/tokenizer.model" "$MODELS/llama2xs_tok512.bin" "$C/models/"
du -sh "$C"
