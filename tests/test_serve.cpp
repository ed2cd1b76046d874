// tests/test_serve.cpp: the server's pieces without the network: the request parser (every field,
// every refusal names its field), the answer and SSE shapes, the scheduler's streamed text
// pieces and cancellation; /health before the model is loaded; and tests/test_serve.py, which
// drives real servers with the openai client.
#include <doctest/doctest.h>

#include <httplib.h>

#include <nlohmann/json.hpp>

#include "batch.h"
#include "serve.h"
#include "test_util.h"
#include "tokenizer.h"

using nlohmann::json;

namespace {

const Tokenizer& tok512_tokenizer() {
    static Tokenizer tok(read_file(models_dir() + "/tok512.model"), "tok512.model");
    return tok;
}

ApiModel api_model() {
    ApiModel m;
    m.tok = &tok512_tokenizer();
    m.style = {ChatFormat::ChatML, "Be brief."};
    m.end_id = 2;
    m.context = 256;  // room for a system message and a few turns of tok512's short tokens
    m.name = "tiny";
    return m;
}

// The refusal of `body`, or a default ApiError(0) when it parses.
ApiError refusal(const std::string& body, bool chat = false) {
    try {
        parse_api_request(body, chat, api_model());
    } catch (const ApiError& e) {
        return e;
    }
    return ApiError(0, "");
}

Model& stories260k_model() {
    static std::unique_ptr<Model> m;
    if (!m) m = std::make_unique<Model>(shared_model_bin("stories260K"), cpu_ops(0));
    return *m;
}

}  // namespace

TEST_CASE("serve: a completions body becomes a request with OpenAI's defaults") {
    const ApiModel m = api_model();
    ApiRequest a = parse_api_request(R"({"model": "tiny", "prompt": "Once upon a time"})", false, m);
    CHECK(!a.chat);
    CHECK(!a.stream);
    CHECK(a.req.prompt == m.tok->encode("Once upon a time", true, false));
    CHECK(a.req.max_new_tokens == 16);
    CHECK(a.req.sampling.temperature == 1.0f);
    CHECK(a.req.sampling.top_p == 1.0f);
    CHECK(a.req.sampling.top_k == 0);
    CHECK(!a.has_seed);
    CHECK(a.req.end_ids.empty());

    a = parse_api_request(R"({"prompt": ["Hi"], "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 7,
                             "seed": 42, "stop": ["a", "bc"], "stream": true, "stream_options": {"include_usage": true},
                             "n": 1, "user": "u", "presence_penalty": 0, "logprobs": null, "echo": false,
                             "ignore_eos": true})",
                          false, m);
    CHECK(a.req.prompt == m.tok->encode("Hi", true, false));
    CHECK(a.req.max_new_tokens == 5);
    CHECK(a.req.sampling.temperature == 0.0f);
    CHECK(a.req.sampling.top_p == 0.5f);
    CHECK(a.req.sampling.top_k == 7);
    CHECK(a.has_seed);
    CHECK(a.req.seed == 42);
    CHECK(a.req.stop == std::vector<std::string>{"a", "bc"});
    CHECK(a.stream);
    CHECK(a.include_usage);
    CHECK(a.req.ignore_eos);
    // Token ids as the prompt; the short default when the context is nearly full.
    a = parse_api_request(R"({"prompt": [1, 5, 9]})", false, m);
    CHECK(a.req.prompt == std::vector<int>{1, 5, 9});
    std::string long_ids = "[1";
    for (int i = 0; i < m.context - 9; i++) long_ids += ",7";
    a = parse_api_request(R"({"prompt": )" + long_ids + "]}", false, m);
    CHECK(a.req.max_new_tokens == 8);
}

TEST_CASE("serve: a chat body is laid out by the chat template, the end-of-turn token ends it") {
    const ApiModel m = api_model();
    ApiRequest a = parse_api_request(R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})", true, m);
    ChatStyle style = m.style;
    CHECK(a.chat);
    CHECK(a.req.prompt == chat_tokens(*m.tok, style, style.user_turn("Hi", true), true));
    CHECK(a.req.end_ids == std::vector<int>{2});
    CHECK(a.req.max_new_tokens == 3);
    // A system message replaces the default; earlier answers are closed as --interactive closes them.
    a = parse_api_request(R"({"messages": [{"role": "system", "content": "Rhyme."}, {"role": "user", "content": "A"},
                              {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
                              {"role": "user", "content": "C"}]})",
                          true, m);
    style.system = "Rhyme.";
    CHECK(a.req.prompt == conversation_tokens(*m.tok, style, 2, {{true, "A"}, {false, "B"}, {true, "C"}}));
    CHECK(a.req.max_new_tokens == m.context - int(a.req.prompt.size()));  // chat: the rest of the context
    // max_completion_tokens is chat's newer name for max_tokens.
    a = parse_api_request(R"({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4})", true, m);
    CHECK(a.req.max_new_tokens == 4);
}

TEST_CASE("serve: every refusal has its status and names its field") {
    struct Case {
        const char* body;
        bool chat;
        int status;
        const char* param;
        const char* code;
    };
    const Case cases[] = {
        {"{oops", false, 400, "", "invalid_json"},
        {"[1, 2]", false, 400, "", "invalid_json"},
        {R"({"prompt": "Hi", "max_tokens": "5"})", false, 400, "max_tokens", "invalid_type"},
        {R"({"prompt": "Hi", "max_tokens": 0})", false, 400, "max_tokens", "invalid_value"},
        {R"({"prompt": "Hi", "max_tokens": -7})", false, 400, "max_tokens", "invalid_value"},
        {R"({"prompt": "Hi", "max_tokens": 1e9})", false, 400, "max_tokens", "invalid_type"},
        {R"({"prompt": "Hi", "max_tokens": 100000000000})", false, 400, "max_tokens", "context_length_exceeded"},
        {R"({"prompt": "Hi", "max_tokens": 255})", false, 400, "max_tokens", "context_length_exceeded"},
        {R"({"prompt": ""})", false, 400, "prompt", "invalid_value"},
        {R"({"prompt": [""]})", false, 400, "prompt", "invalid_value"},
        {R"({"prompt": ["a", "b"]})", false, 400, "prompt", "unsupported_parameter"},
        {R"({"prompt": [1, 512]})", false, 400, "prompt", "invalid_value"},
        {R"({"prompt": {"a": 1}})", false, 400, "prompt", "invalid_type"},
        {R"({"max_tokens": 5})", false, 400, "prompt", "missing_field"},
        {R"({"prompt": "Hi", "model": "gpt-4"})", false, 404, "model", "model_not_found"},
        {R"({"prompt": "Hi", "model": 3})", false, 400, "model", "invalid_type"},
        {R"({"prompt": "Hi", "temperature": 2.5})", false, 400, "temperature", "invalid_value"},
        {R"({"prompt": "Hi", "temperature": "hot"})", false, 400, "temperature", "invalid_type"},
        {R"({"prompt": "Hi", "top_p": 0})", false, 400, "top_p", "invalid_value"},
        {R"({"prompt": "Hi", "top_k": -2})", false, 400, "top_k", "invalid_value"},
        {R"({"prompt": "Hi", "seed": 1.5})", false, 400, "seed", "invalid_type"},
        {R"({"prompt": "Hi", "stop": ["a", ""]})", false, 400, "stop", "invalid_value"},
        {R"({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]})", false, 400, "stop", "invalid_value"},
        {R"({"prompt": "Hi", "stop": 5})", false, 400, "stop", "invalid_type"},
        {R"({"prompt": "Hi", "n": 2})", false, 400, "n", "unsupported_parameter"},
        {R"({"prompt": "Hi", "best_of": 3})", false, 400, "best_of", "unsupported_parameter"},
        {R"({"prompt": "Hi", "logprobs": 5})", false, 400, "logprobs", "unsupported_parameter"},
        {R"({"prompt": "Hi", "echo": true})", false, 400, "echo", "unsupported_parameter"},
        {R"({"prompt": "Hi", "frequency_penalty": 1})", false, 400, "frequency_penalty", "unsupported_parameter"},
        {R"({"prompt": "Hi", "logit_bias": {"5": 10}})", false, 400, "logit_bias", "unsupported_parameter"},
        {R"({"prompt": "Hi", "stream": "yes"})", false, 400, "stream", "invalid_type"},
        {R"({"prompt": "Hi", "stream_options": {"include_usage": true}})", false, 400, "stream_options",
         "unsupported_parameter"},
        {R"({"prompt": "Hi", "stream": true, "stream_options": {"x": 1}})", false, 400, "stream_options.x",
         "unsupported_parameter"},
        {R"({"prompt": "Hi", "wat": 1})", false, 400, "wat", "unknown_parameter"},
        {R"({"prompt": "Hi"})", true, 400, "prompt", "unknown_parameter"},
        {R"({"max_tokens": 5})", true, 400, "messages", "missing_field"},
        {R"({"messages": []})", true, 400, "messages", "invalid_value"},
        {R"({"messages": "Hi"})", true, 400, "messages", "invalid_type"},
        {R"({"messages": [{"role": "user"}]})", true, 400, "messages[0].content", "missing_field"},
        {R"({"messages": [{"role": "robot", "content": "x"}]})", true, 400, "messages[0].role", "invalid_value"},
        {R"({"messages": [{"role": "user", "content": 5}]})", true, 400, "messages[0].content", "invalid_type"},
        {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", true, 400, "messages[0].content",
         "unsupported_parameter"},
        {R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})", true, 400,
         "messages[0].tool_calls", "unsupported_parameter"},
        {R"({"messages": [{"role": "assistant", "content": "x"}]})", true, 400, "messages", "invalid_value"},
        {R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})", true, 400,
         "messages", "invalid_value"},
        {R"({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})", true, 400,
         "messages[1].role", ""},
        {R"({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]})", true, 400, "tools",
         "unsupported_parameter"},
        {R"({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}})", true, 400,
         "response_format", "unsupported_parameter"},
    };
    for (const Case& c : cases) {
        CAPTURE(std::string(c.body));
        const ApiError e = refusal(c.body, c.chat);
        CHECK(e.status == c.status);
        CHECK(e.param == c.param);
        CHECK(e.code == c.code);
        // The shape OpenAI's clients read.
        const json j = json::parse(error_json(e));
        CHECK(j["error"]["message"] == std::string(e.what()));
        CHECK(j["error"]["type"] == e.type);
        CHECK((c.param[0] ? j["error"]["param"] == c.param : j["error"]["param"].is_null()));
    }
    // A prompt longer than the context says how long both are.
    std::string words;
    for (int i = 0; i < 300; i++) words += " story";
    const ApiError e = refusal(R"({"prompt": ")" + words + "\"}");
    CHECK(e.code == "context_length_exceeded");
    CHECK(has(e.what(), "context is 256 tokens"));
}

TEST_CASE("serve: answers, chunks and events have OpenAI's shapes") {
    Result r;
    r.text = "Hello \"you\"\n";
    r.prompt_tokens = 4;
    r.completion_tokens = 3;
    r.cached_tokens = 2;
    r.finish_reason = "eos";
    ApiRequest a;
    json j = json::parse(completion_json(a, r, "cmpl-1", 100, "tiny"));
    CHECK(j["object"] == "text_completion");
    CHECK(j["id"] == "cmpl-1");
    CHECK(j["created"] == 100);
    CHECK(j["model"] == "tiny");
    CHECK(j["choices"][0]["text"] == r.text);
    CHECK(j["choices"][0]["finish_reason"] == "stop");
    CHECK(j["usage"] == json{{"prompt_tokens", 4},
                             {"completion_tokens", 3},
                             {"total_tokens", 7},
                             {"prompt_tokens_details", {{"cached_tokens", 2}}}});
    a.chat = true;
    r.finish_reason = "context";
    j = json::parse(completion_json(a, r, "chatcmpl-1", 100, "tiny"));
    CHECK(j["object"] == "chat.completion");
    CHECK(j["choices"][0]["message"] == json{{"role", "assistant"}, {"content", r.text}});
    CHECK(j["choices"][0]["finish_reason"] == "length");
    CHECK(api_finish_reason("stop") == "stop");
    CHECK(api_finish_reason("length") == "length");

    j = json::parse(chunk_json(true, "c", 1, "tiny", "pi", ""));
    CHECK(j["object"] == "chat.completion.chunk");
    CHECK(j["choices"][0]["delta"] == json{{"content", "pi"}});
    CHECK(j["choices"][0]["finish_reason"].is_null());
    j = json::parse(chunk_json(true, "c", 1, "tiny", "", "length"));
    CHECK(j["choices"][0]["delta"] == json::object());
    CHECK(j["choices"][0]["finish_reason"] == "length");
    j = json::parse(chunk_json(false, "c", 1, "tiny", "pi", ""));
    CHECK(j["object"] == "text_completion");
    CHECK(j["choices"][0]["text"] == "pi");
    j = json::parse(role_chunk_json("c", 1, "tiny"));
    CHECK(j["choices"][0]["delta"]["role"] == "assistant");
    j = json::parse(usage_chunk_json(false, "c", 1, "tiny", 2, 5, 1));
    CHECK(j["choices"].empty());
    CHECK(j["usage"]["total_tokens"] == 7);
    CHECK(j["usage"]["prompt_tokens_details"]["cached_tokens"] == 1);
    // An event is one data line and a blank line; text with newlines stays on it (JSON escapes them),
    // and bytes that are not UTF-8 become U+FFFD rather than breaking the JSON.
    const std::string ev = sse_event(chunk_json(false, "c", 1, "tiny", "a\nb\n\n\xff", ""));
    CHECK(ev.rfind("data: {", 0) == 0);
    CHECK(ev.size() - 2 == ev.find("\n\n"));
    CHECK(json::parse(ev.substr(6))["choices"][0]["text"] == "a\nb\n\n\xEF\xBF\xBD");
    CHECK(sse_event("[DONE]") == "data: [DONE]\n\n");
}

TEST_CASE("serve: the scheduler's streamed pieces add up to the text, stop strings held back, and cancel frees blocks") {
    Model& m = stories260k_model();
    const Tokenizer& tok = tok512_tokenizer();
    KVCache kv(m.cfg, 4 * m.cfg.max_seq_len);
    std::map<std::string, Result> done;
    std::map<std::string, std::vector<std::string>> pieces;
    BatchRunner runner(m, kv, &tok, BatchOptions{}, [&](const Result& r) { done[r.id] = r; });
    runner.set_on_text([&](const std::string& id, const std::string& t) { pieces[id].push_back(t); });
    Request plain;
    plain.id = "plain";
    plain.prompt = tok.encode("Once upon a time", true, false);
    plain.max_new_tokens = 60;
    plain.sampling.temperature = 0;
    runner.add(plain);
    runner.run();
    const std::string text = done["plain"].text;
    REQUIRE(text.size() > 40);
    std::string joined;
    for (const std::string& p : pieces["plain"]) joined += p;
    CHECK(joined == text);
    CHECK(pieces["plain"].size() > 20);  // token by token, not all at the end

    // A stop string inside the text: the pieces never show any of it, and add up to the cut text.
    const std::string stop = text.substr(20, 6);
    Request cut = plain;
    cut.id = "cut";
    cut.stop = {stop, "zzzzzzzzzzzz"};
    runner.add(cut);
    runner.run();
    joined.clear();
    for (const std::string& p : pieces["cut"]) joined += p;
    CHECK(done["cut"].finish_reason == "stop");
    CHECK(joined == text.substr(0, text.find(stop)));

    // An end id ends the answer as EOS does, and is not in the text.
    Request ends = plain;
    ends.id = "ends";
    ends.end_ids = {done["plain"].tokens.at(5)};
    runner.add(ends);
    runner.run();
    CHECK(done["ends"].finish_reason == "eos");
    CHECK(done["ends"].tokens.size() <= 5);

    // Cancel: a running and a waiting request end at once with their blocks back.
    const int free_before = kv.available_blocks();  // free, or cached and idle
    Request a = plain, b = plain;
    a.id = "a";
    b.id = "b";
    a.max_new_tokens = b.max_new_tokens = 400;
    a.ignore_eos = b.ignore_eos = true;
    runner.add(a);
    runner.step();
    runner.step();
    runner.add(b);
    CHECK(runner.running() == 1);
    CHECK(runner.waiting() == 1);
    CHECK(kv.available_blocks() < free_before);
    CHECK(runner.cancel("b"));
    CHECK(runner.cancel("a"));
    CHECK(!runner.cancel("a"));
    CHECK(!runner.cancel("nobody"));
    CHECK(done["a"].finish_reason == "cancelled");
    CHECK(done["b"].finish_reason == "cancelled");
    CHECK(runner.running() == 0);
    CHECK(runner.waiting() == 0);
    CHECK(kv.available_blocks() == free_before);
    CHECK(kv.held_blocks() == 0);
    CHECK(!runner.step());
}

TEST_CASE("serve: before the model is loaded, /health and the completions say 503") {
    ServeOptions o;
    o.port = 0;
    ApiServer server(o);
    httplib::Client cl("127.0.0.1", server.port());
    auto h = cl.Get("/health");
    REQUIRE(h);
    CHECK(h->status == 503);
    CHECK(json::parse(h->body)["status"] == "loading");
    auto c = cl.Post("/v1/completions", R"({"prompt": "Hi"})", "application/json");
    REQUIRE(c);
    CHECK(c->status == 503);
    CHECK(json::parse(c->body)["error"]["code"] == "loading");
    CHECK(c->get_header_value("Retry-After") == "1");
    // A port already taken is refused by name.
    ServeOptions taken = o;
    taken.port = server.port();
    const std::string err = error_of([&] { ApiServer again(taken); });
    CHECK(has(err, "cannot listen on 127.0.0.1 port"));
}

TEST_CASE("generate --serve: the openai client against real servers (tests/test_serve.py)") {
    const std::string model = shared_model_bin("stories260K");
    CommandResult r = run_command("python3 tests/test_serve.py ./generate " + shell_quote(model));
    INFO(r.out);
    INFO(r.err);
    CHECK(r.rc == 0);
    CHECK(has(r.out, "all server checks passed"));
}
