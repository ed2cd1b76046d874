// membw.cpp: a small STREAM-like *read* bandwidth test for scripts/bench.sh (not part of the build).
// Each OpenMP thread sums a private, contiguous slice of one large buffer (default 2 GiB, far beyond
// cache) with AVX-512 (or a loop the compiler vectorises); several repetitions; prints the best and
// median GB/s (1e9 bytes/s) for 1 thread and for all threads, then `read_bw_gbs <best all-thread>`.
// Build: g++ -std=c++17 -O3 -march=native -fopenmp scripts/membw.cpp -o build/membw
// Usage: membw [MiB=2048] [reps=7]
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

// Sum of n floats (n a multiple of 64); several independent accumulators keep loads in flight.
static float sum_slice(const float* p, size_t n) {
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    alignas(64) float lanes[16];  // (not _mm512_reduce_add_ps: GCC 12 warns inside its header)
    _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    float s = 0;
    for (float v : lanes) s += v;
    return s;
#else
    float acc[64] = {};
    for (size_t i = 0; i < n; i += 64)
        for (int j = 0; j < 64; j++) acc[j] += p[i + j];
    float s = 0;
    for (float v : acc) s += v;
    return s;
#endif
}

// One timed pass over the whole buffer with `threads` threads; returns GB/s.
static double pass(const float* buf, size_t n, int threads, volatile float* sink) {
    float total = 0;
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t chunk = n / nt / 64 * 64;
        total += sum_slice(buf + size_t(t) * chunk, chunk);
    }
    double dt = omp_get_wtime() - t0;
    *sink = total;
    size_t chunk = n / threads / 64 * 64;
    return double(chunk) * threads * sizeof(float) / dt / 1e9;
}

int main(int argc, char** argv) {
    size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 2048;
    int reps = argc > 2 ? std::atoi(argv[2]) : 7;
    size_t n = mib * (1u << 20) / sizeof(float) / 64 * 64;
    float* buf = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    if (!buf || reps < 1) return std::fprintf(stderr, "membw: cannot allocate %zu MiB\n", mib), 1;
    int all = omp_get_max_threads();
    // First touch from the same threads (and slices) that later read, then one untimed warm-up.
#pragma omp parallel for schedule(static) num_threads(all)
    for (size_t i = 0; i < n; i++) buf[i] = float(i & 1023) * 1e-3f;
    volatile float sink = 0;
    double best_all = 0;
    for (int threads : {1, all}) {
        pass(buf, n, threads, &sink);
        std::vector<double> r;
        for (int i = 0; i < reps; i++) r.push_back(pass(buf, n, threads, &sink));
        std::sort(r.begin(), r.end());
        std::printf("threads %d: read best %.2f GB/s, median %.2f GB/s (%zu MiB x %d reps)\n", threads,
                    r.back(), r[r.size() / 2], mib, reps);
        if (threads == all) best_all = r.back();
        if (all == 1) break;
    }
    std::printf("read_bw_gbs %.2f\n", best_all);
    std::free(buf);
    return 0;
}
