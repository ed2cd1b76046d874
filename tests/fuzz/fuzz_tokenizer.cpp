// tests/fuzz/fuzz_tokenizer.cpp: a tokenizer as model.bin embeds it, told apart by its content
// (tokenizer.cpp): a serialized sentencepiece ModelProto (libsentencepiece parses it), a Hugging
// Face tokenizer.json (bpe.cpp), or a Llama 3 tiktoken file. One it accepts must tokenize: ids in
// range, and every id's text decodes, alone and streamed.
#include <vector>

#include "fuzz_util.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string bytes(reinterpret_cast<const char*>(data), size);
    try {
        Tokenizer tok(bytes, "fuzz: tokenizer");
        const int vocab = tok.vocab_size();
        FUZZ_CHECK(vocab > 0, "an accepted tokenizer with %d tokens", vocab);
        for (const std::string text : {"Once upon a time, 42 cats\n\tsaid \xc3\xa9\xe2\x82\xac!", "<|im_start|>user", ""}) {
            for (int id : tok.encode(text, true, true)) FUZZ_CHECK(id >= 0 && id < vocab, "id %d of %d", id, vocab);
            for (int id : tok.encode_special(text)) FUZZ_CHECK(id >= 0 && id < vocab, "id %d of %d", id, vocab);
        }
        std::vector<int> ids;
        for (int id = 0; id < vocab && id < 4096; id++) ids.push_back(id);
        tok.decode(ids);
        FUZZ_CHECK(well_formed_utf8(fuzz_stream_decode(tok, ids)), "streamed text is not UTF-8");
    } catch (const Error&) {
    }
    return 0;
}
