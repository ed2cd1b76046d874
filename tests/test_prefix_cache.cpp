// tests/test_prefix_cache.cpp: automatic prefix caching (kv_cache.h): the block bookkeeping alone
// (match, commit, reference counts, LRU eviction deepest first, held blocks never evicted, forced
// hash collisions, truncation into a cached block), then through the batch scheduler and decode()
// on stories260K: outputs with the cache equal outputs without it, under eviction, preemption and
// collisions, with every reference count back to zero.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <random>

#include "batch.h"
#include "decode.h"
#include "test_util.h"

namespace {

// Forces every block key to one value while alive (the test hook), then restores the hash.
struct ConstantHash {
    uint64_t (*saved)(uint64_t, const int*, int) = KVCache::hash;
    ConstantHash() {
        KVCache::hash = [](uint64_t, const int*, int) -> uint64_t { return 42; };
    }
    ~ConstantHash() { KVCache::hash = saved; }
};

Config small_config() { return tiny_config(32, 64, 1, 4, 2, true); }

std::vector<int> iota_tokens(int n, int from) {
    std::vector<int> t(static_cast<size_t>(n));
    for (int i = 0; i < n; i++) t[size_t(i)] = from + i;
    return t;
}

Model& stories260k() {
    static std::unique_ptr<Model> m;
    if (!m) m = std::make_unique<Model>(shared_model_bin("stories260K"), cpu_ops(0));
    return *m;
}

// n requests over 4 shared prefixes of 5, 13, 37 and 70 tokens (two shorter than a block of 16,
// none a multiple of it), each with its own question of 1..24 tokens; the last four repeat
// earlier prompts exactly. A third greedy, the rest sampled with their own seeds.
std::vector<Request> shared_prefix_requests(int n, unsigned seed, int min_new = 8) {
    const int lens[4] = {5, 13, 37, 70};
    std::vector<std::vector<int>> prefixes;
    for (int k = 0; k < 4; k++) prefixes.push_back(random_tokens(lens[k], 512, 100 + unsigned(k)));
    std::mt19937 rng(seed);
    std::vector<Request> reqs;
    for (int i = 0; i < n; i++) {
        Request r;
        r.id = "r" + std::to_string(i);
        if (i >= n - 4 && i >= 8) {
            r.prompt = reqs[size_t(i - 8)].prompt;
        } else {
            r.prompt = prefixes[size_t(i % 4)];
            const int q = 1 + int(rng() % 24);
            for (int j = 0; j < q; j++) r.prompt.push_back(3 + int(rng() % 509));
        }
        r.max_new_tokens = min_new + int(rng() % 40);
        if (i % 3 == 0) {
            r.sampling = {0.0f, 0, 1.0f};
        } else {
            r.sampling = {0.7f + 0.1f * float(i % 4), i % 2 ? 0 : 40, i % 5 == 1 ? 0.9f : 1.0f};
            r.seed = 500 + uint64_t(i);
        }
        reqs.push_back(r);
    }
    return reqs;
}

struct Run {
    std::map<std::string, Result> results;
    BatchStats stats;
};

// Runs the requests to the end in one cache, checking the bookkeeping after every step.
Run run(Model& m, const std::vector<Request>& reqs, BatchOptions opt, int kv_tokens, bool prefix_cache) {
    KVCache kv(m.cfg, kv_tokens);
    kv.prefix_cache = prefix_cache;
    Run out;
    BatchRunner runner(m, kv, nullptr, opt, [&](const Result& r) { out.results[r.id] = r; });
    for (const Request& r : reqs) runner.add(r);
    std::string broken;
    while (runner.step())
        if (broken.empty()) broken = kv.check();
    CHECK(broken == "");
    out.stats = runner.stats();
    CHECK(kv.held_blocks() == 0);  // every reference count back to zero
    CHECK(kv.check() == "");
    CHECK(kv.cached_blocks() == (prefix_cache ? out.stats.cached_blocks : 0));
    return out;
}

void check_same(const std::vector<Request>& reqs, const Run& a, const Run& b) {
    REQUIRE(a.results.size() == reqs.size());
    REQUIRE(b.results.size() == reqs.size());
    for (const Request& r : reqs) {
        CAPTURE(r.id);
        const Result &x = a.results.at(r.id), &y = b.results.at(r.id);
        CHECK(x.tokens == y.tokens);
        CHECK(x.finish_reason == y.finish_reason);
        CHECK(x.completion_tokens == y.completion_tokens);
        CHECK(x.finish_reason != "error");
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// the bookkeeping alone

TEST_CASE("prefix cache: committed full blocks are found by their tokens and prefix, whole blocks only") {
    KVCache kv(small_config(), 160, 16);  // 10 blocks
    const std::vector<int> a = iota_tokens(40, 3);
    REQUIRE(kv.reserve(0, 40));
    kv.commit(0, a, 20);  // one full block computed
    CHECK(kv.cached_blocks() == 1);
    kv.commit(0, a, 40);  // two; the third (8 positions) is not full
    CHECK(kv.cached_blocks() == 2);
    CHECK(kv.match(a, 39) == std::vector<int>(kv.tables[0].begin(), kv.tables[0].begin() + 2));
    CHECK(kv.match(a, 31).size() == 1);  // at most 31 tokens: one whole block
    CHECK(kv.match(a, 15).empty());
    std::vector<int> b = a;
    b[20] = 7;  // the second block differs
    CHECK(kv.match(b, 39).size() == 1);
    b[3] = 7;  // the first block differs: the second cannot match under another parent
    CHECK(kv.match(b, 39).empty());
    CHECK(kv.check() == "");
    kv.release(0);
    CHECK(kv.held_blocks() == 0);
    CHECK(kv.cached_blocks() == 2);            // idle, still findable
    CHECK(kv.available_blocks() == 10);        // and reusable
    const std::vector<int> hit = kv.match(a, 39);
    CHECK(hit.size() == 2);
    CHECK(kv.idle_count(hit) == 2);
    kv.attach(1, hit);
    CHECK(kv.refs(hit[0]) == 1);
    CHECK(kv.held_blocks() == 2);
    REQUIRE(kv.reserve(1, 40));
    kv.commit(1, a, 40);  // nothing new: the attached blocks are the chain
    CHECK(kv.cached_blocks() == 2);
    CHECK(kv.check() == "");
    kv.prefix_cache = false;
    CHECK(kv.match(a, 39).empty());
    kv.release(1);
    CHECK(kv.check() == "");
}

TEST_CASE("prefix cache: shared blocks are reference-counted; equal blocks computed twice stay one entry") {
    KVCache kv(small_config(), 160, 16);
    const std::vector<int> a = iota_tokens(33, 3);
    REQUIRE(kv.reserve(0, 33));
    REQUIRE(kv.reserve(1, 33));  // the same tokens, computed at the same time
    kv.commit(0, a, 33);
    kv.commit(1, a, 33);
    CHECK(kv.cached_blocks() == 2);  // seq 1's equal blocks stay its own, uncached
    CHECK(kv.match(a, 32) == std::vector<int>(kv.tables[0].begin(), kv.tables[0].begin() + 2));
    kv.attach(2, kv.match(a, 32));
    CHECK(kv.refs(kv.tables[0][0]) == 2);
    CHECK(kv.check() == "");
    kv.release(0);
    CHECK(kv.refs(kv.tables[2][0]) == 1);
    kv.release(1);
    kv.release(2);
    CHECK(kv.held_blocks() == 0);
    CHECK(kv.free_blocks.size() == 8);  // seq 1's three and seq 0's partial block came back free
    CHECK(kv.check() == "");
}

TEST_CASE("prefix cache: idle blocks are evicted least recently released first, deepest first, never held ones") {
    KVCache kv(small_config(), 96, 16);  // 6 blocks
    const std::vector<int> a = iota_tokens(48, 3), b = iota_tokens(32, 200);
    REQUIRE(kv.reserve(0, 48));
    kv.commit(0, a, 48);  // a0 a1 a2
    REQUIRE(kv.reserve(1, 32));
    kv.commit(1, b, 32);  // b0 b1
    const std::vector<int> ta = kv.tables[0], tb = kv.tables[1];
    kv.release(0);  // released first: evicted first, a2 before a1 before a0
    kv.release(1);
    CHECK(kv.cached_blocks() == 5);
    CHECK(kv.match(a, 48).size() == 3);
    REQUIRE(kv.reserve(2, 32));  // the free block, then a2
    CHECK(kv.evictions == 1);
    CHECK(kv.match(a, 48).size() == 2);
    REQUIRE(kv.reserve(2, 48));  // a1
    CHECK(kv.match(a, 48).size() == 1);
    CHECK(kv.match(b, 32).size() == 2);
    // A sequence holding b0 b1: they are never evicted, however short of blocks the cache is.
    kv.attach(3, kv.match(b, 32));
    REQUIRE(kv.reserve(2, 64));  // a0, the last idle block
    CHECK(kv.evictions == 3);
    CHECK(kv.match(a, 48).empty());
    CHECK(kv.available_blocks() == 0);
    CHECK_FALSE(kv.reserve(2, 80));  // b0 and b1 are held: no block to give
    CHECK(kv.match(b, 32) == tb);
    CHECK(kv.is_cached(tb[0]));
    CHECK(kv.is_cached(tb[1]));
    CHECK(kv.check() == "");
    kv.release(2);
    kv.release(3);
    CHECK(kv.held_blocks() == 0);
    CHECK(kv.check() == "");
    CHECK(kv.match(b, 32) == tb);  // idle again, still cached
    CHECK_FALSE(kv.is_cached(ta[0]));
}

TEST_CASE("prefix cache: a forced hash collision never reuses another block's K/V") {
    ConstantHash every_key_is_42;
    KVCache kv(small_config(), 160, 16);
    const std::vector<int> a = iota_tokens(40, 3), b = iota_tokens(40, 100);
    REQUIRE(kv.reserve(0, 40));
    kv.commit(0, a, 40);
    CHECK(kv.cached_blocks() == 1);  // a1's key is a0's: it stays uncached
    CHECK(kv.match(b, 39).empty());  // b0 has a0's key but not its tokens
    CHECK(kv.match(a, 39).size() == 1);
    REQUIRE(kv.reserve(1, 40));
    kv.commit(1, b, 40);
    CHECK(kv.cached_blocks() == 1);
    CHECK(kv.match(b, 39).empty());
    CHECK(kv.check() == "");
    kv.release(0);
    kv.release(1);
    CHECK(kv.check() == "");
}

TEST_CASE("prefix cache: truncating into a cached block of one's own uncaches it") {
    KVCache kv(small_config(), 160, 16);
    const std::vector<int> a = iota_tokens(32, 3);
    REQUIRE(kv.reserve(0, 32));
    kv.commit(0, a, 32);
    CHECK(kv.cached_blocks() == 2);
    kv.truncate(0, 31);  // position 31 will be written again
    CHECK(kv.cached_blocks() == 1);
    CHECK(kv.match(a, 32).size() == 1);
    kv.commit(0, a, 32);  // computed again: cached again
    CHECK(kv.cached_blocks() == 2);
    CHECK(kv.match(a, 32).size() == 2);
    kv.truncate(0, 16);  // whole blocks handed back stay cached
    CHECK(kv.cached_blocks() == 2);
    CHECK(kv.check() == "");
    kv.release(0);
}

namespace {

// Random reserve / compute / commit / attach / truncate / release over a small cache, with a
// shadow of what each block's K/V would hold (the token written at each slot): every attached
// block must hold exactly the tokens it stands for, no write may go into a cached block, and every
// invariant must hold after every operation.
void random_operations(unsigned seed) {
    KVCache kv(small_config(), 24 * 16, 16);
    std::vector<std::vector<int>> shadow(size_t(kv.num_blocks), std::vector<int>(16, -1));
    struct S {
        bool live = false;
        std::vector<int> tokens;
        int computed = 0;
    };
    std::vector<S> seqs(6);
    std::mt19937 rng(seed);
    const std::vector<int> common = iota_tokens(60, 3);  // prompts often start with a piece of it
    auto tok = [&] { return 3 + int(rng() % 2); };
    long hits = 0, writes = 0;
    for (int step = 0; step < 4000; step++) {
        const int id = int(rng() % seqs.size());
        S& s = seqs[size_t(id)];
        const int op = int(rng() % 8);
        if (!s.live) {
            s.tokens.assign(common.begin(), common.begin() + long(rng() % 50));
            for (int n = 1 + int(rng() % 40); n > 0; n--) s.tokens.push_back(tok());
            const int len = int(s.tokens.size());
            const std::vector<int> hit = kv.match(s.tokens, len - 1);
            const int fresh = (len + 15) / 16 - int(hit.size());
            if (kv.available_blocks() - kv.idle_count(hit) < fresh) continue;
            for (size_t i = 0; i < hit.size(); i++)
                for (int j = 0; j < 16; j++) REQUIRE(shadow[size_t(hit[i])][size_t(j)] == s.tokens[i * 16 + size_t(j)]);
            kv.attach(id, hit);
            REQUIRE(kv.reserve(id, len));
            s.live = true;
            s.computed = int(hit.size()) * 16;
            hits += s.computed;
        } else if (op < 4) {  // compute some positions (decoding past the prompt appends tokens)
            const int n = s.computed + 1 + int(rng() % 20);
            while (int(s.tokens.size()) < n) s.tokens.push_back(tok());
            if (n > 200 || !kv.reserve(id, n)) {  // no room: preempted
                kv.release(id);
                s.live = false;
                continue;
            }
            for (int p = s.computed; p < n; p++) {
                const int b = kv.tables[id][size_t(p / 16)];
                REQUIRE_FALSE(kv.is_cached(b));
                REQUIRE(kv.refs(b) == 1);
                shadow[size_t(b)][size_t(p % 16)] = s.tokens[size_t(p)];
                writes++;
            }
            s.computed = n;
            kv.commit(id, s.tokens, s.computed);
        } else if (op < 6) {  // truncate (as speculative rejection does), never into a shared block
            const int n = int(rng() % unsigned(s.computed + 1));
            if (n % 16 != 0 && size_t(n / 16) < kv.tables[id].size() && kv.refs(kv.tables[id][size_t(n / 16)]) > 1)
                continue;
            kv.truncate(id, n);
            s.computed = n;
            s.tokens.resize(size_t(n));
            if (n == 0) {
                kv.release(id);
                s.live = false;
            }
        } else {
            kv.release(id);
            s.live = false;
        }
        const std::string broken = kv.check();
        if (!broken.empty()) {
            CAPTURE(step);
            REQUIRE(broken == "");
        }
    }
    for (size_t id = 0; id < seqs.size(); id++) kv.release(int(id));
    CHECK(kv.held_blocks() == 0);
    CHECK(kv.check() == "");
    CHECK(hits > 0);
    CHECK(writes > 0);
    MESSAGE("random operations: " << hits << " tokens attached, " << writes << " written, " << kv.evictions
                                  << " evictions");
}

}  // namespace

TEST_CASE("prefix cache: random operations keep every invariant and never attach wrong K/V") {
    random_operations(1);
    random_operations(2);
}

TEST_CASE("prefix cache: random operations with every key colliding") {
    ConstantHash every_key_is_42;
    random_operations(3);
}

// ---------------------------------------------------------------------------------------------
// through the scheduler and decode()

TEST_CASE("prefix cache: 32 requests over 4 shared prefixes give the same outputs with and without it") {
    Model& m = stories260k();
    const std::vector<Request> reqs = shared_prefix_requests(32, 1);
    BatchOptions opt;
    opt.max_batch_tokens = 64;  // admissions spread over steps, so later ones find earlier blocks
    opt.max_seqs = 8;
    const int kv_tokens = m.cfg.max_seq_len * 8;
    Run with = run(m, reqs, opt, kv_tokens, true), without = run(m, reqs, opt, kv_tokens, false);
    check_same(reqs, with, without);
    long prompt = 0, cached = 0;
    for (const Request& r : reqs) {
        const Result& x = with.results.at(r.id);
        CHECK(x.cached_tokens % 16 == 0);
        CHECK(x.cached_tokens < int(r.prompt.size()));
        CHECK(without.results.at(r.id).cached_tokens == 0);
        prompt += long(r.prompt.size());
        cached += x.cached_tokens;
    }
    CHECK(with.stats.prefix_query_tokens == prompt);
    CHECK(with.stats.prefix_hit_tokens == cached);
    CHECK(with.stats.prefix_hit_tokens >= 200);  // the 37- and 70-token prefixes' blocks, and the repeats
    CHECK(with.stats.evictions == 0);
    CHECK(without.stats.prefix_hit_tokens == 0);
    CHECK(with.stats.preemptions == 0);
    CHECK(without.stats.preemptions == 0);
    // Every token not found in the cache was computed once.
    CHECK(with.stats.computed_tokens + with.stats.prefix_hit_tokens == without.stats.computed_tokens);
}

TEST_CASE("prefix cache: a KV budget too small for every cached block evicts; all requests complete unchanged") {
    Model& m = stories260k();
    const std::vector<Request> reqs = shared_prefix_requests(32, 2);
    BatchOptions opt;
    opt.max_batch_tokens = 64;
    opt.max_seqs = 4;
    // 48 blocks: room for the running sequences, not for all ~150 distinct blocks computed.
    Run with = run(m, reqs, opt, 48 * 16, true), without = run(m, reqs, opt, 48 * 16, false);
    check_same(reqs, with, without);
    CHECK(with.stats.evictions > 0);
    CHECK(with.stats.prefix_hit_tokens > 0);
    CHECK(with.stats.cached_blocks <= 48);
}

TEST_CASE("prefix cache: a preempted sequence resumes over its own cached blocks; outputs unchanged") {
    Model& m = stories260k();
    const std::vector<Request> reqs = shared_prefix_requests(24, 3, 80);  // long answers, so sequences grow
    BatchOptions opt;
    opt.max_batch_tokens = 64;
    opt.max_seqs = 12;
    Run with = run(m, reqs, opt, 384, true), without = run(m, reqs, opt, 384, false);
    check_same(reqs, with, without);
    CHECK(with.stats.preemptions > 0);
    CHECK(without.stats.preemptions > 0);
    CHECK(with.stats.resume_hit_tokens > 0);
    CHECK(without.stats.resume_hit_tokens == 0);
    CHECK(with.stats.computed_tokens < without.stats.computed_tokens);
}

TEST_CASE("prefix cache: with every key colliding, outputs are unchanged and only equal blocks are reused") {
    Model& m = stories260k();
    const std::vector<Request> reqs = shared_prefix_requests(32, 4);
    BatchOptions opt;
    opt.max_batch_tokens = 64;
    opt.max_seqs = 8;
    const int kv_tokens = m.cfg.max_seq_len * 8;
    Run without = run(m, reqs, opt, kv_tokens, false);
    ConstantHash every_key_is_42;
    Run with = run(m, reqs, opt, kv_tokens, true);
    check_same(reqs, with, without);
    CHECK(with.stats.cached_blocks == 1);  // one key: one block can be cached at a time
}

TEST_CASE("prefix cache: decode() reuses a cached prompt (and --interactive's turns), with the same output") {
    Model& m = stories260k();
    const std::vector<int> prompt = random_tokens(45, 512, 9);
    auto solo = [&](KVCache& kv, const std::vector<int>& p, int cached, DecodeStats* st) {
        Sampler s(SamplingParams{0.8f, 40, 1.0f}, 7);
        std::vector<int> out;
        *st = decode(m, kv, p, 30, s, nullptr, 0, [&](int id) {
            out.push_back(id);
            return true;
        }, cached);
        return out;
    };
    KVCache fresh(m.cfg, m.cfg.max_seq_len), kv(m.cfg, m.cfg.max_seq_len), off(m.cfg, m.cfg.max_seq_len);
    off.prefix_cache = false;
    DecodeStats st;
    const std::vector<int> want = solo(fresh, prompt, 0, &st);
    CHECK(st.cached_tokens == 0);
    solo(kv, random_tokens(60, 512, 9), 0, &st);  // the same first 45 tokens, then others
    CHECK(solo(kv, prompt, 0, &st) == want);
    CHECK(st.cached_tokens == 32);  // two whole blocks of the first 44 tokens
    CHECK(solo(off, prompt, 0, &st) == want);
    CHECK(solo(off, prompt, 0, &st) == want);
    CHECK(st.cached_tokens == 0);
    // A kept conversation (cached > 0) goes on as before, its new full blocks committed as well.
    std::vector<int> turn2 = prompt;
    turn2.insert(turn2.end(), want.begin(), want.end());
    for (int i = 0; i < 20; i++) turn2.push_back(3 + i);
    DecodeStats st2;
    KVCache fresh2(m.cfg, m.cfg.max_seq_len);
    const std::vector<int> want2 = solo(fresh2, turn2, 0, &st2);
    CHECK(solo(kv, turn2, int(prompt.size() + want.size()) - 1, &st) == want2);
    CHECK(st.cached_tokens == int(prompt.size() + want.size()) - 1);
    CHECK(kv.check() == "");
    kv.release(0);
    CHECK(solo(kv, turn2, 0, &st) == want2);  // a new sequence over the whole conversation's blocks
    CHECK(st.cached_tokens == (int(turn2.size()) - 1) / 16 * 16);
    CHECK(kv.check() == "");
}
