// tests/fuzz/fuzz_bpe.cpp: arbitrary bytes through the byte-level BPE encoder and arbitrary ids
// through the decoders, on fixed tokenizers (the test suite's tokenizer.json files and its tiktoken
// file, and the seeds' sentencepiece model).
// Input: byte 0 picks the tokenizer and whether special tokens' text is matched; the rest is the
// text, and also, read as 16-bit ids, a token stream.
// Invariants: BPE encode then decode gives the text back, byte for byte (byte-level BPE is
// lossless, special tokens decode to their content); ids are in range; streamed decoding emits
// well-formed UTF-8 only; a streamed decode of an encoded valid UTF-8 text gives the text back.
#include <memory>
#include <vector>

#include "fuzz_util.h"
#include "tokenizer.h"

static const char* const kFiles[] = {"../bpe_smollm.json", "../bpe_llama3.json", "../bpe_gpt2_prefix.json",
                                     "../bpe_tiktoken.model", "tok.model"};
constexpr int kBpeFiles = 4;         // the first four are byte-level BPE
constexpr int kPrefixSpaceFile = 2;  // ByteLevel with add_prefix_space

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static std::vector<std::unique_ptr<Tokenizer>> toks = [] {
        std::vector<std::unique_ptr<Tokenizer>> v;
        for (const char* f : kFiles) v.push_back(std::make_unique<Tokenizer>(fuzz_data(f), f));
        return v;
    }();
    if (size < 1) return 0;
    const int which = data[0] % 5;
    const bool special = data[0] & 0x80;
    const Tokenizer& tok = *toks[size_t(which)];
    const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
    const int vocab = tok.vocab_size();

    const std::vector<int> ids = special ? tok.encode_special(text) : tok.encode(text, false, false);
    for (int id : ids) FUZZ_CHECK(id >= 0 && id < vocab, "id %d of %d", id, vocab);
    // The GPT-2 file's ByteLevel add_prefix_space puts a space before each run of text between
    // special tokens that lacks one, and decode keeps it, as in tokenizers. Checked without special
    // tokens (the text is one run); with them, only the ids and the UTF-8 of the stream are.
    const bool prefix_space = which == kPrefixSpaceFile;
    if (which < kBpeFiles && !(prefix_space && special)) {
        const std::string expected = prefix_space && !text.empty() && text[0] != ' ' ? " " + text : text;
        FUZZ_CHECK(tok.decode(ids) == expected, "encode then decode changed the text (%zu bytes)", text.size());
        const std::string streamed = fuzz_stream_decode(tok, ids);
        // A stream that opens with BOS leaves it out (a marker, not text; its content is in decode).
        const bool bos_first = !ids.empty() && ids[0] == tok.bos_id();
        const std::string unmarked = bos_first ? tok.decode(std::vector<int>(ids.begin() + 1, ids.end())) : expected;
        if (well_formed_utf8(text)) FUZZ_CHECK(streamed == unmarked, "streamed decode changed the text");
    }

    // The same bytes as a stream of arbitrary ids.
    std::vector<int> any;
    for (size_t i = 1; i + 1 < size; i += 2) any.push_back(int((data[i] | data[i + 1] << 8) % unsigned(vocab)));
    tok.decode(any);
    FUZZ_CHECK(well_formed_utf8(fuzz_stream_decode(tok, any)), "streamed decode emitted ill-formed UTF-8");
    return 0;
}
