// tests/cuda_emu/cublas_v2.h: the cuBLAS subset kernels.cu uses, for the CUDA emulator
// (cuda_runtime.h). cublasGemmEx computes C = alpha op(A) op(B) + beta C in column-major terms
// (OP_N / OP_T, lda/ldb/ldc checked as cuBLAS checks them) for f32 x f32 -> f32, bf16 x bf16 ->
// bf16/f32 and f16 x f16 -> f16/f32 with CUBLAS_COMPUTE_32F (other combinations: NOT_SUPPORTED);
// products of the exact operands summed in double (cuBLAS's own order and precision are not
// emulated), C not read when beta is 0. It runs on the handle's stream: recorded while that stream
// captures. alpha and beta are host pointers, read at the call. The other calls keep settings.
#pragma once
#include "cuda_runtime.h"

struct cublasContext;
typedef cublasContext* cublasHandle_t;
enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

cublasStatus_t cublasCreate(cublasHandle_t* handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void* workspace, size_t bytes);
const char* cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);
