// kernels.cu: the CUDA backend. For now: finding a device, so --device auto/cuda can decide.
// The op table's CUDA kernels come with the CUDA backend issue.
#include <cuda_runtime.h>

#include <string>

#include "ops.h"

int cuda_device_count(std::string* why) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (why) *why = cudaGetErrorString(err);
        return 0;
    }
    return n;
}

#include "common.h"
// (transitional: the op table follows in the next commit)
Ops* cuda_ops() { throw Error("--device cuda: the CUDA op table is not implemented yet in this build; use --device cpu"); }
