// tests/test_batch.cpp: continuous batching: every request's output (greedy, and sampled with a
// seed) equals its solo decode() output, with chunked prefill, under preemption, in static mode,
// at the context end of a tiny GQA model; stop strings, refusals, and the JSONL helpers.
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "batch.h"
#include "common.h"
#include "convert.h"
#include "decode.h"
#include "test_util.h"

namespace {

Model& stories260k() {
    static std::unique_ptr<Model> m;
    if (!m) {
        m = std::make_unique<Model>(shared_model_bin("stories260K"), cpu_ops(0));
    }
    return *m;
}

// What decode() emits for the request alone (EOS not included), and whether it hit EOS.
std::vector<int> solo(Model& m, const Request& r, bool* eos = nullptr) {
    KVCache kv(m.cfg, m.cfg.max_seq_len);
    Sampler s(r.sampling, r.seed);
    std::vector<int> out;
    DecodeStats st = decode(m, kv, r.prompt, r.max_new_tokens, s, nullptr, 0, [&](int id) {
        out.push_back(id);
        return true;
    });
    if (eos) *eos = st.generated > int(out.size());
    return out;
}

// 32 requests: prompts of 1..~190 tokens (prefixes of a story, or random ids), 1..120 new tokens,
// a third greedy, the rest sampled with their own seeds and settings.
std::vector<Request> mixed_requests(const Tokenizer& tok, int n, unsigned seed) {
    const std::string story =
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
        "saw a big, red ball. She wanted to play with it, but it was too high. Lily's mom said, \"Lily, let's go to "
        "the park.\" Lily was sad and didn't know what to do. Then a small dog came running. It had a long tail and "
        "big brown eyes. The dog barked and jumped, and the ball fell down from the tree. Lily laughed and hugged "
        "the dog. They played all day until the sun went down, and then they went home to eat dinner together.";
    const std::vector<int> words = tok.encode(story, true, false);
    std::mt19937 rng(seed);
    std::vector<Request> reqs;
    for (int i = 0; i < n; i++) {
        Request r;
        r.id = "r" + std::to_string(i);
        if (i % 4 == 3) {  // random ids: unusual contexts
            r.prompt = {1};
            int len = 2 + int(rng() % 60);
            for (int j = 0; j < len; j++) r.prompt.push_back(3 + int(rng() % 500));
        } else {
            size_t len = 1 + size_t(rng() % words.size());
            r.prompt.assign(words.begin(), words.begin() + long(len));
        }
        r.max_new_tokens = 1 + int(rng() % 120);
        if (i % 3 == 0) {
            r.sampling = {0.0f, 0, 1.0f};
        } else {
            r.sampling = {0.5f + 0.1f * float(i % 6), i % 2 ? 0 : 40, i % 5 == 1 ? 0.9f : 1.0f};
            r.seed = 1000 + uint64_t(i);
        }
        reqs.push_back(r);
    }
    return reqs;
}

struct BatchRun {
    std::map<std::string, Result> results;
    std::vector<std::string> order;  // ids in the order they finished
    BatchStats stats;
};

BatchRun run_batch(Model& m, const std::vector<Request>& reqs, BatchOptions opt, int kv_tokens,
                   const Tokenizer* tok = nullptr, bool prefix_cache = true) {
    KVCache kv(m.cfg, kv_tokens);
    kv.prefix_cache = prefix_cache;
    BatchRun out;
    BatchRunner runner(m, kv, tok, opt, [&](const Result& r) {
        out.results[r.id] = r;
        out.order.push_back(r.id);
    });
    for (const Request& r : reqs) runner.add(r);
    runner.run();
    out.stats = runner.stats();
    CHECK(kv.held_blocks() == 0);  // every block came back (free, or idle in the prefix cache)
    CHECK(kv.check() == "");
    return out;
}

// Every request finished, with exactly its solo tokens and a consistent finish reason.
void check_matches_solo(Model& m, const std::vector<Request>& reqs, const BatchRun& b) {
    REQUIRE(b.results.size() == reqs.size());
    for (const Request& r : reqs) {
        CAPTURE(r.id);
        const Result& got = b.results.at(r.id);
        bool eos = false;
        std::vector<int> want = solo(m, r, &eos);
        CHECK(got.tokens == want);
        CHECK(got.prompt_tokens == int(r.prompt.size()));
        CHECK(got.completion_tokens == int(want.size()) + (eos ? 1 : 0));
        if (eos) CHECK(got.finish_reason == "eos");
        else CHECK((got.finish_reason == "length" || got.finish_reason == "context"));
        CHECK(got.ttft_ms > 0);
    }
}

}  // namespace

TEST_CASE("batch: 32 mixed requests give exactly their solo outputs (chunked prefill, greedy and sampled)") {
    Model& m = stories260k();
    Tokenizer tok(m.tokenizer_model, "stories260K");
    std::vector<Request> reqs = mixed_requests(tok, 32, 1);
    // A budget of 48 tokens: long prompts are prefilled in several chunks beside other decodes.
    BatchOptions opt;
    opt.max_batch_tokens = 48;
    opt.max_seqs = 12;
    BatchRun b = run_batch(m, reqs, opt, m.cfg.max_seq_len * 12, &tok);
    check_matches_solo(m, reqs, b);
    CHECK(b.stats.preemptions == 0);
    CHECK(b.stats.peak_running == 12);
    CHECK(b.stats.steps < b.stats.output_tokens);  // sequences shared forwards
    // The text is the detokenized output.
    for (const Request& r : reqs) {
        const Result& got = b.results.at(r.id);
        StreamDecoder d(tok);
        for (int id : r.prompt) d.push(id);
        d.flush();
        std::string want;
        for (int id : got.tokens) want += d.push(id);
        want += d.flush();
        CHECK(got.text == want);
    }
}

TEST_CASE("batch: a KV cache too small for all at once forces preemption; outputs unchanged") {
    Model& m = stories260k();
    Tokenizer tok(m.tokenizer_model, "stories260K");
    std::vector<Request> reqs = mixed_requests(tok, 32, 2);
    for (auto& r : reqs) r.max_new_tokens = std::max(r.max_new_tokens, 60);  // long enough to grow
    BatchOptions opt;
    opt.max_batch_tokens = 64;
    opt.max_seqs = 16;
    // 384 tokens of cache for up to 16 sequences of up to ~320 positions each. Without the prefix
    // cache, so every preemption recomputes (tests/test_prefix_cache.cpp resumes over cached blocks).
    BatchRun b = run_batch(m, reqs, opt, 384, nullptr, false);
    CHECK(b.stats.preemptions > 0);
    CHECK(b.stats.computed_tokens > b.stats.prompt_tokens + b.stats.output_tokens - 32);  // recomputation
    CHECK(b.stats.peak_blocks >= 20);  // of 24: the cache was the limit
    check_matches_solo(m, reqs, b);
    int preempted = 0;
    for (auto& [id, r] : b.results) preempted += r.preemptions;
    CHECK(preempted == b.stats.preemptions);
}

TEST_CASE("batch: static batching gives the same outputs, in groups, with or without padding") {
    Model& m = stories260k();
    Tokenizer tok(m.tokenizer_model, "stories260K");
    std::vector<Request> reqs = mixed_requests(tok, 16, 3);
    BatchOptions opt;
    opt.max_batch_tokens = 512;
    opt.max_seqs = 8;
    opt.static_batching = true;
    BatchRun padded = run_batch(m, reqs, opt, m.cfg.max_seq_len * 8);
    check_matches_solo(m, reqs, padded);
    // The first group (r0..r7) all finish before any of the second starts, so before any finishes.
    for (int i = 0; i < 8; i++) {
        auto at = std::find(padded.order.begin(), padded.order.end(), "r" + std::to_string(i)) - padded.order.begin();
        CHECK(at < 8);
    }
    // Finished members were computed as padding: every step of a group ran all its members.
    CHECK(padded.stats.padding_tokens > 0);
    CHECK(padded.stats.computed_tokens ==
          padded.stats.prompt_tokens + padded.stats.output_tokens - 16 + padded.stats.padding_tokens);
    opt.static_padding = false;
    BatchRun unpadded = run_batch(m, reqs, opt, m.cfg.max_seq_len * 8);
    check_matches_solo(m, reqs, unpadded);
    CHECK(unpadded.stats.padding_tokens == 0);
    CHECK(unpadded.stats.steps == padded.stats.steps);  // the same groups, the same number of forwards
    opt.static_batching = false;
    BatchRun c = run_batch(m, reqs, opt, m.cfg.max_seq_len * 8);
    CHECK(c.stats.steps < padded.stats.steps);  // continuous batching needs fewer forwards
    // A cache too small for a whole padded group: padding gives its blocks back first, and
    // preemption does the rest; every output is still the solo one.
    opt.static_batching = true;
    opt.static_padding = true;
    opt.max_batch_tokens = 64;
    BatchRun tight = run_batch(m, reqs, opt, 384);
    check_matches_solo(m, reqs, tight);
}

TEST_CASE("batch: a tiny GQA model, requests running into the context end, match solo") {
    // Random weights rarely say EOS, so most requests run to the 64-position context end.
    Config c = tiny_config(64, 96, 2, 4, 2, false);
    std::string path = temp_dir() + "/batch-tiny.bin";
    write_model_bin(random_weights(c, 7), path, DType::BF16);
    Model m(path, cpu_ops(0));
    std::mt19937 rng(5);
    std::vector<Request> reqs;
    for (int i = 0; i < 12; i++) {
        Request r;
        r.id = "t" + std::to_string(i);
        r.prompt = {1};
        for (int j = int(rng() % 50); j > 0; j--) r.prompt.push_back(int(rng() % 512));
        r.max_new_tokens = i % 2 ? 100 : 1 + int(rng() % 20);
        r.sampling = i % 3 ? SamplingParams{1.0f, 0, 1.0f} : SamplingParams{0.0f, 0, 1.0f};
        r.seed = uint64_t(i);
        reqs.push_back(r);
    }
    BatchOptions opt;
    opt.max_batch_tokens = 16;
    opt.max_seqs = 5;
    BatchRun b = run_batch(m, reqs, opt, 160);
    check_matches_solo(m, reqs, b);
    int context_ends = 0;
    for (auto& [id, r] : b.results) context_ends += r.finish_reason == "context";
    CHECK(context_ends > 0);
    CHECK(b.stats.preemptions > 0);
}

TEST_CASE("batch: stop strings cut the text; refused requests finish with an error, the rest run") {
    Model& m = stories260k();
    Tokenizer tok(m.tokenizer_model, "stories260K");
    Request base;
    base.prompt = tok.encode("Once upon a time", true, false);
    base.sampling = {0.0f, 0, 1.0f};
    base.max_new_tokens = 100;
    Request stop = base, too_long = base, empty = base, huge = base;
    stop.id = "stop";
    stop.stop = {"Lily", "zzz"};
    too_long.id = "too-long";
    too_long.prompt.assign(size_t(m.cfg.max_seq_len), 403);
    empty.id = "empty";
    empty.prompt.clear();
    huge.id = "huge";  // more positions than the whole cache (64 tokens) holds
    huge.prompt.assign(100, 403);
    huge.prompt[0] = 1;
    base.id = "ok";
    base.max_new_tokens = 20;
    BatchOptions opt;
    opt.max_batch_tokens = 32;
    opt.max_seqs = 4;
    BatchRun b = run_batch(m, {stop, too_long, empty, huge, base}, opt, 64, &tok);
    REQUIRE(b.results.size() == 5);
    const Result& s = b.results["stop"];
    CHECK(s.finish_reason == "stop");
    // Its text is the solo text cut just before the first "Lily".
    StreamDecoder d(tok);
    for (int id : stop.prompt) d.push(id);
    std::string full;
    for (int id : solo(m, stop)) full += d.push(id);
    REQUIRE(full.find("Lily") != std::string::npos);
    CHECK(s.text == full.substr(0, full.find("Lily")));
    CHECK(s.tokens.size() < 20);
    CHECK(b.results["too-long"].finish_reason == "error");
    CHECK(b.results["too-long"].error.find("context") != std::string::npos);
    CHECK(b.results["empty"].finish_reason == "error");
    CHECK(b.results["huge"].finish_reason == "error");
    CHECK(b.results["huge"].error.find("KV cache") != std::string::npos);
    CHECK(b.results["ok"].finish_reason == "length");
    CHECK(b.results["ok"].tokens == solo(m, base));
}

TEST_CASE("batch: JSONL request parsing and result lines") {
    Model& m = stories260k();
    Tokenizer tok(m.tokenizer_model, "stories260K");
    Request d;
    d.max_new_tokens = 7;
    d.sampling = {0.3f, 5, 0.5f};
    d.seed = 9;
    Request r = parse_request(R"({"prompt": "Once upon a time"})", 4, tok, d, 512);
    CHECK(r.id == "line-4");
    CHECK(r.prompt == std::vector<int>{1, 403, 407, 261, 378});
    CHECK(r.max_new_tokens == 7);
    CHECK(r.seed == 9);
    CHECK(r.sampling.top_k == 5);
    r = parse_request(R"({"id": "a", "prompt": "Hi", "max_new_tokens": 3, "temperature": 0, "top_k": 0,
                          "top_p": 1, "seed": 12, "stop": ["x", "y"], "ignore_eos": true})",
                      1, tok, d, 512);
    CHECK(r.id == "a");
    CHECK(r.max_new_tokens == 3);
    CHECK(r.sampling.temperature == 0.0f);
    CHECK(r.seed == 12);
    CHECK(r.stop == std::vector<std::string>{"x", "y"});
    CHECK(r.ignore_eos);
    auto refused = [&](const std::string& line, const std::string& word) {
        CAPTURE(line);
        try {
            parse_request(line, 1, tok, d, 16);
            CHECK_MESSAGE(false, "accepted");
        } catch (const Error& e) {
            CHECK_MESSAGE(std::string(e.what()).find(word) != std::string::npos, e.what());
        }
    };
    refused("{\"prompt\": \"x\"", "malformed JSON");
    refused("[1, 2]", "JSON object");
    refused(R"({"id": "x"})", "prompt");
    refused(R"({"prompt": ""})", "empty prompt");
    refused(R"({"prompt": "Hi", "max_new_tokens": 0})", "max_new_tokens");
    refused(R"({"prompt": "Hi", "top_p": 0})", "top_p");
    refused(R"({"prompt": "Hi", "temperature": "hot"})", "temperature");
    refused(R"({"prompt": "Hi", "stop": [1]})", "stop");
    // Found by fuzzing: the message said "an integer >= 0" of a value that was one, but past 2^30.
    refused(R"({"prompt": "Hi", "top_k": 18446744073709551615})", "\"top_k\" must be an integer in [0, 2^30]");
    refused(R"({"prompt": "Hi", "temprature": 1})", "unknown field");
    refused(R"({"prompt": "Once upon a time, there was a little girl named Lily."})", "context");
    // Found by fuzzing: a "stop" nested a million levels deep overflowed the stack quoting it in the
    // message (nlohmann's dump() recurses per level); the parse refuses it first. 128 levels pass.
    refused("{\"prompt\": \"Hi\", \"stop\": " + std::string(1000000, '[') + std::string(1000000, ']') + "}",
            "JSON nested deeper than 128 levels");
    refused("{\"prompt\": \"Hi\", \"stop\": " + std::string(127, '[') + std::string(127, ']') + "}",
            "\"stop\" must be a string or an array of strings");

    Result res;
    res.id = "q\"1";
    res.text = "a\nb";
    res.finish_reason = "eos";
    std::string line = result_json(res);
    CHECK(line.find('\n') == std::string::npos);
    CHECK(result_id(line) == "q\"1");
    CHECK(result_id("{\"id\": 3}").empty());
    CHECK(result_id("not json").empty());
    CHECK(percentile({}, 50) == 0.0);
    CHECK(percentile({3, 1, 2}, 50) == 2.0);
    CHECK(percentile({1, 2, 3, 4, 5}, 90) == doctest::Approx(4.6));
}

// ---------------------------------------------------------------------------------------------
// ./generate --prompts-file end to end

namespace {

std::string gen(const std::string& args) {
    stories260k();  // converts the checkpoint
    return "./generate --checkpoint " + shell_quote(shared_model_bin("stories260K")) + " " + args;
}

void write_text(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
}

// Result lines by id (every line must parse); a repeated id fails the test.
std::map<std::string, nlohmann::json> results_by_id(const std::string& path) {
    std::map<std::string, nlohmann::json> out;
    std::istringstream in(read_file(path));
    std::string line;
    while (std::getline(in, line)) {
        nlohmann::json j = nlohmann::json::parse(line);
        std::string id = j.at("id").get<std::string>();
        CHECK_MESSAGE(!out.count(id), "id " << id << " twice in " << path);
        out[id] = j;
    }
    return out;
}

}  // namespace

TEST_SUITE("cli") {

TEST_CASE("generate --prompts-file: bad lines are reported by number and skipped, the rest match --prompt") {
    std::string dir = temp_dir(), in = dir + "/bad.jsonl", out = dir + "/bad-out.jsonl";
    std::string long_prompt;
    for (int i = 0; i < 300; i++) long_prompt += "the dog ";
    write_text(in, "{\"id\": \"a\", \"prompt\": \"Once upon a time\", \"max_new_tokens\": 40}\n"  // 1
                   "{\"id\": \"x\", \"prompt\": \"oops}\n"                                    // 2 malformed
                   "{\"id\": \"y\", \"prompt\": \"\"}\n"                                       // 3 empty
                   "{\"id\": \"a\", \"prompt\": \"Lily\"}\n"                                   // 4 duplicate
                   "{\"id\": \"z\", \"prompt\": \"" + long_prompt + "\"}\n"                  // 5 over the context
                   "\n"                                                                        // 6 blank
                   "{\"id\": \"b\", \"prompt\": \"Lily and Ben\", \"temperature\": 1, \"seed\": 4}\n"  // 7
                   "{\"prompt\": \"Tom\", \"max_new_tokens\": \"ten\"}\n");                    // 8 bad type
    CommandResult r = run_command(gen("--prompts-file " + shell_quote(in) + " --output " + shell_quote(out) + " --temperature 0 --max-new-tokens 25"));
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    for (const char* where : {"bad.jsonl:2: malformed JSON", "bad.jsonl:3: empty prompt", "bad.jsonl:4: duplicate id",
                              "bad.jsonl:5: the prompt is", "bad.jsonl:8: \"max_new_tokens\" must be"})
        CHECK_MESSAGE(has(r.err, where), "expected '" << where << "' in stderr: " << r.err);
    CHECK(!has(r.err, "bad.jsonl:6"));
    CHECK(!has(r.err, "bad.jsonl:7"));
    CHECK(has(r.err, "5 bad lines skipped"));
    for (const char* stat : {"requests 2", "tok/s", "TTFT ms p50", "TPOT ms p50", "p99", "peak KV blocks"})
        CHECK_MESSAGE(has(r.err, stat), "expected '" << stat << "' in stderr: " << r.err);
    auto res = results_by_id(out);
    REQUIRE(res.size() == 2);
    REQUIRE(res.count("a"));
    REQUIRE(res.count("b"));
    CHECK(res["a"]["completion_tokens"] == 40);
    CHECK(res["a"]["finish_reason"] == "length");
    CHECK(res["a"]["prompt_tokens"] == 5);
    CHECK(res["a"]["ttft_ms"].get<double>() > 0);
    CHECK(res["b"]["completion_tokens"].get<int>() <= 25);
    // Each equals its solo run through --prompt (same settings and seed).
    CommandResult a = run_command(gen("--prompt 'Once upon a time' --temperature 0 --max-new-tokens 40"));
    CommandResult b = run_command(gen("--prompt 'Lily and Ben' --temperature 1 --seed 4 --max-new-tokens 25"));
    REQUIRE(a.rc == 0);
    REQUIRE(b.rc == 0);
    CHECK(a.out == "Once upon a time" + res["a"]["text"].get<std::string>() + "\n");
    CHECK(b.out == "Lily and Ben" + res["b"]["text"].get<std::string>() + "\n");
    // Static batching and one at a time give the same results.
    for (const char* how : {"--batching static --max-seqs 2", "--max-seqs 1 --max-batch-tokens 4"}) {
        CAPTURE(how);
        std::string out2 = dir + "/bad-out2.jsonl";
        CommandResult s = run_command(gen("--prompts-file " + shell_quote(in) + " --output " + shell_quote(out2) + " --temperature 0 --max-new-tokens 25 " + how));
        REQUIRE_MESSAGE(s.rc == 0, s.err);
        auto res2 = results_by_id(out2);
        REQUIRE(res2.size() == 2);
        CHECK(res2["a"]["text"] == res["a"]["text"]);
        CHECK(res2["b"]["text"] == res["b"]["text"]);
    }
}

TEST_CASE("generate --prompts-file --resume: finished ids are skipped, a cut-off last line is redone") {
    std::string dir = temp_dir(), in = dir + "/resume.jsonl", out = dir + "/resume-out.jsonl";
    std::string lines;
    for (const char* id : {"p1", "p2", "p3"})
        lines += "{\"id\": \"" + std::string(id) + "\", \"prompt\": \"Once upon a time\", \"temperature\": 0}\n";
    write_text(in, lines);
    std::string cmd = gen("--prompts-file " + shell_quote(in) + " --output " + shell_quote(out) + " --max-new-tokens 12");
    CommandResult first = run_command(cmd);
    REQUIRE_MESSAGE(first.rc == 0, first.err);
    auto all = results_by_id(out);
    REQUIRE(all.size() == 3);
    // An interrupted run: p1 complete, p2 cut off mid-line.
    std::istringstream lines_in(read_file(out));
    std::map<std::string, std::string> line_of;
    std::string line;
    while (std::getline(lines_in, line)) line_of[nlohmann::json::parse(line)["id"]] = line;
    write_text(out, line_of["p1"] + "\n" + line_of["p2"].substr(0, 20));
    CommandResult again = run_command(cmd + " --resume");
    REQUIRE_MESSAGE(again.rc == 0, again.err);
    CHECK_MESSAGE(has(again.err, "batch: 2 requests"), again.err);
    CHECK(has(again.err, "1 already in"));
    // The file now holds p1 once, the cut line, then p2 and p3.
    std::string text = read_file(out);
    CHECK(text.rfind(line_of["p1"] + "\n" + line_of["p2"].substr(0, 20) + "\n", 0) == 0);
    std::map<std::string, int> seen;
    std::istringstream again_in(text);
    while (std::getline(again_in, line)) {
        std::string id = result_id(line);
        if (!id.empty()) seen[id]++;
    }
    CHECK(seen == std::map<std::string, int>{{"p1", 1}, {"p2", 1}, {"p3", 1}});
    // Nothing left: a third run does no work.
    CommandResult third = run_command(cmd + " --resume");
    REQUIRE(third.rc == 0);
    CHECK(has(third.err, "batch: 0 requests"));
    CHECK(has(third.err, "3 already in"));
}

TEST_CASE("generate --prompts-file: misuse is refused with a message") {
    std::string in = temp_dir() + "/misuse.jsonl";
    write_text(in, "{\"prompt\": \"Hi\"}\n");
    struct Case { std::string args, word; } cases[] = {
        {"--prompts-file " + shell_quote(in), "--output"},
        {"--prompts-file " + shell_quote(in) + " --output /tmp/x.jsonl --prompt Hi", "exclude"},
        {"--prompts-file " + shell_quote(in) + " --output /tmp/x.jsonl --max-seqs 64 --max-batch-tokens 16", "--max-batch-tokens"},
        {"--prompts-file " + shell_quote(in) + " --output /tmp/x.jsonl --batching dynamic", "--batching"},
        {"--prompts-file " + shell_quote(in) + " --output /tmp/x.jsonl --kv-capacity 4", "--kv-capacity"},
        {"--prompts-file " + shell_quote(in) + " --output /nonexistent-dir/x.jsonl", "cannot open"},
        {"--prompts-file /nonexistent.jsonl --output /tmp/x.jsonl", "prompts-file"},
        {"--max-seqs 4", "only applies with --prompts-file"},
        {"--resume", "only applies with --prompts-file"},
    };
    for (const Case& c : cases) {
        CAPTURE(c.args);
        CommandResult r = run_command(gen(c.args));
        CHECK(r.rc == 1);
        CHECK_MESSAGE(has(r.err, c.word), r.err);
    }
}

}  // TEST_SUITE
