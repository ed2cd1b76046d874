// bench_forward.cpp: what one target forward over n tokens costs relative to a single-token decode
// step, i.e. the price of verifying k = n - 1 speculative drafts (not part of `make test`).
//
// Loads a model.bin, prefills a context of P tokens into sequence 0 of a KVCache, then times
// forward() over n = 1..N tokens at positions P..P+n-1 with logits for all n rows (as speculative
// verification asks for), truncating the cache back to P after each call. The n values are
// interleaved round by round (the machine's bandwidth drifts), each sample repeats the call enough
// times to last a few milliseconds, and the table reports the median over rounds. The ratio to
// n = 1 is the median over rounds of ms(n) / ms(1) within the round (samples a few ms apart, so a
// burst of other load or a change of memory bandwidth mostly cancels); "min ratio" divides the
// fastest samples.
//
// Build: make build/bench_forward (scripts/bench_speculative.sh does this)
// Usage: build/bench_forward MODEL.bin [--threads T] [--prefill P] [--max-n N] [--ns 1,2,4,16]
//                                      [--rounds R] [--min-sample-ms MS]
// --ns times only the listed n (e.g. batched prefill sizes) instead of 1..N; n = 1 is always timed.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "batch.h"  // percentile
#include "common.h"
#include "model.h"
#include "ops.h"

namespace {

int usage() {
    std::fprintf(stderr,
                 "usage: bench_forward MODEL.bin [--threads T (0 = all)] [--prefill P (64)] [--max-n N (9)]\n"
                 "                     [--ns N1,N2,... (1..max-n)] [--rounds R (15)] [--min-sample-ms MS (5)]\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string path;
    int threads = 0, prefill = 64, max_n = 9, rounds = 15;
    double min_sample_ms = 5.0;
    std::vector<int> ns;  // the n values timed; 1..max_n unless --ns
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char* {
            if (i + 1 >= argc) { std::fprintf(stderr, "bench_forward: %s needs a value\n", a.c_str()); std::exit(2); }
            return argv[++i];
        };
        if (a == "--threads") threads = std::atoi(next());
        else if (a == "--prefill") prefill = std::atoi(next());
        else if (a == "--max-n") max_n = std::atoi(next());
        else if (a == "--ns") {
            for (const char* p = next(); *p;) {
                char* end;
                ns.push_back(int(std::strtol(p, &end, 10)));
                if (end == p || (*end && *end != ',')) { std::fprintf(stderr, "bench_forward: bad --ns list\n"); return usage(); }
                p = *end ? end + 1 : end;
            }
        }
        else if (a == "--rounds") rounds = std::atoi(next());
        else if (a == "--min-sample-ms") min_sample_ms = std::atof(next());
        else if (a == "-h" || a == "--help") return usage(), 0;
        else if (!a.empty() && a[0] == '-') { std::fprintf(stderr, "bench_forward: unknown option %s\n", a.c_str()); return usage(); }
        else path = a;
    }
    if (ns.empty())
        for (int n = 1; n <= max_n; n++) ns.push_back(n);
    if (std::find(ns.begin(), ns.end(), 1) == ns.end()) ns.insert(ns.begin(), 1);
    std::sort(ns.begin(), ns.end());
    ns.erase(std::unique(ns.begin(), ns.end()), ns.end());
    max_n = ns.back();
    if (path.empty() || prefill < 1 || ns.front() < 1 || rounds < 1) return usage();

    try {
        Model m(path, cpu_ops(threads));
        const Config& c = m.cfg;
        if (prefill + max_n > c.max_seq_len)
            throw Error(fmt("prefill %d + max-n %d exceeds the context (%d)", prefill, max_n, c.max_seq_len));
        KVCache kv(c, prefill + max_n);
        const int seq = 0;

        // Prefill P random tokens (BOS first) in one batch; their K/V stay for every timed call.
        std::mt19937 rng(1234);
        std::uniform_int_distribution<int> tok(3, c.vocab_size - 1);
        std::vector<BatchToken> pre;
        for (int p = 0; p < prefill; p++) pre.push_back({seq, p, p == 0 ? c.bos_id : tok(rng)});
        if (!kv.reserve(seq, prefill)) throw Error("KV cache too small for the prefill");
        m.forward(kv, pre, {}, nullptr);

        std::vector<std::vector<BatchToken>> batches(max_n + 1);
        std::vector<std::vector<int>> rows(max_n + 1);
        for (int n = 1; n <= max_n; n++)
            for (int i = 0; i < n; i++) {
                batches[n].push_back({seq, prefill + i, tok(rng)});
                rows[n].push_back(i);
            }
        std::vector<float> logits(size_t(max_n) * c.vocab_size);
        auto call = [&](int n) {
            if (!kv.reserve(seq, prefill + n)) throw Error("KV cache full");
            m.forward(kv, batches[n], rows[n], logits.data());
            kv.truncate(seq, prefill);
        };

        // Warm up (pages the weights in, grows the scratch buffers), then pick the calls per sample.
        for (int n : ns) call(n);
        double t0 = now_seconds();
        int warm = 0;
        while (now_seconds() - t0 < 0.2 || warm < 3) { call(1); warm++; }
        const double t1 = (now_seconds() - t0) / warm;
        const int inner = std::max(1, int(min_sample_ms * 1e-3 / t1 + 0.5));

        std::vector<std::vector<double>> ms(max_n + 1);
        for (int r = 0; r < rounds; r++) {
            for (size_t j = 0; j < ns.size(); j++) {
                const int n = ns[(j + size_t(r)) % ns.size()];  // rotate the order so no n always runs first
                double s = now_seconds();
                for (int i = 0; i < inner; i++) call(n);
                ms[n].push_back(1e3 * (now_seconds() - s) / inner);
            }
        }

        std::printf("model %s: dim %d, %d layers, %d heads (%d kv), vocab %d, %.1f MB of weights (%s)\n",
                    path.c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
                    m.weight_bytes_per_token() / 1e6, dtype_name(m.w.layers[0].wq.dtype));
        std::printf("threads %s, context %d, %d rounds x %d calls per sample; median ms per forward, logits for all n rows\n",
                    threads > 0 ? std::to_string(threads).c_str() : "all", prefill, rounds, inner);
        const double min1 = *std::min_element(ms[1].begin(), ms[1].end());
        std::printf("%3s %10s %10s %10s %8s %10s %10s\n", "n", "ms", "min ms", "max ms", "ratio", "min ratio",
                    "ms/token");
        for (int n : ns) {
            const double med = percentile(ms[n], 50);
            const double mn = *std::min_element(ms[n].begin(), ms[n].end());
            std::vector<double> ratios;
            for (int r = 0; r < rounds; r++) ratios.push_back(ms[n][r] / ms[1][r]);
            std::printf("%3d %10.3f %10.3f %10.3f %8.2f %10.2f %10.3f\n", n, med, mn,
                        *std::max_element(ms[n].begin(), ms[n].end()), percentile(ratios, 50), mn / min1, med / n);
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
