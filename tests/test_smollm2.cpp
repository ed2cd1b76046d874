// SmolLM2-135M-Instruct end to end, the demo model: GGUF (Q4_1 + Q8_0) -> model.bin -> byte-level
// BPE -> ChatML chat. Runs when the GGUF is present (scripts/get_smollm2.sh puts it in models/;
// FASTGEN_SMOLLM2_GGUF overrides); otherwise each test says it skipped.
#include <doctest/doctest.h>

#include <cstdlib>
#include <sstream>
#include <sys/stat.h>

#include "chat.h"
#include "convert.h"
#include "decode.h"
#include "test_util.h"
#include "tokenizer.h"

namespace {

std::string smollm2_gguf() {
    const char* env = std::getenv("FASTGEN_SMOLLM2_GGUF");
    std::string p = env ? env : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    struct stat st;
    return stat(p.c_str(), &st) == 0 ? p : "";
}

// The converted model.bin, made once per test run ("" when the GGUF is absent).
const std::string& smollm2_bin() {
    static std::string path;
    if (path.empty() && !smollm2_gguf().empty()) {
        ConvertOptions o;
        o.input = smollm2_gguf();
        o.output = temp_dir() + "/smollm2.bin";
        o.progress = false;
        convert_checkpoint(o);
        path = o.output;
    }
    return path;
}

bool skipped() {
    if (!smollm2_bin().empty()) return false;
    MESSAGE("skipped: no SmolLM2 GGUF (run scripts/get_smollm2.sh, or set FASTGEN_SMOLLM2_GGUF)");
    return true;
}

std::vector<int> parse_ids(const std::string& line) {
    std::vector<int> ids;
    std::stringstream ss(line);
    std::string item;
    while (std::getline(ss, item, ',')) ids.push_back(std::stoi(item));
    return ids;
}

}  // namespace

TEST_CASE("SmolLM2: greedy answer to a chat prompt equals the PyTorch reference on the same weights") {
    if (skipped()) return;
    Model m(smollm2_bin(), cpu_ops(0));
    Tokenizer tok(m.tokenizer_model, "smollm2");
    REQUIRE(detect_chat_format(m.chat_template) == ChatFormat::ChatML);
    ChatStyle style{ChatFormat::ChatML, template_default_system(m.chat_template)};
    std::vector<int> prompt = tok.encode_special(style.user_turn("What is the capital of France?", true));
    // <|im_start|> is one token (id 1), not its characters.
    CHECK(prompt.front() == 1);

    SamplingParams greedy;
    greedy.temperature = 0;
    Sampler s(greedy, 1);
    KVCache kv(m.cfg, 256);
    std::vector<int> ours;
    DecodeStats st = decode(m, kv, prompt, 24, s, nullptr, 0, [&](int id) { ours.push_back(id); return true; });
    if (st.generated > int(ours.size())) ours.push_back(m.cfg.eos_id);

    // scripts/reference.py: float64 PyTorch over the dequantized weights of the same model.bin, the
    // inputs of its int8/int4 matrices rounded as the CPU kernels round them.
    std::string ids;
    for (int t : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(t);
    CommandResult r = run_command("/usr/bin/python3 scripts/reference.py " + shell_quote(smollm2_bin()) +
                                  " --int16-activations --tokens " + ids + " --greedy 24 --stop-at-eos --threads 2");
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    std::vector<int> ref = parse_ids(r.out.substr(0, r.out.find('\n')));
    CHECK(ours == ref);
    std::string text = tok.decode(ours);
    MESSAGE("SmolLM2 says: " << text);
    CHECK(text.find("Paris") != std::string::npos);
}

TEST_CASE("SmolLM2: generate --interactive answers two turns, the second over the cached first") {
    if (skipped()) return;
    CommandResult r = run_command("printf 'What is the capital of France?\\nAnd of Germany?\\n' | ./generate --checkpoint " +
                                  shell_quote(smollm2_bin()) + " --interactive --temperature 0 --max-new-tokens 32");
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK_MESSAGE(r.out.find("Paris") != std::string::npos, r.out);
    CHECK_MESSAGE(r.out.find("Berlin") != std::string::npos, r.out);
    CHECK_MESSAGE(r.err.find("chat: chatml format") != std::string::npos, r.err);
    // The second turn prefills only its own tokens: the first turn's are reused from the cache.
    size_t second = r.err.find("[turn:", r.err.find("[turn:") + 1);
    REQUIRE(second != std::string::npos);
    CHECK_MESSAGE(r.err.find("(0 reused", second) == std::string::npos, r.err);
}
