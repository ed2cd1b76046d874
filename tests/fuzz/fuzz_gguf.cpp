// tests/fuzz/fuzz_gguf.cpp: a GGUF file: the reader (gguf.cpp: metadata, tensor infos, offsets),
// what `llama` metadata means (config, sentencepiece and BPE tokenizers), then the converter over
// it (every --mode); whatever it writes must load (fuzz_convert_then_load).
#include "fuzz_util.h"
#include "gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    ConvertOptions o = fuzz_convert_options(data, size);
    o.input = fuzz_write("model.gguf", data, size);
    try {
        GgufFile f(o.input);
        for (const GgufTensor& t : f.tensors) FUZZ_CHECK(t.data + t.nbytes <= f.map.data + f.map.size, "%s", t.name.c_str());
        try {
            gguf_llama_config(f);
        } catch (const Error&) {
        }
        try {
            gguf_tokenizer_json(f);
        } catch (const Error&) {
        }
        try {
            gguf_sentencepiece_model(f);
        } catch (const Error&) {
        }
    } catch (const Error&) {
        return 0;
    }
    fuzz_convert_then_load(o);
    return 0;
}
