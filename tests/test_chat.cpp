// Chat formats (chat.cpp) and a chat's KV cache reuse across turns (decode's `cached`).
#include <doctest/doctest.h>

#include "chat.h"
#include "common.h"
#include "decode.h"
#include "test_util.h"
#include "tokenizer.h"

namespace {

// A conversation laid out turn by turn the way the chat loop does: first user turn, answer,
// end-of-answer token and what follows it, second user turn.
std::string two_turns(const ChatStyle& s, const std::string& answer) {
    return s.user_turn("Hi there", true) + answer + s.end_of_answer() + s.after_answer() + s.user_turn("Bye", false);
}

}  // namespace

TEST_CASE("chat formats lay out a conversation as the models' own templates do") {
    // Expected texts: ChatML rendered by Jinja2 from SmolLM2's template (its GGUF metadata), Llama 3
    // from Meta's prompt format, Llama 2 from HF's template with <s>/</s> left out (they are the
    // BOS/EOS ids chat_tokens adds, not text).
    ChatStyle chatml{ChatFormat::ChatML, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"};
    CHECK(two_turns(chatml, "Hello!") ==
          "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
          "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
    ChatStyle llama3{ChatFormat::Llama3, "Be brief."};
    CHECK(two_turns(llama3, "Hello!") ==
          "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n");
    ChatStyle llama3_plain{ChatFormat::Llama3, ""};
    CHECK(llama3_plain.user_turn("Hi", true) ==
          "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n");
    ChatStyle llama2{ChatFormat::Llama2, "Be brief."};
    CHECK(llama2.user_turn("Hi there", true) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]");
    CHECK(llama2.user_turn("Bye", false) == "[INST] Bye [/INST]");
    CHECK(llama2.end_of_answer().empty());  // the model's EOS closes an answer
}

TEST_CASE("chat format detection from Jinja templates, and a template's default system message") {
    const std::string smollm2 =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
        "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
        "%}{{ '<|im_start|>assistant\n' }}{% endif %}";
    CHECK(detect_chat_format(smollm2) == ChatFormat::ChatML);
    CHECK(template_default_system(smollm2) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
    // The escaped form of the same literal.
    CHECK(template_default_system("{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}") == "Be kind.");
    // A template that splices a variable in has no default.
    CHECK(template_default_system("{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>' }}").empty());
    const std::string llama3 =
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}";
    CHECK(detect_chat_format(llama3) == ChatFormat::Llama3);
    CHECK(detect_chat_format("{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}") == ChatFormat::Llama2);
    CHECK_FALSE(detect_chat_format("{{ '### Instruction:' + message['content'] }}").has_value());
    CHECK(parse_chat_format("chatml") == ChatFormat::ChatML);
    CHECK_THROWS_WITH_AS(parse_chat_format("vicuna"), doctest::Contains("--chat-template vicuna"), Error);
}

TEST_CASE("a chat's second turn with the cached first turn equals the whole conversation from scratch") {
    // stories260K is no chat model, but the arithmetic is the same: turn 2 reuses turn 1's K/V
    // (decode's `cached`) and must produce exactly the tokens a fresh run over the history does.
    Model m(shared_model_bin("stories260K"), cpu_ops(0));
    Tokenizer tok(m.tokenizer_model, "stories260K");
    ChatStyle style{ChatFormat::Llama2, ""};
    SamplingParams greedy;
    greedy.temperature = 0;
    KVCache kv(m.cfg, m.cfg.max_seq_len);
    auto answer = [&](std::vector<int>& history, int cached, KVCache& cache) {
        Sampler s(greedy, 1);
        std::vector<int> out;
        decode(m, cache, history, 12, s, nullptr, 0, [&](int id) { out.push_back(id); return true; }, cached);
        return out;
    };
    std::vector<int> history = chat_tokens(tok, style, style.user_turn("Tom had a ball", true), true);
    std::vector<int> first = answer(history, 0, kv);
    REQUIRE(!first.empty());
    history.insert(history.end(), first.begin(), first.end());
    history.push_back(m.cfg.eos_id);
    const int cached = int(history.size()) - 2;  // the answer's last token was never fed back
    std::vector<int> turn = chat_tokens(tok, style, style.user_turn("Lily saw a cat", false), true);
    history.insert(history.end(), turn.begin(), turn.end());
    std::vector<int> reused = answer(history, cached, kv);
    KVCache fresh_kv(m.cfg, m.cfg.max_seq_len);
    std::vector<int> fresh = answer(history, 0, fresh_kv);
    CHECK(reused == fresh);
    CHECK(!reused.empty());
}
