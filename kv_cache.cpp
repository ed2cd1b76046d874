// kv_cache.cpp: the paged KV cache's block bookkeeping: reserving, truncating and releasing a
// sequence's blocks, and the prefix cache over them (match, attach, commit, LRU eviction).
#include "kv_cache.h"

#include <algorithm>
#include <cassert>

#include "common.h"
#include "model.h"

// ---------------------------------------------------------------------------------------------
// blocks

uint64_t KVCache::default_hash(uint64_t parent_key, const int* tokens, int n) {
    // splitmix64's finalizer over the parent's key and each token: well mixed, and the same on every
    // rank and every run (tensor-parallel ranks must make the same cache decisions).
    auto mix = [](uint64_t x) {
        x ^= x >> 30;
        x *= 0xbf58476d1ce4e5b9ull;
        x ^= x >> 27;
        x *= 0x94d049bb133111ebull;
        return x ^ (x >> 31);
    };
    uint64_t h = mix(parent_key + 0x9e3779b97f4a7c15ull);
    for (int i = 0; i < n; i++) h = mix(h ^ uint32_t(tokens[i]));
    return h;
}

uint64_t (*KVCache::hash)(uint64_t, const int*, int) = KVCache::default_hash;

KVCache::KVCache(const Config& c, int capacity_tokens, int bs)
    : block_size(bs), num_blocks((capacity_tokens + bs - 1) / bs), n_layers(c.n_layers),
      kv_dim(c.n_kv_heads * c.head_dim), blocks_(size_t(num_blocks)) {
    for (int b = num_blocks - 1; b >= 0; b--) free_blocks.push_back(b);  // pop gives block 0 first
}

int KVCache::take_block() {
    if (!free_blocks.empty()) {
        const int b = free_blocks.back();
        free_blocks.pop_back();
        return b;
    }
    if (idle_.empty()) return -1;
    const int b = std::get<2>(*idle_.begin());  // released longest ago, deepest first
    idle_.erase(idle_.begin());
    uncache(b);
    evictions++;
    return b;
}

void KVCache::drop_ref(int b) {
    Block& k = blocks_[size_t(b)];
    assert(k.refs > 0);
    if (--k.refs > 0) return;
    if (k.cached) {
        k.released = clock_;
        idle_.insert(idle_key(b));
    } else {
        free_blocks.push_back(b);
    }
}

void KVCache::uncache(int b) {
    Block& k = blocks_[size_t(b)];
    if (!k.cached) return;
    auto it = by_key_.find(k.key);
    assert(it != by_key_.end() && it->second == b);
    by_key_.erase(it);
    k.cached = false;
    k.gen++;
    k.tokens.clear();
}

bool KVCache::reserve(int seq, int n_tokens) {
    std::vector<int>& t = tables[seq];
    size_t need = size_t((n_tokens + block_size - 1) / block_size);
    if (need <= t.size()) return true;
    if (need - t.size() > size_t(available_blocks())) return false;
    while (t.size() < need) {
        const int b = take_block();
        assert(b >= 0);
        blocks_[size_t(b)].refs = 1;
        t.push_back(b);
    }
    return true;
}

void KVCache::truncate(int seq, int n_tokens) {
    auto it = tables.find(seq);
    if (it == tables.end()) return;
    std::vector<int>& t = it->second;
    size_t keep = size_t((n_tokens + block_size - 1) / block_size);
    clock_++;  // the blocks handed back now were used last now
    while (t.size() > keep) {
        drop_ref(t.back());
        t.pop_back();
    }
    if (n_tokens % block_size != 0 && !t.empty() && t.size() == keep) {
        // The last kept block is partly kept: its later positions will be written again.
        const int b = t.back();
        assert((!blocks_[size_t(b)].cached || blocks_[size_t(b)].refs == 1) &&
               "truncate: a shared cached block cannot be partly kept");
        uncache(b);
    }
    auto c = chains_.find(seq);
    if (c != chains_.end() && size_t(n_tokens / block_size) <= c->second.links.size()) {
        c->second.links.resize(size_t(n_tokens / block_size));
        c->second.broken = false;  // the block that broke the chain will be computed again
    }
}

void KVCache::release(int seq) {
    truncate(seq, 0);
    tables.erase(seq);
    chains_.erase(seq);
}

void KVCache::allocate(Ops* ops) {
    if (ops_ == ops) return;
    assert(!ops_ && "KVCache: one cache serves one backend");
    ops_ = ops;
    dtype = ops->kv_dtype();
    k = Buffer(ops, size_t(n_layers) * layer_bytes());
    v = Buffer(ops, size_t(n_layers) * layer_bytes());
}

// ---------------------------------------------------------------------------------------------
// prefix caching

bool KVCache::verifies(int b, const Link* prev, const int* tokens) const {
    const Block& k = blocks_[size_t(b)];
    if (!k.cached) return false;
    if (prev ? (k.parent != prev->block || k.parent_gen != prev->gen) : k.parent != -1) return false;
    return std::equal(k.tokens.begin(), k.tokens.end(), tokens);
}

std::vector<int> KVCache::match(const std::vector<int>& tokens, int max_tokens) const {
    std::vector<int> out;
    if (!prefix_cache) return out;
    const int n = std::min(max_tokens, int(tokens.size())) / block_size;
    Link prev{-1, 0, 0};
    for (int i = 0; i < n; i++) {
        const int* at = tokens.data() + size_t(i) * block_size;
        const uint64_t key = hash(i == 0 ? 0 : prev.key, at, block_size);
        auto it = by_key_.find(key);
        if (it == by_key_.end() || !verifies(it->second, i == 0 ? nullptr : &prev, at)) break;
        out.push_back(it->second);
        prev = {it->second, blocks_[size_t(it->second)].gen, key};
    }
    return out;
}

int KVCache::idle_count(const std::vector<int>& blocks) const {
    int n = 0;
    for (int b : blocks) n += blocks_[size_t(b)].refs == 0;
    return n;
}

void KVCache::attach(int seq, const std::vector<int>& blocks) {
    std::vector<int>& t = tables[seq];
    assert(t.empty() && "attach: the sequence must hold nothing");
    Chain& c = chains_[seq];
    c = Chain{};
    for (int b : blocks) {
        Block& k = blocks_[size_t(b)];
        assert(k.cached);
        if (k.refs++ == 0) idle_.erase(idle_key(b));
        t.push_back(b);
        c.links.push_back({b, k.gen, k.key});
    }
}

void KVCache::commit(int seq, const std::vector<int>& tokens, int n_computed) {
    if (!prefix_cache) return;
    auto t = tables.find(seq);
    if (t == tables.end()) return;
    Chain& c = chains_[seq];
    const size_t full = std::min(t->second.size(), size_t(std::min(n_computed, int(tokens.size())) / block_size));
    while (!c.broken && c.links.size() < full) {
        const size_t i = c.links.size();
        const int* at = tokens.data() + i * size_t(block_size);
        const Link* prev = i == 0 ? nullptr : &c.links.back();
        const uint64_t key = hash(prev ? prev->key : 0, at, block_size);
        const int own = t->second[i];
        assert(!blocks_[size_t(own)].cached && "commit: a block past the chain is cached");
        auto it = by_key_.find(key);
        if (it != by_key_.end()) {
            const int b = it->second;
            if (verifies(b, prev, at)) {  // the same content, cached by another sequence meanwhile
                c.links.push_back({b, blocks_[size_t(b)].gen, key});
                continue;
            }
            const Block& other = blocks_[size_t(b)];
            const bool orphan = other.parent >= 0 && blocks_[size_t(other.parent)].gen != other.parent_gen;
            if (other.refs > 0 || !orphan) {  // a collision with live content: ours stays uncached
                c.broken = true;
                break;
            }
            // An idle block whose parent is gone can never be found again: it gives up its key.
            idle_.erase(idle_key(b));
            uncache(b);
            free_blocks.push_back(b);
        }
        Block& k = blocks_[size_t(own)];
        k.cached = true;
        k.key = key;
        k.parent = prev ? prev->block : -1;
        k.parent_gen = prev ? prev->gen : 0;
        k.depth = int(i);
        k.tokens.assign(at, at + block_size);
        by_key_[key] = own;
        c.links.push_back({own, k.gen, key});
    }
}

std::string KVCache::check() const {
    std::vector<int> seen(size_t(num_blocks), 0), refs(size_t(num_blocks), 0);
    for (int b : free_blocks) {
        if (b < 0 || b >= num_blocks) return fmt("free block %d out of range", b);
        if (seen[size_t(b)]++) return fmt("block %d is on the free list twice", b);
        const Block& k = blocks_[size_t(b)];
        if (k.refs != 0 || k.cached) return fmt("free block %d has refs %d, cached %d", b, k.refs, int(k.cached));
    }
    for (const IdleKey& i : idle_) {
        const int b = std::get<2>(i);
        if (seen[size_t(b)]++) return fmt("idle block %d is also free or idle twice", b);
        const Block& k = blocks_[size_t(b)];
        if (k.refs != 0 || !k.cached) return fmt("idle block %d has refs %d, cached %d", b, k.refs, int(k.cached));
        if (i != idle_key(b)) return fmt("idle block %d is filed under a stale LRU key", b);
    }
    for (const auto& [seq, t] : tables) {
        for (size_t i = 0; i < t.size(); i++) {
            const int b = t[i];
            if (b < 0 || b >= num_blocks) return fmt("sequence %d holds block %d, out of range", seq, b);
            if (std::find(t.begin(), t.begin() + long(i), b) != t.begin() + long(i))
                return fmt("sequence %d holds block %d twice", seq, b);
            refs[size_t(b)]++;
        }
    }
    int cached = 0;
    for (int b = 0; b < num_blocks; b++) {
        const Block& k = blocks_[size_t(b)];
        if (k.refs != refs[size_t(b)]) return fmt("block %d: refs %d but %d tables hold it", b, k.refs, refs[size_t(b)]);
        if (k.refs > 0 && seen[size_t(b)]) return fmt("block %d is held and also free or idle", b);
        if (k.refs == 0 && !seen[size_t(b)]) return fmt("block %d is lost: not held, free or idle", b);
        if (!k.cached) continue;
        cached++;
        auto it = by_key_.find(k.key);
        if (it == by_key_.end() || it->second != b) return fmt("cached block %d is not found under its key", b);
        if (int(k.tokens.size()) != block_size) return fmt("cached block %d holds %zu tokens", b, k.tokens.size());
    }
    if (cached != int(by_key_.size())) return fmt("%zu keys but %d cached blocks", by_key_.size(), cached);
    for (const auto& [seq, c] : chains_) {
        auto t = tables.find(seq);
        if (t == tables.end()) return fmt("sequence %d has a chain but no table", seq);
        if (c.links.size() > t->second.size())
            return fmt("sequence %d: %zu committed blocks of %zu", seq, c.links.size(), t->second.size());
        for (size_t i = 0; i < c.links.size(); i++)
            if (c.links[i].block == t->second[i] && !blocks_[size_t(t->second[i])].cached)
                return fmt("sequence %d: committed block %zu (%d) is not cached", seq, i, t->second[i]);
    }
    return "";
}
