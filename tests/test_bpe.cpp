// tests/test_bpe.cpp: byte-level BPE against ids from Hugging Face `tokenizers` and `tiktoken`
// (scripts/bpe_expected.py wrote them into tests/data), refusals, and the way through convert,
// model.bin and generate.
#include <doctest/doctest.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common.h"
#include "model.h"
#include "safetensors.h"
#include "test_util.h"
#include "tokenizer.h"

using json = nlohmann::json;

namespace {

const std::string kData = "tests/data/";

std::string ids_str(const std::vector<int>& ids) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); i++) s += (i ? ", " : "") + std::to_string(ids[i]);
    return s + "]";
}

std::string error_of(const std::string& bytes, const std::string& where = "the-source") {
    try {
        Tokenizer t(bytes, where);
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

// The ids the Python reference recorded for one case, through our public API.
std::vector<int> encode_case(const Tokenizer& tok, const json& c) {
    const std::string text = c["text"];
    if (!c["special"]) return tok.encode(text, c["bos"], false);
    std::vector<int> ids = tok.encode_special(text);
    if (c["bos"]) ids.insert(ids.begin(), tok.bos_id());
    return ids;
}

// Every case of one tokenizer: ids as recorded; decode gives the text back (and, through the
// streaming decoder, valid UTF-8 pieces adding up to the same text).
void check_cases(const Tokenizer& tok, const json& cases, const std::string& name) {
    REQUIRE(cases.is_array());
    REQUIRE(cases.size() > 0);
    for (const json& c : cases) {
        const std::string text = c["text"];
        const std::vector<int> want = c["ids"].get<std::vector<int>>(), got = encode_case(tok, c);
        CHECK_MESSAGE(got == want, name, ": '", text, "' special ", c["special"].dump(), " bos ", c["bos"].dump(),
                      ": got ", ids_str(got), " want ", ids_str(want));
        if (!c["round_trip"]) continue;  // add_prefix_space, a BOS, bytes the vocabulary lacks
        CHECK_MESSAGE(tok.decode(got) == text, name, ": decode of '", text, "'");
        // Streaming shows the same text, but for BOS at the start (a marker, not text).
        const bool bos_first = !got.empty() && got[0] == tok.bos_id();
        const std::string shown = bos_first ? tok.decode(std::vector<int>(got.begin() + 1, got.end())) : text;
        StreamDecoder dec(tok);
        std::string streamed;
        for (int id : got) streamed += dec.push(id);
        streamed += dec.flush();
        CHECK_MESSAGE(streamed == shown, name, ": streamed '", streamed, "' for '", text, "'");
    }
}

}  // namespace

TEST_CASE("bpe: ids equal Hugging Face tokenizers' for each pre-tokenizer (GPT-2, SmolLM2, Llama 3, ...)") {
    const json expected = json::parse(read_file(kData + "bpe_expected.json"));
    int variants = 0;
    for (const auto& [name, cases] : expected.items()) {
        if (name == "tiktoken") continue;
        const std::string path = kData + "bpe_" + name + ".json";
        Tokenizer tok(read_file(path), path);
        CHECK(tok.vocab_size() == 660);
        check_cases(tok, cases, name);
        variants++;
    }
    CHECK(variants == 6);
}

TEST_CASE("bpe: a Llama 3 tiktoken file gives tiktoken's ids, with Meta's special tokens") {
    const std::string path = kData + "bpe_tiktoken.model";
    Tokenizer tok(read_file(path), path);
    const int n = 656;  // base tokens: the trained vocabulary less its 4 special tokens
    CHECK(tok.vocab_size() == n + 256);
    CHECK(tok.bos_id() == n);      // <|begin_of_text|>
    CHECK(tok.eos_id() == n + 1);  // <|end_of_text|>
    CHECK(tok.encode_special("<|start_header_id|><|end_header_id|><|eot_id|>") ==
          std::vector<int>{n + 6, n + 7, n + 9});
    CHECK(tok.encode_special("<|reserved_special_token_245|>") == std::vector<int>{n + 255});
    CHECK(tok.decode({n + 9}) == "<|eot_id|>");
    const std::vector<int> ids = tok.encode("Once upon a time", true, false);  // Llama 3 starts with BOS
    REQUIRE(ids.size() > 1);
    CHECK(ids[0] == n);
    check_cases(tok, json::parse(read_file(kData + "bpe_expected.json"))["tiktoken"], "tiktoken");
}

TEST_CASE("bpe: BOS as tokenizer.json says: post_processor, else none; \"fastgen\" has the last word") {
    json j = json::parse(read_file(kData + "bpe_tiny.json"));  // no post-processor
    const int bos = 3;                                          // <|begin_of_text|>, a known BOS name
    Tokenizer plain(j.dump(), "tiny");
    CHECK(plain.bos_id() == bos);
    CHECK(plain.eos_id() == 0);  // <|endoftext|>
    const std::vector<int> text_ids = plain.encode("Once upon a time", false, false);
    CHECK(plain.encode("Once upon a time", true, false) == text_ids);  // no BOS by convention
    CHECK(plain.encode("Once upon a time", false, true).back() == 0);

    j["fastgen"] = {{"add_bos", true}, {"source", "test"}};
    Tokenizer with_bos(j.dump(), "tiny + fastgen");
    std::vector<int> want = text_ids;
    want.insert(want.begin(), bos);
    CHECK(with_bos.encode("Once upon a time", true, false) == want);

    // Llama 3's post-processor adds <|begin_of_text|>; fastgen.add_bos false turns that off.
    json l3 = json::parse(read_file(kData + "bpe_llama3.json"));
    CHECK(Tokenizer(l3.dump(), "llama3").encode("Once", true, false).front() == bos);
    l3["fastgen"] = {{"add_bos", false}};
    CHECK(Tokenizer(l3.dump(), "llama3").encode("Once", true, false).front() != bos);
    // BOS first in a stream is a marker, not text; anywhere else it shows as its content.
    Tokenizer tok(read_file(kData + "bpe_llama3.json"), "llama3");
    const std::vector<int> ids = tok.encode_special("<|begin_of_text|>Hi<|begin_of_text|>");
    StreamDecoder dec(tok);
    std::string out;
    for (int id : ids) out += dec.push(id);
    CHECK(out + dec.flush() == "Hi<|begin_of_text|>");
    CHECK(tok.decode(ids) == "<|begin_of_text|>Hi<|begin_of_text|>");
}

TEST_CASE("bpe: any bytes encode (invalid UTF-8 byte by byte) and decode back exactly") {
    for (const char* name : {"bpe_tiny.json", "bpe_llama3.json", "bpe_smollm.json", "bpe_tiktoken.model"}) {
        Tokenizer tok(read_file(kData + name), name);
        for (const std::string& text : {std::string("ab\xFF\xFE cd \xC3"), std::string("\xE2\x82 x \x80\x80 caf\xC3\xA9"),
                                        std::string("\xF0\x9F\x98 ok"),
                                        std::string(1, '\0') + "zero\xC0\xAF"}) {
            std::vector<int> ids = tok.encode(text, false, false);
            CHECK_MESSAGE(tok.decode(ids) == text, name);
        }
        // Long runs: one huge piece each (merging is O(n log n), the regex must not run out of stack).
        for (const std::string& text : {std::string(200000, ' '), std::string(200000, 'a'),
                                        std::string(100000, '!') + "x",
                                        std::string(50000, '\n') + "y" + std::string(50000, '\t')}) {
            std::vector<int> ids = tok.encode(text, false, false);
            CHECK_MESSAGE(tok.decode(ids) == text, name, " on a run of ", text.size(), " bytes");
        }
    }
}

TEST_CASE("bpe: a byte without a token is dropped, or becomes unk_token (one per run with fuse_unk)") {
    json j = json::parse(read_file(kData + "bpe_tiny.json"));
    j["model"]["vocab"].erase("\xC4\x80");  // byte 0x00 as GPT-2 writes it, U+0100
    const std::string text = std::string("x") + '\0' + '\0' + "y";
    Tokenizer dropping(j.dump(), "no 0x00");
    const std::vector<int> xy = dropping.encode("xy", false, false);
    REQUIRE(xy.size() == 2);  // no "xy" merge: the two bytes' own tokens
    CHECK(dropping.encode(text, false, false) == xy);
    j["model"]["unk_token"] = "<|endoftext|>";
    const int unk = 0;
    CHECK(Tokenizer(j.dump(), "unk").encode(text, false, false) == std::vector<int>{xy[0], unk, unk, xy[1]});
    j["model"]["fuse_unk"] = true;
    CHECK(Tokenizer(j.dump(), "fused unk").encode(text, false, false) == std::vector<int>{xy[0], unk, xy[1]});
}

TEST_CASE("bpe: the tokenizer kind is told by content; a bad one is refused naming the source") {
    CHECK(Tokenizer(read_file(models_dir() + "/tok512.model"), "tok512").encode("Once upon a time", false, false) ==
          std::vector<int>{403, 407, 261, 378});
    const std::string e = error_of("neither kind of tokenizer", "model.bin: tokenizer.model");
    CHECK_MESSAGE(has(e, "model.bin: tokenizer.model: not a sentencepiece model, a tokenizer.json or a tiktoken "
                         "file"), e);
}

TEST_CASE("bpe: malformed or unsupported tokenizer.json is refused, naming the field") {
    const json base = json::parse(read_file(kData + "bpe_tiny.json"));
    auto refused = [&](const std::function<void(json&)>& edit) {
        json j = base;
        edit(j);
        return error_of(j.dump());
    };
    auto check = [](const std::string& err, const std::string& part) {
        CHECK_MESSAGE(has(err, "the-source: "), err);
        CHECK_MESSAGE(has(err, part), err, " lacks: ", part);
    };
    check(error_of("{\"model\": {\"type\": \"BPE\", "), "not valid JSON");
    check(error_of("{\"version\": \"1.0\"}"), "no \"model\" object");
    check(refused([](json& j) { j["model"]["type"] = "WordPiece"; }), "model type 'WordPiece' is not supported");
    check(refused([](json& j) { j["model"].erase("type"); }), "\"model\" has no \"type\"");
    check(refused([](json& j) { j["model"]["byte_fallback"] = true; }), "byte_fallback");
    check(refused([](json& j) { j["model"]["merges"].push_back("zzz q"); }),
          "merges[400] 'zzz q': 'zzz' is not in the vocab");
    check(refused([](json& j) { j["model"]["merges"].push_back(json::array({"q", "zzz"})); }),
          "'zzz' is not in the vocab");
    check(refused([](json& j) { j["model"]["merges"].push_back("Q Q"); }), "the merged token 'QQ' is not in the vocab");
    check(refused([](json& j) { j["model"]["merges"].push_back("a b c"); }), "not two tokens separated by one space");
    check(refused([](json& j) { j["model"]["merges"].push_back(7); }), "merges[400] 7 is neither");
    check(refused([](json& j) { j["model"]["vocab"]["zzz"] = 5; }), "vocab: id 5 is given to");
    check(refused([](json& j) { j["model"]["vocab"]["zzz"] = -1; }), "token id -1 is not an integer");
    check(refused([](json& j) { j["model"]["unk_token"] = "zzz"; }), "model \"unk_token\" \"zzz\" is not a token");
    check(refused([](json& j) { j["normalizer"] = {{"type", "NFC"}}; }), "normalizer 'NFC' is not supported");
    check(refused([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }), "decoder 'WordPiece' is not supported");
    check(refused([](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; }),
          "pre_tokenizer 'Metaspace' is not supported");
    check(refused([](json& j) { j["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}}; }),
          "no ByteLevel step");
    auto sequence = [](const json& a, const json& b) { return json{{"type", "Sequence"}, {"pretokenizers", {a, b}}}; };
    check(refused([&](json& j) { j["pre_tokenizer"] = sequence(j["pre_tokenizer"], {{"type", "Digits"}}); }),
          "pre_tokenizer 'Digits' after ByteLevel is not supported");
    json split = {{"type", "Split"}, {"pattern", {{"Regex", "\\p{N}"}}}, {"behavior", "Removed"}, {"invert", false}};
    check(refused([&](json& j) { j["pre_tokenizer"] = sequence(split, j["pre_tokenizer"]); }),
          "Split behavior \"Removed\" is not supported");
    split["behavior"] = "Isolated";
    split["pattern"] = {{"Regex", "(unclosed"}};
    check(refused([&](json& j) { j["pre_tokenizer"] = sequence(split, j["pre_tokenizer"]); }),
          "pre-tokenizer regex '(unclosed'");
    check(refused([](json& j) { j["added_tokens"][0]["lstrip"] = true; }), "added token '<|endoftext|>': \"lstrip\"");
    check(refused([](json& j) { j["fastgen"] = {{"add_bos", "yes"}}; }), "\"add_bos\" must be true or false");
}

TEST_CASE("bpe: a malformed tiktoken file is refused, naming the line") {
    const std::string good = read_file(kData + "bpe_tiktoken.model");
    const size_t line3 = good.find('\n', good.find('\n') + 1) + 1;
    auto with_line3 = [&](const std::string& line) {
        return good.substr(0, line3) + line + good.substr(good.find('\n', line3));
    };
    auto check = [](const std::string& err, const std::string& part) {
        CHECK_MESSAGE(has(err, "the-source: "), err);
        CHECK_MESSAGE(has(err, part), err, " lacks: ", part);
    };
    check(error_of(with_line3("IQ= 2")), "line 3 'IQ= 2' is not \"base64(token bytes) rank\"");
    check(error_of(with_line3("IR== 2")), "line 3");  // stray bits before the padding
    check(error_of(with_line3("I*== 2")), "line 3");
    check(error_of(with_line3("Iw==")), "line 3");
    check(error_of(with_line3("Iw== -2")), "line 3");
    check(error_of(with_line3("Iw== 1")), "line 3: rank 1 appears twice");
    check(error_of(with_line3("Iw== 100000")), "rank 100000 is not below the number of lines, 656");
    check(error_of(with_line3("IQ== 2")), "line 3: the token bytes of rank 2 appear twice");  // "!" is line 1
    check(error_of(good.substr(0, line3) + "Iw== 2\n"), "no token for byte");                  // lines 4.. gone
}

TEST_CASE("bpe: SmolLM2's real vocabulary gives tokenizers' ids") {
    // The model.bin scripts/get_smollm2.sh converts from the GGUF, else the tokenizer.json that
    // scripts/bpe_expected.py builds from it; neither is in the repository.
    std::string bytes, source;
    const std::string bin = "models/smollm2-135m-instruct.bin", json_path = "/tmp/smol/bpe_smollm2_tokenizer.json";
    if (std::ifstream(bin).good()) {
        SafetensorsFile f(bin);
        const TensorView& t = f.get("tokenizer.json");
        bytes.assign(reinterpret_cast<const char*>(t.data), t.nbytes);
        source = bin;
    } else if (std::ifstream(json_path).good()) {
        bytes = read_file(json_path);
        source = json_path;
    } else {
        MESSAGE("skipped: neither ", bin, " (scripts/get_smollm2.sh) nor ", json_path, " (scripts/bpe_expected.py)");
        return;
    }
    Tokenizer tok(bytes, source);
    CHECK(tok.vocab_size() == 49152);
    CHECK(tok.encode("Hello", true, false) == tok.encode("Hello", false, false));  // SmolLM2 starts without BOS
    const json cases = json::parse(read_file(kData + "bpe_smollm2_expected.json"))["smollm2"];
    check_cases(tok, cases, "SmolLM2 (" + source + ")");
}

// ---------------------------------------------------------------------------------------------
// Through convert, model.bin and generate

namespace {

// A tiny Hugging Face folder (random weights, HF tensor names) with `tokenizer_json` and no
// tokenizer.model.
void write_hf_folder(const std::string& dir, int vocab, const std::string& tokenizer_json) {
    Config c = tiny_config(64, 128, 2, 4, 2, false);
    c.vocab_size = vocab;
    const TinyWeights tw = random_weights(c, 7);
    REQUIRE(run_command("mkdir -p " + shell_quote(dir)).rc == 0);
    json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_act", "silu"},
                {"hidden_size", c.dim}, {"intermediate_size", c.hidden_dim}, {"num_hidden_layers", c.n_layers},
                {"num_attention_heads", c.n_heads}, {"num_key_value_heads", c.n_kv_heads}, {"vocab_size", c.vocab_size},
                {"max_position_embeddings", c.max_seq_len}, {"rms_norm_eps", c.norm_eps}, {"rope_theta", c.rope_theta},
                {"tie_word_embeddings", false}, {"bos_token_id", 3}, {"eos_token_id", 0}, {"torch_dtype", "float32"}};
    write_bytes(dir + "/config.json", cfg.dump(2));
    write_bytes(dir + "/tokenizer.json", tokenizer_json);
    static const std::pair<const char*, const char*> kNames[] = {
        {"attention_norm.weight", "input_layernorm.weight"}, {"attention.wq.weight", "self_attn.q_proj.weight"},
        {"attention.wk.weight", "self_attn.k_proj.weight"},  {"attention.wv.weight", "self_attn.v_proj.weight"},
        {"attention.wo.weight", "self_attn.o_proj.weight"},  {"ffn_norm.weight", "post_attention_layernorm.weight"},
        {"feed_forward.w1.weight", "mlp.gate_proj.weight"},  {"feed_forward.w2.weight", "mlp.down_proj.weight"},
        {"feed_forward.w3.weight", "mlp.up_proj.weight"}};
    auto hf_name = [&](const std::string& ours) -> std::string {
        if (ours == "tok_embeddings.weight") return "model.embed_tokens.weight";
        if (ours == "norm.weight") return "model.norm.weight";
        if (ours == "output.weight") return "lm_head.weight";
        for (int l = 0; l < c.n_layers; l++)
            for (const auto& [a, b] : kNames)
                if (ours == layer_tensor(l, a)) return fmt("model.layers.%d.%s", l, b);
        FAIL("no HF name for ", ours);
        return "";
    };
    SafetensorsWriter w;
    for (const auto& [name, v] : tw.tensors)
        w.add_bytes(hf_name(name), DType::F32, tw.shape_of(name), v.data());
    w.write(dir + "/model.safetensors");
}

}  // namespace

TEST_CASE("bpe: a Hugging Face folder with tokenizer.json converts, loads and generates") {
    const std::string dir = temp_dir() + "/bpe-hf", out = temp_dir() + "/bpe-hf.bin";
    const std::string tj = read_file(kData + "bpe_llama3.json");
    write_hf_folder(dir, 672, tj);
    CommandResult q = run_command("./quantize -q --input " + shell_quote(dir) + " --output " + shell_quote(out));
    REQUIRE_MESSAGE(q.rc == 0, q.err);
    {
        SafetensorsFile f(out);
        CHECK(f.find("tokenizer.model") == nullptr);
        const TensorView* t = f.find("tokenizer.json");
        REQUIRE(t != nullptr);
        CHECK(std::string(reinterpret_cast<const char*>(t->data), t->nbytes) == tj);
    }
    Model m(out, cpu_ops(0));
    CHECK(m.tokenizer_tensor == "tokenizer.json");
    Tokenizer tok(m.tokenizer_model, out);
    const std::string text = "Once upon a time";
    CHECK(tok.encode(text, true, false) == Tokenizer(tj, "llama3").encode(text, true, false));

    // generate echoes the prompt through the BPE tokenizer (BOS invisible) and continues it.
    CommandResult g = run_command("./generate --device cpu --checkpoint " + shell_quote(out) +
                                  " --prompt 'Once upon a time' --max-new-tokens 4 --temperature 0");
    REQUIRE_MESSAGE(g.rc == 0, g.err);
    CHECK_MESSAGE(g.out.rfind("Once upon a time", 0) == 0, g.out);
}
