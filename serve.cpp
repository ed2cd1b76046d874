// serve.cpp: the OpenAI-compatible server: request bodies in, answers and server-sent events out
// (first half, no HTTP in it), then the HTTP side on cpp-httplib and the scheduler thread that
// owns the BatchRunner (second half).
#include "serve.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <condition_variable>
#include <csignal>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "model.h"
#include "tokenizer.h"
#include "tp.h"

using nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

// Invalid UTF-8 cannot go into JSON: the model's bytes may end mid-character (U+FFFD instead).
std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

std::string quoted(const json& v) {
    std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
    return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

[[noreturn]] void bad_type(const std::string& key, const char* expected, const json& v) {
    throw ApiError(400, fmt("'%s' must be %s, got %s", key.c_str(), expected, quoted(v).c_str()), key, "invalid_type");
}
[[noreturn]] void bad_value(const std::string& key, const char* expected, const json& v) {
    throw ApiError(400, fmt("'%s' must be %s, got %s", key.c_str(), expected, quoted(v).c_str()), key, "invalid_value");
}
[[noreturn]] void unsupported(const std::string& key, const char* what) {
    throw ApiError(400, fmt("'%s' is not supported: %s", key.c_str(), what), key, "unsupported_parameter");
}

// A message's content: a string, or an array of {"type": "text", "text": ...} parts.
std::string message_text(const json& content, const std::string& where) {
    if (content.is_string()) return content.get<std::string>();
    if (!content.is_array()) bad_type(where, "a string or an array of text parts", content);
    std::string text;
    for (const json& part : content) {
        if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
            !part["text"].is_string())
            throw ApiError(400, fmt("%s: only text parts ({\"type\": \"text\", \"text\": ...}) are supported, got %s",
                                    where.c_str(), quoted(part).c_str()),
                           where, "unsupported_parameter");
        text += part["text"].get<std::string>();
    }
    return text;
}

// messages -> the conversation's tokens, a system message first taking the template's place.
std::vector<int> chat_prompt(const json& messages, const ApiModel& m) {
    if (!messages.is_array()) bad_type("messages", "an array of messages", messages);
    if (messages.empty()) bad_value("messages", "a non-empty array", messages);
    ChatStyle style = m.style;
    std::vector<ChatTurn> turns;
    for (size_t i = 0; i < messages.size(); i++) {
        const json& msg = messages[i];
        const std::string where = fmt("messages[%zu]", i);
        if (!msg.is_object()) bad_type(where, "an object with role and content", msg);
        std::string role;
        std::string text;
        bool has_content = false;
        for (auto& [key, v] : msg.items()) {
            const std::string field = where + "." + key;
            if (key == "role") {
                if (!v.is_string()) bad_type(field, "a string", v);
                role = v.get<std::string>();
            } else if (key == "content") {
                text = message_text(v, field);
                has_content = true;
            } else if (key == "name") {
                if (!v.is_string()) bad_type(field, "a string", v);
            } else {
                unsupported(field, "messages have a role, content and optionally a name");
            }
        }
        if (!has_content) throw ApiError(400, fmt("%s has no content", where.c_str()), where + ".content", "missing_field");
        if (role == "system" || role == "developer") {
            if (i != 0) throw ApiError(400, fmt("%s: a system message must come first", where.c_str()), where + ".role");
            style.system = text;
        } else if (role == "user" || role == "assistant") {
            turns.push_back({role == "user", text});
        } else {
            throw ApiError(400, fmt("%s.role must be system, user or assistant, got \"%s\"", where.c_str(), role.c_str()),
                           where + ".role", "invalid_value");
        }
    }
    try {
        return conversation_tokens(*m.tok, style, m.end_id, turns);
    } catch (const ApiError&) {
        throw;
    } catch (const Error& e) {
        throw ApiError(400, fmt("messages: %s", e.what()), "messages", "invalid_value");
    }
}

}  // namespace

std::string error_json(const ApiError& e) {
    ojson err = {{"message", e.what()},
                 {"type", e.type},
                 {"param", e.param.empty() ? ojson(nullptr) : ojson(e.param)},
                 {"code", e.code.empty() ? ojson(nullptr) : ojson(e.code)}};
    return dump(ojson{{"error", err}});
}

ApiRequest parse_api_request(const std::string& body, bool chat, const ApiModel& m) {
    json j;
    try {
        j = json::parse(body, JsonDepthLimit{});
    } catch (const json::exception& e) {
        throw ApiError(400, fmt("the body is not valid JSON (%s)", e.what()), "", "invalid_json");
    } catch (const Error& e) {
        throw ApiError(400, fmt("the body is not valid JSON (%s)", e.what()), "", "invalid_json");
    }
    if (!j.is_object()) throw ApiError(400, "the body must be a JSON object", "", "invalid_json");
    ApiRequest a;
    a.chat = chat;
    Request& r = a.req;
    r.sampling = SamplingParams{1.0f, 0, 1.0f};  // OpenAI's defaults: temperature 1, every token
    long long max_tokens = -1;                    // -1: not given
    bool has_prompt = false;
    const json* stream_options = nullptr;
    // Not a structured binding: C++17 lets no lambda capture one (GCC accepts it, clang does not).
    for (auto& item : j.items()) {
        const std::string& key = item.key();
        auto& v = item.value();
        const bool is_null = v.is_null();
        auto integer = [&](long long lo, long long hi, const char* range) {
            if (!v.is_number_integer()) bad_type(key, "an integer", v);
            const long long x = v.is_number_unsigned() && v.get<unsigned long long>() > (1ull << 62)
                                    ? (1ll << 62) : v.get<long long>();
            if (x < lo || x > hi) bad_value(key, range, v);
            return x;
        };
        auto number = [&](double lo, double hi, bool open_lo, const char* range) {
            if (!v.is_number()) bad_type(key, "a number", v);
            const double x = v.get<double>();
            if (!(open_lo ? x > lo : x >= lo) || !(x <= hi)) bad_value(key, range, v);
            return x;
        };
        if (key == "model") {
            if (!v.is_string()) bad_type(key, "a string", v);
            if (v.get<std::string>() != m.name)
                throw ApiError(404, fmt("the model '%s' does not exist; this server serves '%s'",
                                        v.get<std::string>().c_str(), m.name.c_str()),
                               "model", "model_not_found");
        } else if (key == "prompt" && !chat) {
            // A string, a one-string array (what clients send for one prompt), or token ids.
            if (v.is_array() && v.size() == 1 && v[0].is_string()) {
                r.prompt = m.tok->encode(v[0].get<std::string>(), true, false);
                if (v[0].get<std::string>().empty()) bad_value(key, "a non-empty string", v);
            } else if (v.is_string()) {
                if (v.get<std::string>().empty()) bad_value(key, "a non-empty string", v);
                r.prompt = m.tok->encode(v.get<std::string>(), true, false);
            } else if (v.is_array() && !v.empty() && v[0].is_number_integer()) {
                for (const json& id : v) {
                    if (!id.is_number_integer() || id.get<long long>() < 0 || id.get<long long>() >= m.tok->vocab_size())
                        bad_value(key, fmt("token ids in [0, %d)", m.tok->vocab_size()).c_str(), id);
                    r.prompt.push_back(id.get<int>());
                }
            } else if (v.is_array() && v.size() > 1 && v[0].is_string()) {
                throw ApiError(400, "one prompt per request: send the others as requests of their own", key,
                               "unsupported_parameter");
            } else {
                bad_type(key, "a string, or an array of token ids", v);
            }
            has_prompt = true;
        } else if (key == "messages" && chat) {
            r.prompt = chat_prompt(v, m);
            has_prompt = true;
        } else if (key == "max_tokens" || (chat && key == "max_completion_tokens")) {
            if (!is_null) max_tokens = integer(1, 1ll << 62, "an integer >= 1");
        } else if (key == "temperature") {
            if (!is_null) r.sampling.temperature = float(number(0, 2, false, "a number in [0, 2]"));
        } else if (key == "top_p") {
            if (!is_null) r.sampling.top_p = float(number(0, 1, true, "a number in (0, 1]"));
        } else if (key == "top_k") {  // not OpenAI's, but what vLLM and llama.cpp's server accept
            if (!is_null) r.sampling.top_k = std::max(0, int(integer(-1, 1 << 30, "-1 or 0 (every token), or >= 1")));
        } else if (key == "seed") {
            if (!is_null) {
                if (!v.is_number_integer()) bad_type(key, "an integer", v);
                r.seed = v.is_number_unsigned() ? v.get<uint64_t>() : uint64_t(v.get<long long>());
                a.has_seed = true;
            }
        } else if (key == "stop") {
            if (v.is_string()) {
                r.stop = {v.get<std::string>()};
            } else if (v.is_array()) {
                if (v.size() > 4) bad_value(key, "at most 4 strings", v);
                for (const json& s : v) {
                    if (!s.is_string()) bad_type(key, "a string or an array of strings", v);
                    r.stop.push_back(s.get<std::string>());
                }
            } else if (!is_null) {
                bad_type(key, "a string or an array of strings", v);
            }
            for (const std::string& s : r.stop)
                if (s.empty()) bad_value(key, "non-empty strings", v);
        } else if (key == "stream") {
            if (!is_null && !v.is_boolean()) bad_type(key, "true or false", v);
            a.stream = v.is_boolean() && v.get<bool>();
        } else if (key == "stream_options") {
            if (!is_null) stream_options = &v;
        } else if (key == "n" || key == "best_of") {
            if (!is_null && integer(1, 1 << 30, "an integer >= 1") != 1)
                unsupported(key, "one choice per request (n = 1); send the request again for more");
        } else if (key == "ignore_eos") {  // vLLM's and llama.cpp's, for benchmarks of fixed lengths
            if (!v.is_boolean()) bad_type(key, "true or false", v);
            r.ignore_eos = v.get<bool>();
        } else if (key == "user") {
            if (!is_null && !v.is_string()) bad_type(key, "a string", v);
        } else if (key == "presence_penalty" || key == "frequency_penalty") {
            if (!is_null && number(-2, 2, false, "a number in [-2, 2]") != 0) unsupported(key, "no penalties are applied");
        } else if (key == "logit_bias") {
            if (!is_null && !(v.is_object() && v.empty())) unsupported(key, "logits are not biased");
        } else if (key == "logprobs" || key == "top_logprobs") {
            if (!is_null && !(v.is_boolean() && !v.get<bool>()) && !(v.is_number_integer() && v.get<long long>() == 0))
                unsupported(key, "log probabilities are not returned");
        } else if (key == "echo" && !chat) {
            if (!is_null && !(v.is_boolean() && !v.get<bool>())) unsupported(key, "the prompt is not echoed");
        } else if (key == "suffix" && !chat) {
            if (!is_null && !(v.is_string() && v.get<std::string>().empty())) unsupported(key, "no insertion mode");
        } else if (chat && key == "response_format") {
            if (!is_null && !(v.is_object() && v.size() == 1 && v.value("type", json()) == "text"))
                unsupported(key, "only {\"type\": \"text\"}");
        } else if (chat && (key == "tools" || key == "functions")) {
            if (!is_null && !(v.is_array() && v.empty())) unsupported(key, "no tool calling");
        } else if (chat && (key == "tool_choice" || key == "function_call" || key == "parallel_tool_calls")) {
            if (!is_null && v != "none" && v != false) unsupported(key, "no tool calling");
        } else {
            throw ApiError(400, fmt("unrecognized request argument '%s'", key.c_str()), key, "unknown_parameter");
        }
    }
    if (!has_prompt) {
        const char* field = chat ? "messages" : "prompt";
        throw ApiError(400, fmt("'%s' is required", field), field, "missing_field");
    }
    if (r.prompt.empty()) throw ApiError(400, "the prompt is empty", chat ? "messages" : "prompt", "invalid_value");
    if (stream_options) {
        const json& so = *stream_options;
        if (!a.stream) unsupported("stream_options", "only with stream: true");
        if (!so.is_object()) bad_type("stream_options", "an object", so);
        for (auto& [key, v] : so.items()) {
            if (key != "include_usage") unsupported("stream_options." + key, "only include_usage");
            if (!v.is_boolean()) bad_type("stream_options.include_usage", "true or false", v);
            a.include_usage = v.get<bool>();
        }
    }
    const long long n = (long long)r.prompt.size();
    if (n >= m.context)
        throw ApiError(400, fmt("this model's context is %d tokens, and the prompt alone is %lld", m.context, n),
                       chat ? "messages" : "prompt", "context_length_exceeded");
    if (max_tokens < 0) max_tokens = chat ? m.context - n : std::min<long long>(16, m.context - n);
    if (n + max_tokens > m.context)
        throw ApiError(400, fmt("this model's context is %d tokens, but %lld were asked for (%lld in the prompt, %lld "
                                "for the completion); lower max_tokens",
                                m.context, n + max_tokens, n, max_tokens),
                       "max_tokens", "context_length_exceeded");
    r.max_new_tokens = int(max_tokens);
    if (chat && m.end_id >= 0) r.end_ids = {m.end_id};
    return a;
}

std::string api_finish_reason(const std::string& reason) {
    return reason == "length" || reason == "context" ? "length" : "stop";
}

namespace {
// OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens found in the prefix cache.
ojson usage(int prompt_tokens, int completion_tokens, int cached_tokens) {
    return {{"prompt_tokens", prompt_tokens},
            {"completion_tokens", completion_tokens},
            {"total_tokens", prompt_tokens + completion_tokens},
            {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}
ojson head(bool chat, bool chunk, const std::string& id, long created, const std::string& model) {
    return {{"id", id},
            {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
            {"created", created},
            {"model", model}};
}
}  // namespace

std::string completion_json(const ApiRequest& a, const Result& r, const std::string& id, long created,
                            const std::string& model) {
    ojson j = head(a.chat, false, id, created, model);
    ojson choice = a.chat ? ojson{{"index", 0},
                                  {"message", {{"role", "assistant"}, {"content", r.text}}},
                                  {"logprobs", nullptr},
                                  {"finish_reason", api_finish_reason(r.finish_reason)}}
                          : ojson{{"text", r.text},
                                  {"index", 0},
                                  {"logprobs", nullptr},
                                  {"finish_reason", api_finish_reason(r.finish_reason)}};
    j["choices"] = ojson::array({choice});
    j["usage"] = usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens);
    return dump(j);
}

std::string chunk_json(bool chat, const std::string& id, long created, const std::string& model,
                       const std::string& text, const std::string& finish_reason) {
    ojson j = head(chat, true, id, created, model);
    const ojson reason = finish_reason.empty() ? ojson(nullptr) : ojson(finish_reason);
    ojson choice = chat ? ojson{{"index", 0},
                                {"delta", finish_reason.empty() ? ojson{{"content", text}} : ojson::object()},
                                {"logprobs", nullptr},
                                {"finish_reason", reason}}
                        : ojson{{"text", text}, {"index", 0}, {"logprobs", nullptr}, {"finish_reason", reason}};
    j["choices"] = ojson::array({choice});
    return dump(j);
}

std::string role_chunk_json(const std::string& id, long created, const std::string& model) {
    ojson j = head(true, true, id, created, model);
    j["choices"] = ojson::array({ojson{{"index", 0},
                                       {"delta", {{"role", "assistant"}, {"content", ""}}},
                                       {"logprobs", nullptr},
                                       {"finish_reason", nullptr}}});
    return dump(j);
}

std::string usage_chunk_json(bool chat, const std::string& id, long created, const std::string& model,
                             int prompt_tokens, int completion_tokens, int cached_tokens) {
    ojson j = head(chat, true, id, created, model);
    j["choices"] = ojson::array();
    j["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
    return dump(j);
}

std::string sse_event(const std::string& data) { return "data: " + data + "\n\n"; }

// ---------------------------------------------------------------------------------------------
// the server: metrics, the queue between HTTP threads and the scheduler, the handlers

namespace {

// Set by SIGINT/SIGTERM, read by the scheduler loop: a signal handler can only touch a lock-free
// atomic, so this one flag is the process's.
std::atomic<bool> g_stop_requested{false};
void on_stop_signal(int) { g_stop_requested = true; }

// A Prometheus histogram of seconds.
struct Histogram {
    std::vector<double> bounds;
    std::vector<long> counts = std::vector<long>(bounds.size() + 1, 0);  // per bucket, the last +Inf
    double sum = 0;
    long n = 0;
    void add(double x) {
        counts[size_t(std::lower_bound(bounds.begin(), bounds.end(), x) - bounds.begin())]++;
        sum += x;
        n++;
    }
    std::string text(const char* name, const char* help) const {
        std::string t = fmt("# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
        long cumulative = 0;
        for (size_t i = 0; i <= bounds.size(); i++) {
            cumulative += counts[i];
            t += i < bounds.size() ? fmt("%s_bucket{le=\"%g\"} %ld\n", name, bounds[i], cumulative)
                                   : fmt("%s_bucket{le=\"+Inf\"} %ld\n", name, cumulative);
        }
        return t + fmt("%s_sum %.6f\n%s_count %ld\n", name, sum, name, n);
    }
};

struct Metrics {
    int running = 0, waiting = 0, blocks_used = 0, blocks_free = 0;
    long prompt_tokens = 0, generation_tokens = 0, forward_tokens = 0, steps = 0, preemptions = 0;
    long prefix_query_tokens = 0, prefix_hit_tokens = 0, evictions = 0;  // the prefix cache (BatchStats)
    int cached_blocks = 0;
    std::map<std::string, long> finished;  // by finish reason
    std::map<int, long> refused;           // by HTTP status
    Histogram ttft{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
    Histogram tpot{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}};

    std::string text() const {
        std::string t;
        auto gauge = [&](const char* name, const char* help, double v) {
            t += fmt("# HELP %s %s\n# TYPE %s gauge\n%s %g\n", name, help, name, name, v);
        };
        auto counter = [&](const char* name, const char* help, double v) {
            t += fmt("# HELP %s %s\n# TYPE %s counter\n%s %g\n", name, help, name, name, v);
        };
        gauge("fastgen_requests_running", "Requests in the running batch.", running);
        gauge("fastgen_requests_waiting", "Requests accepted and waiting to run.", waiting);
        gauge("fastgen_kv_blocks_used", "KV cache blocks held by sequences.", blocks_used);
        gauge("fastgen_kv_blocks_free", "KV cache blocks free (idle prefix-cache blocks included).", blocks_free);
        counter("fastgen_prompt_tokens_total", "Prompt tokens of finished requests.", double(prompt_tokens));
        counter("fastgen_generation_tokens_total", "Tokens generated.", double(generation_tokens));
        counter("fastgen_forward_tokens_total", "Tokens through the forward pass (recomputation included).",
                double(forward_tokens));
        counter("fastgen_steps_total", "Scheduler steps (one forward each).", double(steps));
        counter("fastgen_preemptions_total", "Sequences preempted for KV blocks.", double(preemptions));
        counter("fastgen_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache.",
                double(prefix_query_tokens));
        counter("fastgen_prefix_cache_hit_tokens_total", "Prompt tokens reused from the prefix cache (not computed).",
                double(prefix_hit_tokens));
        gauge("fastgen_prefix_cache_blocks", "KV blocks in the prefix cache (held or idle).", cached_blocks);
        counter("fastgen_prefix_cache_evictions_total", "Idle cached KV blocks evicted for new content.",
                double(evictions));
        t += "# HELP fastgen_requests_total Requests finished, by finish reason.\n# TYPE fastgen_requests_total counter\n";
        for (auto& [reason, n] : finished) t += fmt("fastgen_requests_total{finish_reason=\"%s\"} %ld\n", reason.c_str(), n);
        t += "# HELP fastgen_requests_refused_total Requests refused, by HTTP status.\n"
             "# TYPE fastgen_requests_refused_total counter\n";
        for (auto& [status, n] : refused) t += fmt("fastgen_requests_refused_total{status=\"%d\"} %ld\n", status, n);
        t += ttft.text("fastgen_time_to_first_token_seconds", "From arrival to the first token.");
        t += tpot.text("fastgen_time_per_output_token_seconds", "Mean time between a request's later tokens.");
        return t;
    }
};

// One accepted request. The HTTP thread that received it waits for its pieces and its end.
struct Job {
    ApiRequest api;
    std::string id;  // "cmpl-N" or "chatcmpl-N"
    long created = 0;
    // Written by the scheduler thread under Impl::mu:
    std::vector<std::string> pieces;  // text not yet sent to the client, one event each (a token's, mostly)
    bool done = false;
    Result result;
};

// The steps' commands from rank 0 to the other ranks under mpirun: requests to add, ids to
// cancel, and whether to stop. Every rank applies them before the same step, so their batches
// (and their collectives) stay the same.
struct Commands {
    std::vector<Request> add;
    std::vector<std::string> cancel;
    bool quit = false;
};

void exchange(Comm& comm, Commands& c) {
    std::string bytes;
    if (comm.rank() == 0) {
        json j = {{"cancel", c.cancel}, {"quit", c.quit}, {"add", json::array()}};
        for (const Request& r : c.add)
            j["add"].push_back({{"id", r.id}, {"prompt", r.prompt}, {"max", r.max_new_tokens},
                                {"temperature", r.sampling.temperature}, {"top_k", r.sampling.top_k},
                                {"top_p", r.sampling.top_p}, {"seed", r.seed}, {"stop", r.stop},
                                {"ignore_eos", r.ignore_eos}, {"end_ids", r.end_ids}});
        bytes = j.dump();
    }
    uint64_t n = bytes.size();
    comm.broadcast(&n, sizeof n, 0);
    bytes.resize(n);
    comm.broadcast(bytes.data(), n, 0);
    if (comm.rank() == 0) return;
    const json j = json::parse(bytes);
    c.cancel = j["cancel"].get<std::vector<std::string>>();
    c.quit = j["quit"].get<bool>();
    for (const json& a : j["add"]) {
        Request r;
        r.id = a["id"];
        r.prompt = a["prompt"].get<std::vector<int>>();
        r.max_new_tokens = a["max"];
        r.sampling = {a["temperature"].get<float>(), a["top_k"].get<int>(), a["top_p"].get<float>()};
        r.seed = a["seed"];
        r.stop = a["stop"].get<std::vector<std::string>>();
        r.ignore_eos = a["ignore_eos"];
        r.end_ids = a["end_ids"].get<std::vector<int>>();
        c.add.push_back(std::move(r));
    }
}

void install_stop_signals() {
    struct sigaction sa = {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    std::signal(SIGPIPE, SIG_IGN);  // a client gone mid-write is an error return, not the end of us
}

bool same_key(const std::string& a, const std::string& b) {  // in time independent of where they differ
    if (a.size() != b.size()) return false;
    unsigned char d = 0;
    for (size_t i = 0; i < a.size(); i++) d |= static_cast<unsigned char>(a[i] ^ b[i]);
    return d == 0;
}

}  // namespace

struct ApiServer::Impl {
    ServeOptions o;
    httplib::Server http;
    std::thread listener;
    std::atomic<bool> listen_returned{false};  // set when the accept loop returns
    socket_t listen_socket = INVALID_SOCKET;   // httplib's, seen in its socket-options callback
    int port = 0;
    const double t_start = now_seconds();

    std::mutex mu;  // guards everything below
    std::condition_variable wake_scheduler, wake_clients;
    const ApiModel* model = nullptr;  // null while the model loads
    bool stopping = false;
    std::deque<std::shared_ptr<Job>> incoming;        // accepted, not yet handed to the runner
    std::vector<std::string> cancels;                 // ids whose clients went away
    std::map<std::string, std::shared_ptr<Job>> jobs;  // in the runner
    long next_id = 0;
    std::mt19937_64 seeds{std::random_device{}()};
    Metrics metrics;

    void reply_error(httplib::Response& res, const ApiError& e, const char* what) {
        res.status = e.status;
        if (e.status == 503) res.set_header("Retry-After", "1");
        res.set_content(error_json(e), "application/json");
        std::lock_guard<std::mutex> lk(mu);
        metrics.refused[e.status]++;
        std::fprintf(stderr, "request %s: %d %s\n", what, e.status, e.what());
    }

    void handle_completion(const httplib::Request& req, httplib::Response& res, bool chat);
    bool stream(Job& job, httplib::DataSink& sink);
    void cancel(const std::string& id) {
        std::lock_guard<std::mutex> lk(mu);
        cancels.push_back(id);
        wake_scheduler.notify_one();
    }
    // Scheduler-thread callbacks.
    void piece(const std::string& id, const std::string& text) {
        std::lock_guard<std::mutex> lk(mu);
        if (auto it = jobs.find(id); it != jobs.end()) it->second->pieces.push_back(text);
        wake_clients.notify_all();
    }
    void finished(const Result& r) {
        std::lock_guard<std::mutex> lk(mu);
        auto it = jobs.find(r.id);
        if (it == jobs.end()) return;
        Job& job = *it->second;
        job.result = r;
        job.done = true;
        jobs.erase(it);
        metrics.finished[r.finish_reason]++;
        metrics.prompt_tokens += r.prompt_tokens;
        metrics.generation_tokens += r.completion_tokens;
        if (r.completion_tokens > 0) metrics.ttft.add(r.ttft_ms / 1e3);
        if (r.completion_tokens > 1) metrics.tpot.add(r.tpot_ms / 1e3);
        const int status = r.finish_reason == "error" ? 500 : r.finish_reason == "cancelled" ? 499 : 200;
        std::fprintf(stderr, "request %s: %d %s, prompt %d tokens, completion %d, TTFT %.1f ms, TPOT %.2f ms%s%s\n",
                     r.id.c_str(), status, r.finish_reason.c_str(), r.prompt_tokens, r.completion_tokens, r.ttft_ms,
                     r.tpot_ms, r.error.empty() ? "" : ": ", r.error.c_str());
        wake_clients.notify_all();
    }
};

void ApiServer::Impl::handle_completion(const httplib::Request& req, httplib::Response& res, bool chat) {
    auto job = std::make_shared<Job>();
    try {
        const ApiModel* m;
        {
            std::lock_guard<std::mutex> lk(mu);
            if (stopping) throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
            if (!model) throw ApiError(503, "the model is still loading; retry shortly", "", "loading", "server_error");
            m = model;
        }
        job->api = parse_api_request(req.body, chat, *m);  // tokenizes: outside the lock
        std::lock_guard<std::mutex> lk(mu);
        const int queued = int(incoming.size()) + metrics.waiting;
        if (queued >= o.max_queue)
            throw ApiError(503, fmt("the queue is full (%d requests waiting); retry later", queued), "", "queue_full",
                           "server_error");
        job->id = fmt("%s-%ld", chat ? "chatcmpl" : "cmpl", ++next_id);
        job->api.req.id = job->id;
        if (!job->api.has_seed) job->api.req.seed = seeds();
        job->created = long(std::time(nullptr));
        incoming.push_back(job);
        wake_scheduler.notify_one();
    } catch (const ApiError& e) {
        return reply_error(res, e, chat ? "(chat)" : "(completion)");
    }
    if (!job->api.stream) {
        std::unique_lock<std::mutex> lk(mu);
        wake_clients.wait(lk, [&] { return job->done; });
        lk.unlock();
        const Result& r = job->result;
        if (r.finish_reason == "error" || r.finish_reason == "cancelled")
            return reply_error(res, ApiError(500, r.finish_reason == "error" ? r.error : "cancelled: the server is shutting down",
                                             "", "", "server_error"),
                               job->id.c_str());
        res.set_content(completion_json(job->api, r, job->id, job->created, model->name), "application/json");
        return;
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider("text/event-stream",
                                     [this, job](size_t, httplib::DataSink& sink) { return stream(*job, sink); });
}

// Writes a job's events as they come. A write that fails means the client went away: the request
// is cancelled at the scheduler's next step and its blocks come back.
bool ApiServer::Impl::stream(Job& job, httplib::DataSink& sink) {
    const std::string& name = model->name;
    const bool chat = job.api.chat;
    auto send = [&](const std::string& data) {
        if (sink.write(data.data(), data.size())) return true;
        cancel(job.id);
        return false;
    };
    if (chat && !send(sse_event(role_chunk_json(job.id, job.created, name)))) return false;
    for (;;) {
        std::vector<std::string> pieces;
        bool done;
        {
            std::unique_lock<std::mutex> lk(mu);
            wake_clients.wait(lk, [&] { return !job.pieces.empty() || job.done; });
            pieces.swap(job.pieces);
            done = job.done;
        }
        for (const std::string& text : pieces)
            if (!send(sse_event(chunk_json(chat, job.id, job.created, name, text, "")))) return false;
        if (done) break;
    }
    const Result& r = job.result;
    if (r.finish_reason == "error" || r.finish_reason == "cancelled") {
        const ApiError e(500, r.finish_reason == "error" ? r.error : "cancelled: the server is shutting down", "", "",
                         "server_error");
        if (!send(sse_event(error_json(e)))) return false;
    } else {
        if (!send(sse_event(chunk_json(chat, job.id, job.created, name, "", api_finish_reason(r.finish_reason)))))
            return false;
        if (job.api.include_usage &&
            !send(sse_event(usage_chunk_json(chat, job.id, job.created, name, r.prompt_tokens, r.completion_tokens,
                                                   r.cached_tokens))))
            return false;
    }
    if (!send(sse_event("[DONE]"))) return false;
    sink.done();
    return true;
}

ApiServer::ApiServer(const ServeOptions& opt) : impl_(std::make_unique<Impl>()) {
    Impl& s = *impl_;
    s.o = opt;
    httplib::Server& h = s.http;
    // Every streaming client holds a thread for its whole answer: enough for every request that
    // can be running or waiting, and a few to answer the rest (503, /health, /metrics).
    const size_t threads = size_t(opt.max_queue) + size_t(opt.max_running) + 8;
    h.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    h.set_read_timeout(opt.timeout_s, 0);
    h.set_write_timeout(opt.timeout_s, 0);
    h.set_payload_max_length(opt.max_body);
    h.set_pre_routing_handler([&s](const httplib::Request& req, httplib::Response& res) {
        if (s.o.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
        const std::string got = req.get_header_value("Authorization");
        if (same_key(got, "Bearer " + s.o.api_key)) return httplib::Server::HandlerResponse::Unhandled;
        res.set_header("WWW-Authenticate", "Bearer");
        s.reply_error(res,
                      ApiError(401, got.empty() ? "no API key: send the header Authorization: Bearer KEY"
                                                : "the API key is not valid",
                               "", "invalid_api_key"),
                      req.path.c_str());
        return httplib::Server::HandlerResponse::Handled;
    });
    // httplib's own refusals (no such path, a body over the limit, a bad request line) in OpenAI's shape.
    h.set_error_handler([&s](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return;
        const int st = res.status;
        const std::string msg = st == 404   ? fmt("no such endpoint: %s %s", req.method.c_str(), req.path.c_str())
                                : st == 413 ? fmt("the request body is over the limit of %zu bytes", s.o.max_body)
                                            : fmt("HTTP %d", st);
        s.reply_error(res, ApiError(st, msg, "", st == 413 ? "request_too_large" : ""), req.path.c_str());
    });
    h.set_exception_handler([&s](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown";
        try {
            std::rethrow_exception(ep);
        } catch (const std::exception& e) {
            what = e.what();
        } catch (...) {
        }
        s.reply_error(res, ApiError(500, "internal error: " + what, "", "", "server_error"), req.path.c_str());
    });
    h.Post("/v1/completions", [&s](const httplib::Request& req, httplib::Response& res) { s.handle_completion(req, res, false); });
    h.Post("/v1/chat/completions",
           [&s](const httplib::Request& req, httplib::Response& res) { s.handle_completion(req, res, true); });
    h.Get("/v1/models", [&s](const httplib::Request&, httplib::Response& res) {
        std::lock_guard<std::mutex> lk(s.mu);
        if (!s.model) {
            res.status = 503;
            res.set_content(error_json(ApiError(503, "the model is still loading", "", "loading", "server_error")),
                            "application/json");
            return;
        }
        ojson m = {{"id", s.model->name}, {"object", "model"}, {"created", long(std::time(nullptr))}, {"owned_by", "fastgen"}};
        res.set_content(dump(ojson{{"object", "list"}, {"data", ojson::array({m})}}), "application/json");
    });
    h.Get("/health", [&s](const httplib::Request&, httplib::Response& res) {
        std::lock_guard<std::mutex> lk(s.mu);
        const char* state = s.stopping ? "shutting down" : s.model ? "ok" : "loading";
        res.status = s.model && !s.stopping ? 200 : 503;
        res.set_content(dump(ojson{{"status", state}}), "application/json");
    });
    h.Get("/metrics", [&s](const httplib::Request&, httplib::Response& res) {
        std::lock_guard<std::mutex> lk(s.mu);
        res.set_content(s.metrics.text(), "text/plain; version=0.0.4");
    });

    // SO_REUSEADDR alone: httplib's default adds SO_REUSEPORT, with which a second server binds the
    // same port and the kernel splits the connections between the two.
    h.set_socket_options([&s](socket_t sock) {
        int yes = 1;
        setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
        s.listen_socket = sock;
    });
    s.port = opt.port == 0 ? h.bind_to_any_port(opt.host) : (h.bind_to_port(opt.host, opt.port) ? opt.port : -1);
    if (s.port <= 0)
        throw Error(fmt("--serve: cannot listen on %s port %d (in use, or not an address of this machine)",
                        opt.host.c_str(), opt.port));
    // Debian's httplib 0.11 listens with a backlog of 5: a burst of clients connecting at once
    // overflows it and some are reset. listen() again on the bound socket only raises the backlog.
    if (::listen(s.listen_socket, SOMAXCONN) != 0)
        throw Error(fmt("--serve: cannot listen on %s port %d: %s", opt.host.c_str(), s.port, std::strerror(errno)));
    s.listener = std::thread([&s] {
        s.http.listen_after_bind();
        s.listen_returned = true;
    });
    // stop() before the accept loop runs would be lost (and the destructor's join wait forever).
    while (!h.is_running() && !s.listen_returned) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (!h.is_running()) {
        s.listener.join();
        throw Error(fmt("--serve: cannot accept connections on %s port %d", opt.host.c_str(), s.port));
    }
    std::fprintf(stderr, "listening on http://%s:%d (/health answers 503 until the model is loaded)\n",
                 opt.host.c_str(), s.port);
}

ApiServer::~ApiServer() {
    impl_->http.stop();
    if (impl_->listener.joinable()) impl_->listener.join();
}

int ApiServer::port() const { return impl_->port; }

void ApiServer::run(Model& model, KVCache& kv, const Tokenizer& tok, const ApiModel& m, const BatchOptions& bo,
                    Comm* comm) {
    Impl& s = *impl_;
    install_stop_signals();
    BatchRunner runner(model, kv, &tok, bo, [&s](const Result& r) { s.finished(r); });
    runner.set_on_text([&s](const std::string& id, const std::string& text) { s.piece(id, text); });
    {
        std::lock_guard<std::mutex> lk(s.mu);
        s.model = &m;
        s.metrics.blocks_free = kv.available_blocks();
    }
    std::fprintf(stderr, "ready: serving '%s' at http://%s:%d (/v1/completions, /v1/chat/completions, /v1/models, "
                 "/health, /metrics)%s\n",
                 m.name.c_str(), s.o.host.c_str(), s.port, s.o.api_key.empty() ? "" : "; API key required");
    double stop_by = 0;  // once stopping: when what still runs is cancelled
    for (;;) {
        Commands c;
        std::vector<std::shared_ptr<Job>> adds;
        {
            std::unique_lock<std::mutex> lk(s.mu);
            if (g_stop_requested && !s.stopping) {
                s.stopping = true;
                stop_by = now_seconds() + s.o.grace_s;
                s.http.stop();  // no new connections; the ones open finish their answers
                std::fprintf(stderr, "stopping: finishing %zu requests (at most %d s)\n",
                             s.jobs.size() + s.incoming.size(), s.o.grace_s);
            }
            if (s.stopping && now_seconds() > stop_by)
                for (auto& [id, job] : s.jobs) c.cancel.push_back(id);
            const bool idle = runner.running() == 0 && runner.waiting() == 0 && s.incoming.empty() && s.cancels.empty();
            if (idle && !s.stopping) {
                s.wake_scheduler.wait_for(lk, std::chrono::milliseconds(100));
                continue;
            }
            c.quit = idle;
            for (auto& job : s.incoming) {
                s.jobs[job->id] = job;
                c.add.push_back(job->api.req);
            }
            s.incoming.clear();
            c.cancel.insert(c.cancel.end(), s.cancels.begin(), s.cancels.end());
            s.cancels.clear();
        }
        if (comm) exchange(*comm, c);
        if (c.quit) break;
        for (Request& r : c.add) runner.add(std::move(r));
        for (const std::string& id : c.cancel) runner.cancel(id);
        runner.step();
        std::lock_guard<std::mutex> lk(s.mu);
        const BatchStats& st = runner.stats();
        s.metrics.running = runner.running();
        s.metrics.waiting = runner.waiting();
        s.metrics.blocks_free = kv.available_blocks();  // idle cached blocks are free to reuse
        s.metrics.blocks_used = kv.held_blocks();
        s.metrics.forward_tokens = st.computed_tokens;
        s.metrics.steps = st.steps;
        s.metrics.preemptions = st.preemptions;
        s.metrics.prefix_query_tokens = st.prefix_query_tokens;
        s.metrics.prefix_hit_tokens = st.prefix_hit_tokens;
        s.metrics.cached_blocks = st.cached_blocks;
        s.metrics.evictions = st.evictions;
    }
    if (s.listener.joinable()) s.listener.join();  // the open connections' last writes
    std::fprintf(stderr, "stopped\n");
}

void serve_follower(Model& model, KVCache& kv, const Tokenizer& tok, const BatchOptions& bo, Comm& comm) {
    install_stop_signals();  // rank 0 decides when to stop; a signal here must not end this rank alone
    BatchRunner runner(model, kv, &tok, bo, nullptr);
    for (;;) {
        Commands c;
        exchange(comm, c);
        if (c.quit) break;
        for (Request& r : c.add) runner.add(std::move(r));
        for (const std::string& id : c.cancel) runner.cancel(id);
        runner.step();
    }
}
