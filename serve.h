// serve.h: `generate --serve`, an OpenAI-compatible HTTP server over the continuous-batching loop:
// the request shapes (/v1/completions, /v1/chat/completions), their answers and server-sent
// events, and the server itself. One thread owns the model, the KV cache and the BatchRunner; the
// HTTP threads (cpp-httplib's pool) hand it requests through a queue and read back text pieces.
// The scheduler knows nothing of HTTP.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "batch.h"
#include "chat.h"
#include "common.h"

class Comm;
struct KVCache;
class Model;
class Tokenizer;

// A request refused with an HTTP status, written as OpenAI's {"error": {message, type, param, code}}.
struct ApiError : Error {
    int status;
    std::string type, param, code;
    ApiError(int status_, const std::string& message, const std::string& param_ = "", const std::string& code_ = "",
             const std::string& type_ = "invalid_request_error")
        : Error(message), status(status_), type(type_), param(param_), code(code_) {}
};
std::string error_json(const ApiError& e);

// What parsing a request body needs to know of the model.
struct ApiModel {
    const Tokenizer* tok = nullptr;
    ChatStyle style{ChatFormat::Llama2, ""};  // the chat layout, its default system message included
    int end_id = -1;                          // the token that ends a chat answer (EOS or end-of-turn)
    int context = 0;                          // positions one sequence may use
    std::string name;                         // the model's name in "model" fields
};

// One /v1/completions (chat = false) or /v1/chat/completions body, checked and tokenized.
struct ApiRequest {
    bool chat = false;
    bool stream = false;
    bool include_usage = false;  // stream_options.include_usage: a last chunk with the token counts
    bool has_seed = false;       // else the server draws one
    Request req;                 // prompt ids, max tokens, sampling, stop strings and end ids
};
// Throws ApiError naming the field for anything we cannot honour: malformed JSON, wrong types,
// unknown fields, n != 1, penalties, logprobs, tools, an unknown model (404), a prompt or
// prompt + max_tokens past the context (400, code context_length_exceeded). Sampling defaults are
// OpenAI's (temperature 1, top_p 1, all tokens); max_tokens defaults to 16 for completions and to
// the rest of the context for chat. req.id and req.seed (when the body has none) are the caller's.
ApiRequest parse_api_request(const std::string& body, bool chat, const ApiModel& m);

// OpenAI's finish_reason for a Result's: eos and stop strings "stop"; token limit and context "length".
std::string api_finish_reason(const std::string& reason);
// The whole answer (stream false): a text_completion or chat.completion object.
std::string completion_json(const ApiRequest& a, const Result& r, const std::string& id, long created,
                            const std::string& model);
// One streamed chunk: a text piece (finish_reason empty), or the last one (text empty, finish_reason
// set). Chat's first chunk carries the role (role_chunk).
std::string chunk_json(bool chat, const std::string& id, long created, const std::string& model,
                       const std::string& text, const std::string& finish_reason);
std::string role_chunk_json(const std::string& id, long created, const std::string& model);
std::string usage_chunk_json(bool chat, const std::string& id, long created, const std::string& model,
                             int prompt_tokens, int completion_tokens, int cached_tokens);
// A server-sent event carrying `data` ("data: ...\n\n"); a JSON text has no newlines in it.
std::string sse_event(const std::string& data);

struct ServeOptions {
    std::string host = "127.0.0.1";
    int port = 8000;         // 0: any free port (the log line says which)
    std::string api_key;     // non-empty: every endpoint but /health needs "Authorization: Bearer KEY"
    int max_queue = 64;      // requests waiting beyond the running ones; more get 503
    int max_running = 32;    // the batch's max_seqs (each streaming client holds an HTTP thread)
    size_t max_body = 1 << 20;  // request body bytes; more get 413
    int timeout_s = 30;      // reading a request, or writing to a client that does not read
    int grace_s = 30;        // on SIGINT/SIGTERM: time to finish what runs before cancelling it
};

// The listening half, started before the model loads (so /health says 503 while it does).
class ApiServer {
  public:
    explicit ApiServer(const ServeOptions& o);  // binds (Error when it cannot) and listens
    ~ApiServer();
    int port() const;
    // Rank 0 (or the only process): serves until SIGINT or SIGTERM, then stops accepting, finishes
    // (within grace_s) or cancels what runs, and returns. Under mpirun the other ranks run
    // serve_follower: every step, rank 0 hands them the step's new and cancelled requests.
    void run(Model& model, KVCache& kv, const Tokenizer& tok, const ApiModel& m, const BatchOptions& bo, Comm* comm);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};
void serve_follower(Model& model, KVCache& kv, const Tokenizer& tok, const BatchOptions& bo, Comm& comm);
