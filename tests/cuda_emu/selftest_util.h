// tests/cuda_emu/selftest_util.h: host helpers of the emulator's own tests (emu_selftest.cu,
// nccl_selftest.cpp): device copies of host vectors and back, every call's status required.
#pragma once
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <vector>

// Device memory holding v.
template <typename T>
T* device(const std::vector<T>& v) {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, v.size() * sizeof(T)) == cudaSuccess);
    REQUIRE(cudaMemcpyAsync(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
    return static_cast<T*>(p);
}
// n values of device memory p, on the host.
template <typename T>
std::vector<T> host(const T* p, size_t n) {
    std::vector<T> v(n);
    REQUIRE(cudaMemcpyAsync(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
}
