// tests/fuzz/fuzz_serve.cpp: the server's request bodies, /v1/completions and /v1/chat/completions,
// through parse_api_request (the part of the server that reads what the network sends), and the
// answers written back. Input: byte 0 picks completions or chat, the rest is the body.
// Invariants: a refused body raises ApiError (the HTTP status is 4xx) and nothing else; an accepted
// one fits the context with its max_tokens and has ids in range; the JSON answers and SSE events
// built from it (with the body's bytes as the answer text) parse back as JSON.
#include <nlohmann/json.hpp>

#include "chat.h"
#include "fuzz_util.h"
#include "serve.h"
#include "tokenizer.h"

static bool parses(const std::string& s) { return nlohmann::json::accept(s); }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Tokenizer tok(fuzz_data("../bpe_smollm.json"), "bpe_smollm.json");
    static const ApiModel m = [] {
        ApiModel am;
        am.tok = &tok;
        am.style = {ChatFormat::ChatML, "Be brief."};
        am.end_id = chat_tokens(tok, am.style, "<|im_end|>", false).at(0);
        am.context = 64;
        am.name = "fuzz";
        return am;
    }();
    if (size < 1) return 0;
    const bool chat = data[0] & 1;
    const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
    ApiRequest a;
    try {
        a = parse_api_request(body, chat, m);
    } catch (const ApiError& e) {
        FUZZ_CHECK(e.status >= 400 && e.status < 500, "status %d for a bad body", e.status);
        FUZZ_CHECK(parses(error_json(e)), "the error answer is not JSON: %s", error_json(e).c_str());
        return 0;
    }
    const Request& r = a.req;
    FUZZ_CHECK(a.chat == chat, "chat flag");
    FUZZ_CHECK(!r.prompt.empty(), "an empty prompt accepted");
    FUZZ_CHECK(r.max_new_tokens >= 1 && r.prompt.size() + size_t(r.max_new_tokens) <= size_t(m.context),
               "%zu prompt tokens + %d past the context", r.prompt.size(), r.max_new_tokens);
    for (int id : r.prompt) FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "prompt id %d", id);
    FUZZ_CHECK(r.sampling.temperature >= 0 && r.sampling.temperature <= 2, "temperature %g",
               double(r.sampling.temperature));
    FUZZ_CHECK(r.sampling.top_p >= 0 && r.sampling.top_p <= 1, "top_p %g", double(r.sampling.top_p));
    FUZZ_CHECK(r.stop.size() <= 4, "%zu stop strings", r.stop.size());
    FUZZ_CHECK(!a.include_usage || a.stream, "include_usage without stream");

    // The answers, with arbitrary bytes as the text (a decoder's output is UTF-8, but a cut stop
    // string could leave a partial character: the writer must still produce JSON).
    Result res;
    res.text = body;
    res.prompt_tokens = int(r.prompt.size());
    res.completion_tokens = 1;
    res.finish_reason = "length";
    const std::string whole = completion_json(a, res, "cmpl-fuzz", 1, m.name);
    FUZZ_CHECK(parses(whole), "completion_json is not JSON");
    const std::string chunk = chunk_json(chat, "cmpl-fuzz", 1, m.name, body, "");
    FUZZ_CHECK(parses(chunk), "chunk_json is not JSON");
    const std::string event = sse_event(chunk);
    FUZZ_CHECK(event.rfind("data: ", 0) == 0 && event.size() >= 8 && event.substr(event.size() - 2) == "\n\n" &&
                   event.find('\n') == event.size() - 2,
               "an SSE event with a newline inside");
    FUZZ_CHECK(parses(usage_chunk_json(chat, "cmpl-fuzz", 1, m.name, res.prompt_tokens, 1, 0)), "usage chunk");
    return 0;
}
