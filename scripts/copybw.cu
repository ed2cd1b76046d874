// copybw.cu: the card's device-to-device copy bandwidth, the ceiling the GPU benchmark compares
// decode against. Copies a 1 GiB buffer (cudaMemcpyAsync, device to device) 20 times after 3
// warm-ups, each timed with events; prints the median as bytes read plus bytes written per second.
// Build: nvcc -O3 -o build/copybw scripts/copybw.cu     Usage: build/copybw [MiB (1024)]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                                   \
    do {                                                                                              \
        cudaError_t e = (call);                                                                       \
        if (e != cudaSuccess) {                                                                       \
            std::fprintf(stderr, "copybw: %s failed at %s:%d: %s\n", #call, __FILE__, __LINE__,       \
                         cudaGetErrorString(e));                                                      \
            std::exit(1);                                                                             \
        }                                                                                             \
    } while (0)

int main(int argc, char** argv) {
    const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 1024;
    const size_t bytes = mib << 20;
    void *a = nullptr, *b = nullptr;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemset(a, 1, bytes));  // not zeros: nothing should be special about the data
    CHECK(cudaMemset(b, 2, bytes));
    cudaEvent_t t0, t1;
    CHECK(cudaEventCreate(&t0));
    CHECK(cudaEventCreate(&t1));
    std::vector<float> ms;
    for (int i = 0; i < 23; i++) {
        CHECK(cudaEventRecord(t0));
        CHECK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
        CHECK(cudaEventRecord(t1));
        CHECK(cudaEventSynchronize(t1));
        float m = 0;
        CHECK(cudaEventElapsedTime(&m, t0, t1));
        if (i >= 3) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    cudaDeviceProp p;
    CHECK(cudaGetDeviceProperties(&p, 0));
    std::printf("device %s: copy of %zu MiB, median %.3f ms (min %.3f, max %.3f) over %zu copies\n", p.name, mib, med,
                ms.front(), ms.back(), ms.size());
    std::printf("copy_bw_gbs %.1f\n", 2.0 * bytes / (med * 1e-3) / 1e9);  // read + write
    return 0;
}
