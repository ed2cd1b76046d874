// tests/fuzz/fuzz_model_bin.cpp: model.bin as generate loads it: the safetensors header and
// tensor table (safetensors.cpp), the config and every tensor's name, dtype and shape (model.cpp),
// the embedded tokenizer. A file the loader accepts must also run: one forward step of its first
// token, as generate's first decode step does.
#include <vector>

#include "fuzz_util.h"
#include "kv_cache.h"
#include "model.h"
#include "ops.h"
#include "safetensors.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz_write("model.bin", data, size);
    try {
        SafetensorsFile container(path);  // the container alone, as the converters read it
    } catch (const Error&) {
        return 0;
    }
    try {
        Model m(path, cpu_ops(1));
        Tokenizer tok(m.tokenizer_model, path + ": " + m.tokenizer_tensor);
        if (tok.vocab_size() > m.cfg.vocab_size) return 0;  // generate refuses it (Error)
        KVCache kv(m.cfg, 2);
        FUZZ_CHECK(kv.reserve(0, 2), "a 2-token cache must hold 2 positions");
        std::vector<float> logits(size_t(m.cfg.vocab_size));
        const int token = tok.bos_id() >= 0 ? tok.bos_id() : 0;
        m.forward(kv, {{0, 0, token}}, {0}, logits.data());
        m.forward(kv, {{0, 1, m.cfg.vocab_size - 1}}, {0}, logits.data());
    } catch (const Error&) {
    }
    return 0;
}
