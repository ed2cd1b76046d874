// tests/test_tokenizer.cpp: sentencepiece encode/decode against known ids, and the streaming decoder.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "common.h"
#include "test_util.h"
#include "tokenizer.h"

static Tokenizer load_tokenizer(const std::string& name) {
    std::string path = models_dir() + "/" + name;
    return Tokenizer(read_file(path), path);
}

// Strict UTF-8 check (Unicode Table 3-7: no overlongs, no surrogates, nothing above U+10FFFF).
static bool valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        unsigned char b = s[i];
        int len = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3
                : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
        if (len == 0 || i + len > s.size()) return false;
        for (int k = 1; k < len; k++) {
            unsigned char c = s[i + k];
            unsigned char lo = 0x80, hi = 0xBF;
            if (k == 1) {
                if (b == 0xE0) lo = 0xA0;
                if (b == 0xED) hi = 0x9F;
                if (b == 0xF0) lo = 0x90;
                if (b == 0xF4) hi = 0x8F;
            }
            if (c < lo || c > hi) return false;
        }
        i += len;
    }
    return true;
}

// Feeds `ids` one at a time; checks each piece of output is valid UTF-8 and returns them joined.
static std::string stream(const Tokenizer& tok, const std::vector<int>& ids) {
    StreamDecoder dec(tok);
    std::string text;
    for (int id : ids) {
        std::string out = dec.push(id);
        CHECK_MESSAGE(valid_utf8(out), "push(", id, ") gave invalid UTF-8");
        text += out;
    }
    std::string rest = dec.flush();
    CHECK(valid_utf8(rest));
    return text + rest;
}

// The id of the byte-fallback piece <0xAB> for byte `b` (Llama-style vocabularies put them at 3..258).
static int byte_token(const Tokenizer& tok, unsigned char b) {
    int id = 3 + b;
    REQUIRE(tok.token_bytes(-1, id) == std::string(1, char(b)));
    return id;
}

static const char* const kTexts[] = {
    "Once upon a time",
    "café ☕ naïve",
    "你好，世界。",
    "héllo ☕ 世界",
    "an emoji 😀, \"quotes\" and a new\nline",
};

TEST_CASE("tokenizer: known ids, vocab and special tokens") {
    Tokenizer t512 = load_tokenizer("tok512.model");
    CHECK(t512.vocab_size() == 512);
    CHECK(t512.bos_id() == 1);
    CHECK(t512.eos_id() == 2);
    CHECK(t512.encode("Once upon a time", false, false) == std::vector<int>{403, 407, 261, 378});
    CHECK(t512.encode("Once upon a time", true, true) == std::vector<int>{1, 403, 407, 261, 378, 2});

    Tokenizer llama = load_tokenizer("tokenizer.model");
    CHECK(llama.vocab_size() == 32000);
    CHECK(llama.bos_id() == 1);
    CHECK(llama.eos_id() == 2);
    CHECK(llama.encode("Once upon a time", false, false) == std::vector<int>{9038, 2501, 263, 931});
}

TEST_CASE("tokenizer: decode(encode(s)) == s, and streaming gives the same text") {
    for (std::string model : {"tok512.model", "tokenizer.model"}) {
        Tokenizer tok = load_tokenizer(model);
        for (std::string text : kTexts) {
            CAPTURE(model);
            CAPTURE(text);
            std::vector<int> ids = tok.encode(text, true, false);
            CHECK(tok.decode(ids) == text);
            CHECK(stream(tok, ids) == text);
            CHECK(stream(tok, tok.encode(text, false, true)) == text);
        }
    }
}

TEST_CASE("tokenizer: tok512 falls back to bytes for characters outside its vocabulary") {
    Tokenizer tok = load_tokenizer("tok512.model");
    std::vector<int> ids = tok.encode("世界", false, false);
    bool has_byte = false;
    for (int id : ids) has_byte |= id >= 3 && id < 3 + 256;
    CHECK(has_byte);
    CHECK(tok.decode(ids) == "世界");
}

TEST_CASE("tokenizer: token_bytes strips the dummy-prefix space only at the start") {
    Tokenizer tok = load_tokenizer("tok512.model");
    std::vector<int> ids = tok.encode("Once upon", true, false);  // [BOS, "▁Once", "▁upon"]
    REQUIRE(ids.size() == 3);
    CHECK(tok.token_bytes(ids[0], ids[1]) == "Once");
    CHECK(tok.token_bytes(-1, ids[1]) == "Once");
    CHECK(tok.token_bytes(ids[1], ids[2]) == " upon");
    CHECK(tok.token_bytes(ids[2], ids[1]) == " Once");
    CHECK(tok.token_bytes(-1, tok.bos_id()).empty());
    CHECK(tok.token_bytes(5, tok.eos_id()).empty());
    CHECK(tok.token_bytes(-1, 512).empty());  // a padded model vocabulary: no piece, no text
    CHECK_THROWS_AS(tok.token_bytes(-1, -3), Error);

    StreamDecoder dec(tok);
    CHECK(dec.push(ids[0]).empty());
    CHECK(dec.push(ids[1]) == "Once");
    CHECK(dec.push(ids[2]) == " upon");
    CHECK(dec.flush().empty());
}

TEST_CASE("tokenizer: StreamDecoder holds partial characters and replaces broken ones") {
    Tokenizer tok = load_tokenizer("tok512.model");
    const std::string fffd = "\xEF\xBF\xBD";
    int e4 = byte_token(tok, 0xE4), b8 = byte_token(tok, 0xB8), ad = byte_token(tok, 0xAD);
    int x = tok.encode("x", false, false).back();  // "▁x" or "x"; either way ends with 'x'

    StreamDecoder dec(tok);  // 中 = E4 B8 AD, fed a byte at a time
    CHECK(dec.push(e4).empty());
    CHECK(dec.push(b8).empty());
    CHECK(dec.push(ad) == "中");

    CHECK(dec.push(b8) == fffd);  // a stray continuation byte cannot wait for anything
    CHECK(dec.push(e4).empty());
    CHECK(dec.push(b8).empty());
    std::string broken = dec.push(x);  // E4 B8 then a non-continuation byte: one U+FFFD, then x
    CHECK(broken.substr(0, 3) == fffd);
    CHECK(broken.back() == 'x');

    CHECK(dec.push(e4).empty());
    CHECK(dec.flush() == fffd);  // end of stream: what is held is incomplete
    CHECK(dec.flush().empty());
}

TEST_CASE("tokenizer: bytes that are not a model throw an Error naming the source") {
    try {
        Tokenizer tok("not a model", "model.bin: tokenizer.model");
        FAIL("no error thrown");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("model.bin: tokenizer.model") != std::string::npos);
    }
}

TEST_CASE("a sentencepiece model that libsentencepiece throws on is refused with Error, naming it") {
    // Found by fuzz_tokenizer (tests/data/fuzz/tokenizer/regression-empty-piece): a ModelProto with
    // an empty piece made darts_clone throw its own exception through LoadFromSerializedProto.
    const std::string bytes = read_file("tests/data/fuzz/tokenizer/regression-empty-piece");
    CHECK_THROWS_WITH_AS(Tokenizer(bytes, "bad.model"), doctest::Contains("bad.model: not a usable sentencepiece model"),
                         Error);
}
