// tests/fuzz/fuzz_llama2c.cpp: a llama2.c checkpoint (legacy header or version 1) through the
// converter (convert.cpp's read_llama2c, then every --mode), with the tokenizer the seeds were made
// with; whatever it writes must load (fuzz_convert_then_load).
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    ConvertOptions o = fuzz_convert_options(data, size);
    o.input = fuzz_write("model.ckpt", data, size);
    o.tokenizer = std::string(FUZZ_DATA_DIR) + "/tok.model";
    fuzz_convert_then_load(o);
    return 0;
}
