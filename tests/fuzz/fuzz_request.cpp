// tests/fuzz/fuzz_request.cpp: one JSONL request line (generate --batch) through parse_request,
// with the seeds' sentencepiece tokenizer and a 64-token context. Invariants: a refused line raises
// Error; an accepted one has a prompt of 1 to 63 token ids, each in the vocabulary, and sane limits.
#include <cmath>

#include "batch.h"
#include "fuzz_util.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Tokenizer tok(fuzz_data("tok.model"), "tok.model");
    constexpr int kContext = 64;
    Request defaults;
    defaults.max_new_tokens = 8;
    const std::string line(reinterpret_cast<const char*>(data), size);
    Request r;
    try {
        r = parse_request(line, 1, tok, defaults, kContext);
    } catch (const Error&) {
        return 0;
    }
    FUZZ_CHECK(!r.prompt.empty() && r.prompt.size() < size_t(kContext), "prompt of %zu tokens", r.prompt.size());
    for (int id : r.prompt) FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "prompt id %d", id);
    FUZZ_CHECK(r.max_new_tokens >= 0, "max_new_tokens %d", r.max_new_tokens);
    FUZZ_CHECK(std::isfinite(r.sampling.temperature) && r.sampling.temperature >= 0, "temperature %g",
               double(r.sampling.temperature));
    // (0, 1] as parsed; a tiny top_p may round to 0 as a float, which the sampler reads as "the top token".
    FUZZ_CHECK(r.sampling.top_p >= 0 && r.sampling.top_p <= 1, "top_p %g", double(r.sampling.top_p));
    FUZZ_CHECK(r.sampling.top_k >= 0, "top_k %d", r.sampling.top_k);
    FUZZ_CHECK(!r.id.empty(), "an empty id");
    return 0;
}
