// kernels_attention.cuh: the attention kernels of the CUDA backend. Part of kernels.cu, which
// includes it once, inside its anonymous namespace, after the helpers these kernels use (warp
// reductions, load_kv, kWarp); kept apart because attention is an idea of its own (~380 lines).

// ---------------------------------------------------------------------------------------------
// attention over the paged cache (flash-decoding)
//
// Block (split s, KV head, token t) takes positions [s * L, (s + 1) * L) of the token's 0..pos,
// L = token_split_len (the token's own length over the splits), and all `group` query heads that share the KV head, so each cached K/V row is
// read once per group. Keys go in chunks of 32: one warp per key computes the group's scores
// (lanes split head_dim), then an online softmax (running max and sum per head) rescales the
// accumulators, which threads hold as (head, dim) pairs. Each block writes its unnormalised
// output with its max and sum; attention_combine_kernel merges a token's splits. The number of
// splits depends only on the batch size and the context length, never on the positions, so a
// captured step stays valid; blocks past a token's position exit at once. With skip_runs, tokens
// that share their block table with a neighbour are the tiled kernel's (below) and exit at once.

constexpr int kAttnThreads = 256, kAttnChunk = 32, kAttnMaxAcc = 16;  // group * head_dim <= 4096

// The positions one split of the split kernel's token takes: the token's len over the launch's
// splits, in whole chunks. (Not the launch's split_len: that is sized for the longest context the
// model allows, and Llama 3.1's 131072 over 33 splits would leave a 3000-token context in one
// split, one block per KV head.)
__device__ __forceinline__ int token_split_len(int len, int splits) {
    return ((len + splits - 1) / splits + kAttnChunk - 1) / kAttnChunk * kAttnChunk;
}

// Whether token t of n shares its block table with a neighbour in the batch: it belongs to a run
// (AttentionBatch) and the tiled kernel computes it; otherwise (a decode token) the split kernel.
__device__ __forceinline__ bool in_run(const AttentionBatch& b, int t, int n) {
    const int off = b.table_offsets[t];
    return (t > 0 && b.table_offsets[t - 1] == off) || (t + 1 < n && b.table_offsets[t + 1] == off);
}

template <typename KV>
__global__ void __launch_bounds__(kAttnThreads)
attention_split_kernel(float* o_part, float* ml_part, const float* q, const KV* k_cache, const KV* v_cache,
                       const AttentionBatch b, int n, bool skip_runs, int splits) {
    extern __shared__ float smem[];
    const int s = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
    const int hd = b.head_dim, group = b.n_heads / b.n_kv_heads, kv_dim = b.n_kv_heads * hd;
    const int len = b.positions[t] + 1, split_len = token_split_len(len, splits);
    const int start = s * split_len, end = min(len, start + split_len);
    if (start >= len || (skip_runs && in_run(b, t, n))) return;
    float* qs = smem;                              // [group][hd], pre-scaled
    float* sc = qs + group * hd;                   // [group][kAttnChunk] scores, then weights
    float* corr = sc + group * kAttnChunk;         // [group] rescale of the accumulators
    float* run_m = corr + group;                   // [group] running max
    float* run_l = run_m + group;                  // [group] running sum
    int* slot = reinterpret_cast<int*>(run_l + group);  // [kAttnChunk] cache slots of the chunk
    const float scale = rsqrtf(float(hd));
    const float* qt = q + (size_t(t) * b.n_heads + size_t(kvh) * group) * hd;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) qs[i] = qt[i] * scale;
    for (int g = threadIdx.x; g < group; g += blockDim.x) run_m[g] = -INFINITY, run_l[g] = 0.0f;
    const int* table = b.block_tables + b.table_offsets[t];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nwarps = blockDim.x / kWarp;
    float acc[kAttnMaxAcc];
#pragma unroll
    for (int j = 0; j < kAttnMaxAcc; j++) acc[j] = 0.0f;

    for (int c0 = start; c0 < end; c0 += kAttnChunk) {
        const int nk = min(kAttnChunk, end - c0);
        if (threadIdx.x < kAttnChunk) {
            const int p = c0 + threadIdx.x;
            slot[threadIdx.x] = threadIdx.x < nk ? table[p / b.block_size] * b.block_size + p % b.block_size : 0;
        }
        __syncthreads();
        for (int j = warp; j < kAttnChunk; j += nwarps) {
            const KV* kp = k_cache + size_t(slot[j]) * kv_dim + size_t(kvh) * hd;
            for (int g = 0; g < group; g++) {
                float d = 0.0f;
                if (j < nk)
                    for (int i = lane; i < hd; i += kWarp) d += qs[g * hd + i] * load_kv(kp + i);
                d = warp_sum(d);
                if (lane == 0) sc[g * kAttnChunk + j] = j < nk ? d : -INFINITY;
            }
        }
        __syncthreads();
        for (int g = warp; g < group; g += nwarps) {  // one lane per key of the chunk
            const float v = sc[g * kAttnChunk + lane];
            const float m_new = fmaxf(run_m[g], warp_max(v));
            const float p = lane < nk ? expf(v - m_new) : 0.0f;
            const float sum = warp_sum(p);
            sc[g * kAttnChunk + lane] = p;
            __syncwarp();
            if (lane == 0) {
                corr[g] = expf(run_m[g] - m_new);  // 0 on the first chunk (run_m = -inf)
                run_l[g] = run_l[g] * corr[g] + sum;
                run_m[g] = m_new;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kAttnMaxAcc; j++) {
            const int idx = threadIdx.x + j * kAttnThreads;
            if (idx >= group * hd) break;
            const int g = idx / hd, d = idx % hd;
            float a = acc[j] * corr[g];
            for (int p = 0; p < nk; p++) a += sc[g * kAttnChunk + p] * load_kv(v_cache + size_t(slot[p]) * kv_dim + size_t(kvh) * hd + d);
            acc[j] = a;
        }
        __syncthreads();
    }
    const size_t head0 = size_t(t) * b.n_heads + size_t(kvh) * group;
#pragma unroll
    for (int j = 0; j < kAttnMaxAcc; j++) {
        const int idx = threadIdx.x + j * kAttnThreads;
        if (idx >= group * hd) break;
        const int g = idx / hd, d = idx % hd;
        o_part[((head0 + g) * splits + s) * hd + d] = acc[j];
    }
    for (int g = threadIdx.x; g < group; g += blockDim.x) {
        ml_part[((head0 + g) * splits + s) * 2] = run_m[g];
        ml_part[((head0 + g) * splits + s) * 2 + 1] = run_l[g];
    }
}

// One block per (head, token): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the
// splits that hold any of the token's positions (split_len for the tiled kernel's tokens).
__global__ void attention_combine_kernel(float* out, const float* o_part, const float* ml_part, const AttentionBatch b,
                                         int n, bool tiled, int splits, int split_len) {
    const int h = blockIdx.x, t = blockIdx.y, hd = b.head_dim, len = b.positions[t] + 1;
    const int sl = tiled && in_run(b, t, n) ? split_len : token_split_len(len, splits);
    const int used = (len + sl - 1) / sl;
    const size_t base = size_t(t) * b.n_heads + h;
    float M = -INFINITY;
    for (int s = 0; s < used; s++) M = fmaxf(M, ml_part[(base * splits + s) * 2]);
    float L = 0.0f;
    for (int s = 0; s < used; s++) L += expf(ml_part[(base * splits + s) * 2] - M) * ml_part[(base * splits + s) * 2 + 1];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < used; s++) o += expf(ml_part[(base * splits + s) * 2] - M) * o_part[(base * splits + s) * hd + d];
        out[base * hd + d] = o / L;
    }
}

// ---------------------------------------------------------------------------------------------
// attention over runs of tokens that share a block table (prefill chunks, verify runs): tiled
//
// FlashAttention-2's scheme over the paged cache. For one KV head the queries are rows of
// (token, query head of its group) in batch order, row = token * group + g. Block (row tile, KV
// head, split) takes kTileRows consecutive rows; each of its 4 warps owns 16 of them and keeps
// their [16][head_dim] outputs in tensor-core accumulators (registers). The tile's rows fall into
// segments of adjacent tokens with one block table (a tile may end one sequence's run and start the
// next one's); for each segment the block walks the split's keys up to the segment's last position
// in tiles of kTileKeys: the K and V rows are gathered from the cache pages into shared memory once
// and serve every row of the tile, i.e. all the query heads of the group (GQA) and all the tokens.
// Per key tile each warp computes S = Q K^T (16 x kTileKeys) on the tensor cores, bf16 operands
// and f32 accumulation; Q enters as two bf16 parts (hi + lo, 16 significant bits) so the scores
// keep f32-level accuracy like the CPU twin's. An online softmax over S (causal: keys past a row's
// position are masked) gives P, which enters the same way (hi + lo) into O += P V. Dropping the lo
// parts would halve the tensor work at bf16-level accuracy. The results go out unnormalised with
// each row's max and sum into the flash-decoding kernel's per-split buffers, and
// attention_combine_kernel finishes both kinds. Tokens that share their table with neither
// neighbour (decode tokens) are skipped here: the flash-decoding kernel takes them.
//
// WMMA keeps the fragment layouts its own: S goes through shared memory for the softmax, and the
// row of each accumulator element (for rescaling O per row) is read once from a loaded tile of
// row numbers.

constexpr int kTileWarps = 4, kTileRows = 16 * kTileWarps, kTileKeys = 32;
constexpr int kLdS = kTileKeys + 4;  // f32 scores [16][kLdS] per warp: a multiple of 4 floats (wmma)
constexpr int kLdP = kTileKeys + 8;  // bf16 P [16][kLdP] per warp: a multiple of 8 halves (wmma)
static_assert(kTileKeys == 32, "the softmax gives each row two lanes of 16 keys");

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// The tiled kernel's shared memory for one head_dim (host and device compute it alike). Every
// matrix starts 128-byte aligned (wmma needs 32); bf16 rows are head_dim + 8 long, so each row is a
// whole number of 16-byte pieces and successive rows start 4 banks apart.
struct TileSmem {
    int ld;                                        // row stride of q_hi, q_lo, k, v (bf16 elements)
    size_t q_hi, q_lo;                             // [kTileRows][ld] Q / sqrt(head_dim), bf16 parts
    size_t k, v;                                   // [kTileKeys][ld] the key tile's K and V rows
    size_t s;                                      // [kTileWarps][16][kLdS] f32 scores (and staging)
    size_t p_hi, p_lo;                             // [kTileWarps][16][kLdP] softmax weights, bf16 parts
    size_t rows;                                   // int tok, off, pos, run; float m, l, corr [kTileRows]
    size_t slots;                                  // int [kTileKeys] cache slots of the key tile
    size_t bytes;
    __host__ __device__ explicit TileSmem(int head_dim) {
        ld = head_dim + 8;
        const size_t qb = align128(2 * size_t(kTileRows) * ld), kb = align128(2 * size_t(kTileKeys) * ld);
        q_hi = 0, q_lo = qb, k = 2 * qb, v = k + kb, s = v + kb;
        p_hi = s + align128(4 * size_t(kTileWarps) * 16 * kLdS);
        p_lo = p_hi + align128(2 * size_t(kTileWarps) * 16 * kLdP);
        rows = p_lo + align128(2 * size_t(kTileWarps) * 16 * kLdP);
        slots = rows + 7 * 4 * size_t(kTileRows);
        bytes = slots + 4 * size_t(kTileKeys);
    }
};

// kFrags: head_dim / 16 at most (the warp's output accumulators, kept in registers).
template <int kFrags>
__global__ void __launch_bounds__(kTileWarps * kWarp)
attention_tiled_kernel(float* o_part, float* ml_part, const float* q, const __nv_bfloat16* k_cache,
                       const __nv_bfloat16* v_cache, const AttentionBatch b, int n, int splits, int split_len) {
    namespace wmma = nvcuda::wmma;
    using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
    extern __shared__ __align__(128) unsigned char tile_smem[];
    const int hd = b.head_dim, nf = hd / 16, group = b.n_heads / b.n_kv_heads, kv_dim = b.n_kv_heads * hd;
    const int kvh = blockIdx.y, split = blockIdx.z, row0 = blockIdx.x * kTileRows, total = n * group;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, wr0 = warp * 16;  // the warp's rows
    const TileSmem L(hd);
    const int ld = L.ld;
    __nv_bfloat16* q_hi = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.q_hi);
    __nv_bfloat16* q_lo = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.q_lo);
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.k);
    __nv_bfloat16* v_s = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.v);
    float* s_w = reinterpret_cast<float*>(tile_smem + L.s) + warp * 16 * kLdS;
    __nv_bfloat16* ph_w = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.p_hi) + warp * 16 * kLdP;
    __nv_bfloat16* pl_w = reinterpret_cast<__nv_bfloat16*>(tile_smem + L.p_lo) + warp * 16 * kLdP;
    int* row_tok = reinterpret_cast<int*>(tile_smem + L.rows);  // token of the row; -1 past the batch
    int* row_off = row_tok + kTileRows;                          // its table offset
    int* row_pos = row_off + kTileRows;                          // its position
    int* row_run = row_pos + kTileRows;                          // 1: its token is in a run (ours)
    float* row_m = reinterpret_cast<float*>(row_run + kTileRows);  // running max of the scores
    float* row_l = row_m + kTileRows;                              // running sum of e^(s - m)
    float* row_corr = row_l + kTileRows;                           // this key tile's rescale of O
    int* slot = reinterpret_cast<int*>(tile_smem + L.slots);

    for (int r = threadIdx.x; r < kTileRows; r += blockDim.x) {
        const int R = row0 + r, t = R < total ? R / group : -1;
        row_tok[r] = t;
        row_off[r] = t >= 0 ? b.table_offsets[t] : 0;
        row_pos[r] = t >= 0 ? b.positions[t] : 0;
        row_run[r] = t >= 0 && in_run(b, t, n);
    }
    // Q / sqrt(head_dim) as bf16 hi + lo (lo: the rounding error of hi, itself rounded); zero past
    // the batch
    const float scale = rsqrtf(float(hd));
    for (int i = threadIdx.x; i < kTileRows * hd; i += blockDim.x) {
        const int r = i / hd, d = i % hd, R = row0 + r;
        float x = 0.0f;
        if (R < total) x = q[(size_t(R / group) * b.n_heads + size_t(kvh) * group + R % group) * hd + d] * scale;
        const __nv_bfloat16 hi = __float2bfloat16_rn(x);
        q_hi[r * ld + d] = hi;
        q_lo[r * ld + d] = __float2bfloat16_rn(x - __bfloat162float(hi));
    }
    // The row (0..15) of each accumulator element of this lane, from a tile holding row numbers.
    for (int i = lane; i < 16 * 16; i += kWarp) s_w[(i / 16) * kLdS + i % 16] = float(i / 16);
    __syncwarp();
    Acc rowmap;
    wmma::load_matrix_sync(rowmap, s_w, kLdS, wmma::mem_row_major);
    __syncthreads();

    for (int a = 0; a < kTileRows && row_tok[a] >= 0;) {
        // the segment [sa, se): adjacent rows whose tokens share a block table
        const int sa = a;
        int se = a + 1, last = row_pos[a];
        while (se < kTileRows && row_tok[se] >= 0 && row_off[se] == row_off[sa]) last = max(last, row_pos[se++]);
        a = se;
        const int k0 = split * split_len, k1 = min(k0 + split_len, last + 1);  // the keys it reads here
        if (!row_run[sa] || k0 >= k1) continue;  // a decode token (the split kernel's), or no key here
        const int* table = b.block_tables + row_off[sa];
        const bool mine = wr0 < se && wr0 + 16 > sa;  // this warp holds rows of the segment
        for (int r = threadIdx.x; r < kTileRows; r += blockDim.x) row_m[r] = -INFINITY, row_l[r] = 0.0f;
        Acc o[kFrags];
#pragma unroll
        for (int j = 0; j < kFrags; j++) wmma::fill_fragment(o[j], 0.0f);

        for (int kb = k0; kb < k1; kb += kTileKeys) {
            const int nk = min(kTileKeys, k1 - kb);
            __syncthreads();  // the previous key tile (and the row state's reset) is done with
            if (threadIdx.x < kTileKeys) {
                const int p = kb + threadIdx.x;
                slot[threadIdx.x] = threadIdx.x < nk ? table[p / b.block_size] * b.block_size + p % b.block_size : -1;
            }
            __syncthreads();
            // The key tile's K and V rows in 16-byte pieces; rows past the keys are zeros (their
            // weights are 0, and 0 * V must not meet a stale NaN).
            const int pieces = hd / 8;
            for (int i = threadIdx.x; i < kTileKeys * pieces; i += blockDim.x) {
                const int j = i / pieces, c = i % pieces;
                uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
                if (slot[j] >= 0) {
                    const size_t at = size_t(slot[j]) * kv_dim + size_t(kvh) * hd + size_t(c) * 8;
                    kx = *reinterpret_cast<const uint4*>(k_cache + at);
                    vx = *reinterpret_cast<const uint4*>(v_cache + at);
                }
                *reinterpret_cast<uint4*>(k_s + j * ld + c * 8) = kx;
                *reinterpret_cast<uint4*>(v_s + j * ld + c * 8) = vx;
            }
            __syncthreads();
            if (!mine) continue;

            // S = (Q / sqrt(hd)) K^T for the warp's 16 rows: K's rows read as a column-major B.
#pragma unroll
            for (int kt = 0; kt < kTileKeys / 16; kt++) {
                Acc sf;
                wmma::fill_fragment(sf, 0.0f);
                for (int d = 0; d < nf; d++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kf;
                    FragA qf;
                    wmma::load_matrix_sync(kf, k_s + kt * 16 * ld + d * 16, ld);
                    wmma::load_matrix_sync(qf, q_hi + wr0 * ld + d * 16, ld);
                    wmma::mma_sync(sf, qf, kf, sf);
                    wmma::load_matrix_sync(qf, q_lo + wr0 * ld + d * 16, ld);
                    wmma::mma_sync(sf, qf, kf, sf);
                }
                wmma::store_matrix_sync(s_w + kt * 16, sf, kLdS, wmma::mem_row_major);
            }
            __syncwarp();
            // Online softmax: two lanes per row, 16 keys each. Rows outside the segment, keys past
            // the tile or past the row's position count as -inf; a row with no key yet keeps m = -inf
            // and gets weights 0 and rescale 1 (no NaN from -inf - -inf).
            {
                const int rr = lane / 2, half = lane % 2, r = wr0 + rr;
                const bool active = r >= sa && r < se;
                const int pos = row_pos[r];
                float sv[16], mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    const int col = half * 16 + j;
                    sv[j] = active && col < nk && kb + col <= pos ? s_w[rr * kLdS + col] : -INFINITY;
                    mx = fmaxf(mx, sv[j]);
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
                const bool any = m_new != -INFINITY;
                float sum = 0.0f;
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    const float p = any ? expf(sv[j] - m_new) : 0.0f;
                    sum += p;
                    const __nv_bfloat16 hi = __float2bfloat16_rn(p);
                    ph_w[rr * kLdP + half * 16 + j] = hi;
                    pl_w[rr * kLdP + half * 16 + j] = __float2bfloat16_rn(p - __bfloat162float(hi));
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                __syncwarp();  // both lanes of the row have read row_m
                if (half == 0) {
                    const float corr = active && any ? expf(m_old - m_new) : 1.0f;  // 0 on a row's first key
                    row_corr[r] = corr;
                    if (active) row_l[r] = row_l[r] * corr + sum, row_m[r] = m_new;
                }
            }
            __syncwarp();
            // O = O * corr (per row) + P V, V's rows read as a row-major B.
            float corr[Acc::num_elements];
#pragma unroll
            for (int e = 0; e < Acc::num_elements; e++) corr[e] = row_corr[wr0 + int(rowmap.x[e])];
            FragA ph[kTileKeys / 16], pl[kTileKeys / 16];
#pragma unroll
            for (int kt = 0; kt < kTileKeys / 16; kt++) {
                wmma::load_matrix_sync(ph[kt], ph_w + kt * 16, kLdP);
                wmma::load_matrix_sync(pl[kt], pl_w + kt * 16, kLdP);
            }
#pragma unroll
            for (int j = 0; j < kFrags; j++) {
                if (j >= nf) break;
#pragma unroll
                for (int e = 0; e < Acc::num_elements; e++) o[j].x[e] *= corr[e];
#pragma unroll
                for (int kt = 0; kt < kTileKeys / 16; kt++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
                    wmma::load_matrix_sync(vf, v_s + kt * 16 * ld + j * 16, ld);
                    wmma::mma_sync(o[j], ph[kt], vf, o[j]);
                    wmma::mma_sync(o[j], pl[kt], vf, o[j]);
                }
            }
        }

        // The segment's rows that have keys in this split (the combine reads exactly those): O
        // through the warp's staging tile, then the max and the sum.
        if (mine) {
#pragma unroll
            for (int j = 0; j < kFrags; j++) {
                if (j >= nf) break;
                __syncwarp();  // the staging tile's previous contents are read
                wmma::store_matrix_sync(s_w, o[j], kLdS, wmma::mem_row_major);
                __syncwarp();
                for (int i = lane; i < 16 * 16; i += kWarp) {
                    const int rr = i / 16, r = wr0 + rr, R = row0 + r;
                    if (r < sa || r >= se || row_pos[r] < k0) continue;
                    const size_t head = size_t(R / group) * b.n_heads + size_t(kvh) * group + R % group;
                    o_part[(head * splits + split) * hd + j * 16 + i % 16] = s_w[rr * kLdS + i % 16];
                }
            }
            if (lane < 16) {
                const int r = wr0 + lane, R = row0 + r;
                if (r >= sa && r < se && row_pos[r] >= k0) {
                    const size_t head = size_t(R / group) * b.n_heads + size_t(kvh) * group + R % group;
                    ml_part[(head * splits + split) * 2] = row_m[r];
                    ml_part[(head * splits + split) * 2 + 1] = row_l[r];
                }
            }
        }
        __syncthreads();  // the next segment resets the row state and reuses the tiles
    }
}
