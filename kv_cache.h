// kv_cache.h: the paged KV cache: fixed-size blocks of positions, a block table per sequence, a
// free list, and automatic prefix caching (full blocks keyed by a hash chain, shared by reference
// count, evicted least recently used).
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ops.h"

struct Config;

// Storage per layer: [num_blocks][block_size][n_kv_heads * head_dim] for K and for V, in the
// backend's memory and its kv_dtype() (f32 on the CPU, bf16 on CUDA). The block bookkeeping is
// host-side; the storage is allocated by the first forward that uses the cache (or allocate()).
//
// Prefix caching. A full block whose positions are all computed is committed: keyed by
// hash(its parent's key, its tokens) and stored with its tokens and its parent (block id and that
// block's generation), so a later sequence whose tokens begin the same way attaches it instead of
// computing it again. Lookup walks the tokens a block at a time and checks each candidate's stored
// tokens and parent, so a hash collision is only ever a miss; a block's generation counts the times
// its content was given up, so a child never matches under a parent id that now holds something
// else. Each block is in exactly one state:
//   free  on free_blocks, holding nothing;
//   held  in refs > 0 block tables (cached or not); never evicted;
//   idle  cached, held by no sequence: a lookup can still attach it; when the free list runs dry
//         reserve() evicts the least recently released one, the deepest of a chain first (so a
//         chain's parents outlive their children).
// Only full, committed blocks are shared, and sequences write only past their computed positions,
// so nothing ever writes into a block that another sequence reads.
struct KVCache {
    int block_size = 16;
    int num_blocks = 0;
    int n_layers = 0;
    int kv_dim = 0;  // n_kv_heads * head_dim
    DType dtype = DType::F32;                  // of k and v, once allocated
    Buffer k, v;                               // [n_layers][num_blocks][block_size][kv_dim]
    std::vector<int> free_blocks;              // stack of free block ids
    std::map<int, std::vector<int>> tables;    // sequence id -> its blocks, in position order
    bool prefix_cache = true;  // false (--no-prefix-cache): match() finds nothing, commit() keeps nothing
    long evictions = 0;        // idle cached blocks given to new content

    // The key of a block: its tokens chained to its parent's key (0 for a first block). A test hook:
    // tests set a constant function to force collisions; correctness never depends on it.
    static uint64_t (*hash)(uint64_t parent_key, const int* tokens, int n);
    static uint64_t default_hash(uint64_t parent_key, const int* tokens, int n);

    KVCache(const Config& c, int capacity_tokens, int block_size = 16);
    // Make room for positions [0, n_tokens) of seq (evicting idle cached blocks when no free ones
    // are left); false (and no change) when blocks run out.
    bool reserve(int seq, int n_tokens);
    // Keep positions [0, n_tokens) of seq, handing blocks past them back. A kept block that is
    // cached and only partly kept stops being cached (seq will write into it); it must be seq's alone.
    void truncate(int seq, int n_tokens);
    void release(int seq);
    int capacity_tokens() const { return num_blocks * block_size; }
    int available_blocks() const { return int(free_blocks.size() + idle_.size()); }  // free + idle
    int free_tokens() const { return available_blocks() * block_size; }
    int held_blocks() const { return num_blocks - available_blocks(); }  // in some block table
    int cached_blocks() const { return int(by_key_.size()); }           // held or idle
    int refs(int block) const { return blocks_[size_t(block)].refs; }
    bool is_cached(int block) const { return blocks_[size_t(block)].cached; }

    // --- prefix caching
    // The longest chain of cached blocks that begins `tokens`, covering at most max_tokens of them
    // (whole blocks only). Empty when prefix_cache is off.
    std::vector<int> match(const std::vector<int>& tokens, int max_tokens) const;
    // How many of these blocks no sequence holds (attaching them takes them out of available_blocks()).
    int idle_count(const std::vector<int>& blocks) const;
    // seq, holding nothing, starts with these blocks (a match() of its tokens); positions
    // [0, blocks.size() * block_size) are then computed.
    void attach(int seq, const std::vector<int>& blocks);
    // Positions [0, n_computed) of seq are computed and hold tokens[0, n_computed): cache its full
    // blocks among them not yet cached. Cheap when there is nothing new.
    void commit(int seq, const std::vector<int>& tokens, int n_computed);
    // Every invariant of the bookkeeping (block states, reference counts, keys); "" when all hold,
    // else the first broken one. For tests.
    std::string check() const;

    // Storage in `ops`'s memory (once; later calls with the same backend do nothing).
    void allocate(Ops* ops);
    size_t layer_bytes() const { return size_t(num_blocks) * block_size * kv_dim * dtype_size(dtype); }
    size_t bytes() const { return k.bytes() + v.bytes(); }  // 0 until allocated
    void* k_layer(int l) { return static_cast<uint8_t*>(k.data()) + size_t(l) * layer_bytes(); }
    void* v_layer(int l) { return static_cast<uint8_t*>(v.data()) + size_t(l) * layer_bytes(); }

  private:
    struct Block {
        int refs = 0;             // block tables holding it
        bool cached = false;      // committed: by_key_[key] is this block
        uint64_t key = 0;
        int parent = -1;          // the previous block of its chain (-1: a first block) ...
        uint32_t parent_gen = 0;  // ... and that block's generation when this one was committed
        uint32_t gen = 0;         // bumped each time it stops being cached
        int depth = 0;            // index in its chain
        uint64_t released = 0;    // clock_ when it last became idle (LRU)
        std::vector<int> tokens;  // [block_size] while cached
    };
    // A block of a sequence's chain as lookups find it: its own block, or an equal one already
    // cached (two sequences that computed the same prefix at once).
    struct Link {
        int block;
        uint32_t gen;
        uint64_t key;
    };
    struct Chain {
        std::vector<Link> links;  // the sequence's first links.size() blocks, committed
        bool broken = false;      // a block's key was taken by other content: commit no further
    };
    using IdleKey = std::tuple<uint64_t, int, int>;  // (released, -depth, block): evicted in order
    std::vector<Block> blocks_;                      // [num_blocks]
    std::unordered_map<uint64_t, int> by_key_;       // key -> the cached block
    std::set<IdleKey> idle_;
    std::map<int, Chain> chains_;                    // sequence id -> its committed chain
    uint64_t clock_ = 0;

    IdleKey idle_key(int b) const { return {blocks_[size_t(b)].released, -blocks_[size_t(b)].depth, b}; }
    // Whether cached block b is the block after `prev` (null: a first block) holding `tokens`.
    bool verifies(int b, const Link* prev, const int* tokens) const;
    int take_block();         // a free block, else an evicted idle one, else -1
    void drop_ref(int b);     // one table fewer holds b: idle or free when none does
    void uncache(int b);      // b's content is no longer findable
    Ops* ops_ = nullptr;      // whose memory k and v are in
};
