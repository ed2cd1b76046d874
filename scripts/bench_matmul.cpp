// bench_matmul.cpp: the weight products of a forward pass alone (not part of `make test`).
//
// Loads one or more model.bin files and times, per model, the matrix products of one forward over
// n tokens as model.cpp issues them (per layer matmul_qkv, wo, ffn_gate_up, w2; then the
// classifier), with no attention, norms or residual adds. At n = 1 this is decode's share that
// should run at the memory's read bandwidth, so the GB/s it reports (weight bytes / time) says how
// close the kernels come, apart from everything else a token costs. Models are timed in turn,
// round by round (the machine's bandwidth drifts), and the table gives the best and median pass.
// Weights larger than the last-level cache come from memory on every pass, as in decode.
// Mixture-of-experts layers are skipped (their products depend on the routing).
//
// Build: make build/bench_matmul
// Usage: build/bench_matmul MODEL.bin [MODEL.bin ...] [--n N (1)] [--threads T (0 = all)] [--rounds R (15)] [--simd TARGET (auto)]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "batch.h"  // percentile
#include "common.h"
#include "model.h"
#include "ops.h"

namespace {

int usage() {
    std::fprintf(stderr, "usage: bench_matmul MODEL.bin [MODEL.bin ...] [--n N (1)] [--threads T (0 = all)] [--rounds R (15)] [--simd TARGET (auto)]\n");
    return 2;
}

// One model's products and the buffers they read and write.
struct Products {
    std::string path;
    std::unique_ptr<Model> model;
    std::vector<float> x, q, k, v, o, h, up, logits;
    size_t bytes = 0;  // weight bytes one pass reads
    std::vector<double> seconds;

    void run(Ops* ops, int n) {
        for (const LayerWeights& L : model->w.layers) {
            ops->matmul_qkv(q.data(), k.data(), v.data(), x.data(), L.wq, L.wk, L.wv, n);
            ops->matmul(o.data(), q.data(), L.wo, n);
            ops->ffn_gate_up(h.data(), up.data(), x.data(), L.w1, L.w3, n);
            ops->matmul(o.data(), h.data(), L.w2, n);
        }
        ops->matmul(logits.data(), x.data(), model->w.output, n);
    }
};

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> paths;
    int n = 1, threads = 0, rounds = 15;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> int {
            if (i + 1 >= argc) { std::fprintf(stderr, "bench_matmul: %s needs a value\n", a.c_str()); std::exit(2); }
            return std::atoi(argv[++i]);
        };
        if (a == "--n") n = next();
        else if (a == "--threads") threads = next();
        else if (a == "--rounds") rounds = next();
        else if (a == "--simd" && i + 1 < argc) {
            std::string why;
            if (!cpu_set_simd_target(argv[++i], &why)) { std::fprintf(stderr, "bench_matmul: %s\n", why.c_str()); return 2; }
        }
        else if (a == "-h" || a == "--help") return usage(), 0;
        else if (!a.empty() && a[0] == '-') { std::fprintf(stderr, "bench_matmul: unknown option %s\n", a.c_str()); return usage(); }
        else paths.push_back(a);
    }
    if (paths.empty() || n < 1 || rounds < 1) return usage();

    try {
        Ops* ops = cpu_ops(threads);
        std::vector<Products> all(paths.size());
        std::mt19937 rng(1234);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (size_t i = 0; i < paths.size(); i++) {
            Products& p = all[i];
            p.path = paths[i];
            p.model = std::make_unique<Model>(paths[i], ops);
            const Config& c = p.model->cfg;
            if (c.n_experts > 0) throw Error(fmt("%s: a mixture-of-experts model (not timed here)", paths[i].c_str()));
            const size_t q_dim = size_t(c.n_heads) * c.head_dim, kv_dim = size_t(c.n_kv_heads) * c.head_dim;
            p.x.resize(size_t(n) * c.dim);
            for (float& f : p.x) f = normal(rng);
            p.q.resize(n * q_dim);
            for (float& f : p.q) f = normal(rng);
            p.k.resize(n * kv_dim), p.v.resize(n * kv_dim), p.o.resize(size_t(n) * c.dim);
            p.h.resize(size_t(n) * c.hidden_dim), p.up.resize(size_t(n) * c.hidden_dim);
            p.logits.resize(size_t(n) * c.vocab_size);
            for (const LayerWeights& L : p.model->w.layers)
                p.bytes += L.wq.bytes() + L.wk.bytes() + L.wv.bytes() + L.wo.bytes() + L.w1.bytes() + L.w2.bytes() + L.w3.bytes();
            p.bytes += p.model->w.output.bytes();
            p.run(ops, n);  // warm up: pages the weights in, grows the backend's scratch
        }
        for (int r = 0; r < rounds; r++)
            for (size_t j = 0; j < all.size(); j++) {
                Products& p = all[(j + size_t(r)) % all.size()];  // rotate so no model always runs first
                const double t0 = now_seconds();
                p.run(ops, n);
                p.seconds.push_back(now_seconds() - t0);
            }
        std::printf("n %d, threads %s, %d rounds; weight bytes read per pass / time\n", n,
                    threads > 0 ? std::to_string(threads).c_str() : "all", rounds);
        std::printf("simd %s\n%-48s %6s %9s %9s %9s %10s\n", cpu_simd_target().c_str(), "model", "dtype", "MB", "best ms", "best GB/s", "median GB/s");
        for (const Products& p : all) {
            const double best = *std::min_element(p.seconds.begin(), p.seconds.end());
            std::printf("%-48s %6s %9.1f %9.3f %9.2f %10.2f\n", p.path.c_str(),
                        dtype_name(p.model->w.layers[0].wq.dtype), p.bytes / 1e6, 1e3 * best, p.bytes / best / 1e9,
                        p.bytes / percentile(p.seconds, 50) / 1e9);
        }
    } catch (const Error& e) {
        std::fprintf(stderr, "bench_matmul: %s\n", e.what());
        return 1;
    }
    return 0;
}
