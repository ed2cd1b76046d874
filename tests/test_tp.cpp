// tests/test_tp.cpp: tensor parallelism over MPI on CPU ranks. The "tp worker" case runs inside
// `mpirun -np N build/run_tests`: every rank compares its sharded forward with the whole model in
// the same process. The parent case launches it for 2, 3 and 4 ranks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>

#include "common.h"
#include "test_util.h"
#include "tp.h"

namespace {

double max_rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < a.size(); i++) {
        diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(double(b[i])));
    }
    return diff / scale;
}

// Logits at every position, prefilled in one batch, then one more decode step.
std::vector<float> all_logits(Model& m, const std::vector<int>& tokens) {
    const int n = int(tokens.size()), V = m.cfg.vocab_size;
    KVCache kv(m.cfg, n + 1);
    REQUIRE(kv.reserve(0, n + 1));
    std::vector<BatchToken> batch;
    std::vector<int> rows;
    for (int i = 0; i < n - 1; i++) {
        batch.push_back({0, i, tokens[size_t(i)]});
        rows.push_back(i);
    }
    std::vector<float> logits(size_t(n) * V);
    m.forward(kv, batch, rows, logits.data());
    m.forward(kv, {{0, n - 1, tokens.back()}}, {0}, logits.data() + size_t(n - 1) * V);
    return logits;
}

std::string mpirun(int ranks) {
    return "OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np " + std::to_string(ranks) +
           " build/run_tests -tc='tp worker*' --no-skip --no-colors";
}

}  // namespace

TEST_CASE("tp worker: sharded forward equals the whole model" * doctest::skip(!launched_by_mpirun())) {
    Comm& world = mpi_world();
    struct Case { const char* what; Config cfg; DType dtype; };
    Case cases[] = {
        {"GQA 8/4, tied, hidden 172", tiny_config(64, 172, 2, 8, 4, true), DType::F32},
        {"MHA 4/4, untied", tiny_config(48, 128, 2, 4, 4, false), DType::F32},
        {"bf16, GQA 8/2", tiny_config(64, 184, 2, 8, 2, false), DType::BF16},
    };
    int idx = 0;
    for (const Case& c : cases) {
        CAPTURE(c.what);
        CAPTURE(world.size());
        // Every rank writes the same deterministic model into its own temp dir.
        std::string path = temp_dir() + "/tp" + std::to_string(idx++) + ".bin";
        write_model_bin(random_weights(c.cfg, 40 + unsigned(idx)), path, c.dtype);
        bool divides = c.cfg.n_heads % world.size() == 0 && c.cfg.n_kv_heads % world.size() == 0 &&
                       c.cfg.hidden_dim % world.size() == 0;
        if (!divides) {
            const std::string expect = "not divisible by " + std::to_string(world.size()) + " tensor-parallel ranks";
            CHECK_THROWS_WITH_AS(Model(path, cpu_ops(1), &world), doctest::Contains(expect.c_str()), Error);
            continue;
        }
        Model whole(path, cpu_ops(1)), shard(path, cpu_ops(1), &world);
        CHECK(shard.cfg.n_heads == c.cfg.n_heads / world.size());
        CHECK(shard.weight_bytes_per_token() < whole.weight_bytes_per_token());
        std::vector<int> tokens = {1, 7, 99, 300, 5, 42, 17, 256, 511, 3, 8, 64, 128, 77, 9, 1, 2, 300, 12, 19};
        double err = max_rel_error(all_logits(shard, tokens), all_logits(whole, tokens));
        CHECK(err < 1e-5);  // only the summation order differs
    }
}

TEST_CASE("tensor parallel over MPI: 2, 3 and 4 ranks") {
    if (launched_by_mpirun()) return;  // the worker runs; this launcher does not recurse
    if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
        MESSAGE("skipped: mpirun not found (bash scripts/setup.sh installs Open MPI)");
        return;
    }
    for (int ranks : {2, 3, 4}) {
        CAPTURE(ranks);
        std::string log = temp_dir() + "/tp-" + std::to_string(ranks) + ".log";
        int status = std::system((mpirun(ranks) + " >" + log + " 2>&1").c_str());
        std::string out = read_file(log);
        CHECK_MESSAGE(status == 0, out);
        // Each rank prints doctest's summary: the worker must have run its checks, all passing.
        CHECK_MESSAGE(out.find("1 passed | 0 failed") != std::string::npos, out);
    }
}
