// The lightning indexer's scores over an FP8 or bf16 key pool on AMX tiles (built by native.py after
// cache_rows.cpp, before index_topk.cpp, with AMX defined, where the CPU has AMX-BF16 and the process
// may use its tile data): score[s] = sum_h w[h] * relu(q[h] . key_s) for every key s < S, where the
// AVX-512 code converts each key to fp32 and spends H * D / 16 FMAs on it (compute-bound).
//
// Each e4m3 byte becomes the bf16 of its exact value (a 128-entry table: e4m3 values have at most 4
// significant bits, so bf16 holds every one, subnormals included) and 16 keys are an A tile. The
// query is split, as amx_gemv.cpp splits activations, into three bf16 limbs, q = b0 + b1 + b2 + e
// (|e| <= 2^-24 |q|), laid along the B tile's columns by head; TDPBF16PS sums the exact bf16
// products in fp32 (with up to 8 heads limbs 0 and 1 side by side in one tile, limb 2 in another:
// two tile ops where three would fill half their columns), and each key's sums meet its scale in
// fp32: score = sum_h w[h] relu(scale * (q[h] . e4m3)). Over a bf16 pool with up to 8 heads
// (`paired`) two key tiles are in flight, each in an A tile of its own and each limb tile's products
// in a C tile of its own: the tile loads read the pool itself, and with one A tile every load waited
// for the tile ops before it (32K keys: 257 -> 177 us a call on a quiet host, 0.80-0.84x on a loaded
// one); over an FP8 pool, whose keys are converted a batch ahead, that gained nothing (0.98-1.23x)
// and four key tiles a batch, one C tile each, stay. Each thread pipelines its batches of keys:
// the vector unit converts the next batch and sums the heads of the last while the tile unit
// multiplies this one. A bf16 pool's rows are A tiles as they lie (nothing converted, in order, no
// scale; the next batch prefetched instead). Callers guarantee H <= 64 (up to four C tiles of 16
// heads) and D == GROUP (one scale a key, as the model's 128 values).
#if defined(AMX) && ISA == 512
#include <algorithm>
#include <array>
#include <omp.h>
#include <vector>

static const int64_t KEYS = 16;           // keys a tile (the A tile's rows)
static const int64_t STEP = 32;           // key values a tile op (the A tile's 64 bytes a row)
static const int LIMBS_Q = 3;

// the 128 e4m3 magnitudes (bytes 0..127) as bf16, built once: hi[i] and lo[i] its high and low byte
struct E4m3Bf16 { alignas(64) uint8_t hi[128]; alignas(64) uint8_t lo[128]; };
static const E4m3Bf16& e4m3_bf16_table() {
    static const E4m3Bf16 t = [] {
        E4m3Bf16 v;
        for (int i = 0; i < 128; ++i) {
            const uint16_t b = bf16_of(fp8_value((uint8_t)i));
            v.hi[i] = (uint8_t)(b >> 8), v.lo[i] = (uint8_t)b;
        }
        return v;
    }();
    return t;
}

// out[j] = the bf16 bits of e4m3 byte x[perm(j)], for j < n (a multiple of 64): each byte's high and
// low bf16 byte looked up (VPERMT2B over the 128 magnitudes; its bit 7, the sign, joins the high
// byte) and the two interleaved, which within each 128-bit lane pairs bytes 0..7 (one vector) and
// 8..15 (the next): perm (`permuted`) reorders the values of each 64, as split_query does the query's
struct E4m3Lookup { __m512i h0, h1, l0, l1; };
__attribute__((target("avx512vbmi")))
static inline E4m3Lookup e4m3_lookup() {
    const E4m3Bf16& t = e4m3_bf16_table();
    return {_mm512_load_si512(t.hi), _mm512_load_si512(t.hi + 64), _mm512_load_si512(t.lo), _mm512_load_si512(t.lo + 64)};
}
__attribute__((target("avx512vbmi")))
static inline void e4m3_to_bf16(const E4m3Lookup& t, const uint8_t* x, uint16_t* out, int64_t n) {
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    for (int64_t i = 0; i < n; i += 64) {
        const __m512i b = _mm512_loadu_si512(x + i);
        const __m512i lo = _mm512_permutex2var_epi8(t.l0, b, t.l1);
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.h0, b, t.h1), b, sign, 0xF8);  // | b & sign
        _mm512_storeu_si512(out + i, _mm512_unpacklo_epi8(lo, hi));
        _mm512_storeu_si512(out + i + 32, _mm512_unpackhi_epi8(lo, hi));
    }
}

// the value e4m3_to_bf16 puts at position j of each 64: lane j / 8 % 4 of vector j / 32 holds the
// lane's bytes 8 * (j / 32) .. + 8
static inline int64_t permuted(int64_t j) { return j / 64 * 64 + j % 32 / 8 * 16 + j % 64 / 32 * 8 + j % 8; }

// The query's B tiles: its three bf16 limbs (vec.h's bf16_limbs) by head along the columns, each
// tile 32 values (16 pairs, one a row) of the key dimension, in the order e4m3_to_bf16 lays out the
// keys (`permuted`; a bf16 pool's keys in order: perm false). With up to 8 heads (`packed`) limbs 0
// and 1 share a tile (columns 0..7 and 8..15) and limb 2 has the next (columns 0..7): two tile ops a
// key tile, not three, whose halves the head sum adds. Tile (slot, k, t) lies at
// bq + ((slot * D / STEP + k) * T + t) * 16 * 2 * cols for the value step k and head tile t (heads
// 16 t ..); heads past H stay 0.
static bool packed_heads(int64_t H) { return H <= 8; }
static int64_t query_slots(int64_t H) { return packed_heads(H) ? 2 : LIMBS_Q; }
static int64_t query_cols(int64_t H) { return packed_heads(H) ? 16 : H < 16 ? H : 16; }
// keys a batch: packed over a bf16 pool, two key tiles (C tiles 0..3 hold their two limb tiles'
// sums: `paired`); else 4 / T key tiles (one C tile a key tile and head tile)
static bool paired(int64_t H, bool half) { return packed_heads(H) && half; }
static int64_t batch_keys(int64_t H, bool half) { return paired(H, half) ? 2 * KEYS : 4 / ((H + 15) / 16) * KEYS; }

__attribute__((target("avx512bf16")))
static void split_query(const float* q, uint16_t* bq, int64_t H, int64_t D, int64_t T, int64_t cols, bool packed,
                        bool perm) {
    static const auto order = [] {                           // D == GROUP
        std::array<int16_t, GROUP> o{};
        for (int64_t j = 0; j < GROUP; ++j) o[j] = (int16_t)permuted(j);
        return o;
    }();
    const int64_t tile = 16 * 2 * cols, per_slot = D / STEP * T * tile;
    alignas(64) float qp[GROUP];
    uint16_t limbs[LIMBS_Q][16];                             // packed: limb j of pair i at limbs[j][2 i]
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < GROUP; ++d) qp[d] = q[h * D + (perm ? order[d] : d)];
        for (int64_t d = 0; d < D; d += 16) {
            uint16_t* at = bq + (d / STEP * T + h / 16) * tile + (d % STEP) / 2 * 2 * cols + 2 * (h % 16);
            if (!packed) {                                   // limb j in slot j
                bf16_limbs(qp + d, at, 2 * cols, per_slot);
                continue;
            }
            bf16_limbs(qp + d, limbs[0], 2, 16);             // limbs 0, 1: slot 0, columns h, 8 + h; limb 2: slot 1
            for (int64_t i = 0; i < 8; ++i) {
                std::memcpy(at + i * 2 * cols, limbs[0] + 2 * i, 4);
                std::memcpy(at + i * 2 * cols + 16, limbs[1] + 2 * i, 4);
                std::memcpy(at + per_slot + i * 2 * cols, limbs[2] + 2 * i, 4);
            }
        }
    }
}

// acc[r] += w * relu(s[r] * c[r, :]) for the keys r < m, c a C tile's rows (16 floats a row)
static inline void add_head_sums(const float* c, const __m512* s, int64_t m, __m512 w, __m512* acc) {
    for (int64_t r = 0; r < m; ++r)
        acc[r] = _mm512_fmadd_ps(vmax0(_mm512_mul_ps(s[r], _mm512_load_ps(c + r * 16))), w, acc[r]);
}

// The tile unit's operations on a tile number held in a variable (the instructions take immediates):
// C tiles 0..3, the A tile 4, B tiles 5..7; paired: A tiles 4 and 5, B tiles 6 and 7 (the same
// shapes: 16 rows of 64 bytes)
__attribute__((target("amx-tile"))) static inline void tile_zero(int64_t i) {
    switch (i) { case 0: _tile_zero(0); break; case 1: _tile_zero(1); break; case 2: _tile_zero(2); break; default: _tile_zero(3); }
}
__attribute__((target("amx-tile"))) static inline void tile_store(int64_t i, float* c, int64_t ld = 64) {
    switch (i) { case 0: _tile_stored(0, c, ld); break; case 1: _tile_stored(1, c, ld); break;
                 case 2: _tile_stored(2, c, ld); break; default: _tile_stored(3, c, ld); }
}
// C_i += A . B_5 + A . B_6 + A . B_7 (the query's three limbs)
__attribute__((target("amx-tile,amx-bf16"))) static inline void tile_limbs(int64_t i) {
    switch (i) {
        case 0: _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(0, 4, 7); break;
        case 1: _tile_dpbf16ps(1, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(1, 4, 7); break;
        case 2: _tile_dpbf16ps(2, 4, 5); _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(2, 4, 7); break;
        default: _tile_dpbf16ps(3, 4, 5); _tile_dpbf16ps(3, 4, 6); _tile_dpbf16ps(3, 4, 7);
    }
}
// C_i += A . B_5 + A . B_6 (the packed query's two tiles, over an FP8 pool's converted keys)
__attribute__((target("amx-tile,amx-bf16"))) static inline void tile_limbs2(int64_t i) {
    switch (i) {
        case 0: _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(0, 4, 6); break;
        case 1: _tile_dpbf16ps(1, 4, 5); _tile_dpbf16ps(1, 4, 6); break;
        case 2: _tile_dpbf16ps(2, 4, 5); _tile_dpbf16ps(2, 4, 6); break;
        default: _tile_dpbf16ps(3, 4, 5); _tile_dpbf16ps(3, 4, 6);
    }
}

// paired: key tile kt (0 or 1) in A tile 4 + kt; C tile 2 kt += A . B_6 (limbs 0 and 1), 2 kt + 1 +=
// A . B_7 (limb 2)
__attribute__((target("amx-tile"))) static inline void load_a(int64_t kt, const void* p, int64_t ld) {
    if (kt == 0) _tile_loadd(4, p, ld); else _tile_loadd(5, p, ld);
}
__attribute__((target("amx-tile,amx-bf16"))) static inline void tile_pair(int64_t kt) {
    if (kt == 0) { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); }
    else { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
}

// out[r] = sum_h w[h] relu(scale[r] * c[t][r, h]) for the m keys of one key tile (its C tiles c[t],
// one a head tile; scale null: 1)
static void key_tile_scores(const float* scale, int64_t m, int64_t T, const float (*wt)[16],
                            const float (*c)[KEYS * 16], float* out) {
    __m512 acc[KEYS], sr[KEYS];
    for (int64_t r = 0; r < KEYS; ++r)
        acc[r] = _mm512_setzero_ps(), sr[r] = _mm512_set1_ps(r >= m ? 0.f : scale ? scale[r] : 1.f);
    for (int64_t t = 0; t < T; ++t) add_head_sums(c[t], sr, m, _mm512_load_ps(wt[t]), acc);
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << m) - 1), sum16(acc));
}

// the same, packed: c0 (+ c1 where paired: limbs 0 and 1, limb 2 of one key tile) with each row's
// halves added (the limbs of heads 0..7; w zero past 8)
static void pair_tile_scores(const float* scale, int64_t m, const float* w16, const float* c0, const float* c1,
                             float* out) {
    __m512 acc[KEYS];
    const __m512 w = _mm512_load_ps(w16);
    for (int64_t r = 0; r < KEYS; ++r) {
        if (r >= m) { acc[r] = _mm512_setzero_ps(); continue; }
        __m512 v = _mm512_load_ps(c0 + r * 16);
        if (c1) v = _mm512_add_ps(v, _mm512_load_ps(c1 + r * 16));
        v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
        acc[r] = _mm512_mul_ps(vmax0(scale ? _mm512_mul_ps(_mm512_set1_ps(scale[r]), v) : v), w);
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << m) - 1), sum16(acc));
}

struct Batch { int64_t row, s, n; };                 // a batch's first pool row and key id, and its keys

// One thread's batches of keys (`batch_keys`), pipelined: while the tile unit multiplies batch i
// (paired: C tiles 2 kt, 2 kt + 1 for key tile kt; else C tile kt * T + t: key tile kt, head tile t;
// per 32 values the query's tiles are loaded once and each key tile once per head tile), the vector
// unit converts batch i + 1's keys (into the other half of `a`) and sums the heads of batch i - 1
// (from the other half of `c`), a share after each tile op group, so that neither waits for the other.
// a: the thread's 2 * batch_keys(H) * GROUP converted keys (none for a bf16 pool); c: its C tiles' rows.
__attribute__((target("amx-tile,amx-bf16,avx512vbmi")))
static void run_batches(const std::vector<Batch>& work, const Rows& keys, const uint16_t* bq, const float (*wt)[16],
                        float* scores, int64_t H, uint16_t* a, float (*c)[4][KEYS * 16]) {
    const bool half = keys.q == nullptr;                  // a bf16 pool: its rows are the A tiles
    const bool packed = packed_heads(H), pairs = paired(H, half);
    const int64_t T = (H + 15) / 16, cols = query_cols(H), BATCH = batch_keys(H, half);
    const int64_t W = (int64_t)work.size(), STEPS = GROUP / STEP, tile = 16 * 2 * cols, ldb = 4 * cols;
    const E4m3Lookup lut = e4m3_lookup();
    if (W && !half) e4m3_to_bf16(lut, keys.q + work[0].row * GROUP, a, work[0].n * GROUP);
    for (int64_t i = 0; i <= W; ++i) {
        const uint16_t* ai = a + (i % 2) * BATCH * GROUP;
        uint16_t* an = a + ((i + 1) % 2) * BATCH * GROUP;
        const int64_t conv = i + 1 < W && !half ? work[i + 1].n * GROUP : 0;   // bytes of batch i + 1 to convert
        const uint8_t* xn = conv ? keys.q + work[i + 1].row * GROUP : nullptr;
        const int64_t prev = i > 0 ? (work[i - 1].n + KEYS - 1) / KEYS : 0;   // key tiles of batch i - 1 to sum
        int64_t converted = 0, summed = 0, fetched = 0;
        // a bf16 pool's next batch of rows, prefetched meanwhile (the tile loads would wait on memory:
        // 463 -> 370 us at 32K keys, 8 heads; fetching an FP8 pool's batch i + 2 gained nothing)
        const int64_t pf = i + 1 < W && half ? work[i + 1].n * GROUP * 2 : 0;
        const char* pn = pf ? (const char*)(keys.tail + work[i + 1].row * GROUP) : nullptr;
        auto catch_up = [&](int64_t g, int64_t G) {         // the vector work due after g of G groups
            for (const int64_t to = pf * g / G; fetched < to; fetched += 64) _mm_prefetch(pn + fetched, _MM_HINT_T0);
            const int64_t to = std::min(conv, (conv * g / G + 63) / 64 * 64);
            if (to > converted) e4m3_to_bf16(lut, xn + converted, an + converted, to - converted), converted = to;
            for (; summed < prev * g / G; ++summed) {
                const Batch& p = work[i - 1];
                const float* sc = half ? nullptr : keys.scale + p.row + summed * KEYS;
                const int64_t m = std::min(KEYS, p.n - summed * KEYS);
                float* out = scores + p.s + summed * KEYS;
                const float (*cp)[KEYS * 16] = c[(i - 1) % 2];
                if (pairs) pair_tile_scores(sc, m, wt[0], cp[2 * summed], cp[2 * summed + 1], out);
                else if (packed) pair_tile_scores(sc, m, wt[0], cp[summed], nullptr, out);
                else key_tile_scores(sc, m, T, wt, cp + summed * T, out);
            }
        };
        if (i == W) { catch_up(1, 1); break; }
        const int64_t tiles = (work[i].n + KEYS - 1) / KEYS, G = STEPS * T * tiles;
        const int64_t ctiles = pairs ? 2 * tiles : tiles * T;
        auto a_at = [&](int64_t kt, int64_t k) {            // key tile kt's values k * STEP.. (A's rows)
            return (half ? keys.tail + (work[i].row + kt * KEYS) * GROUP : ai + kt * KEYS * GROUP) + k * STEP;
        };
        for (int64_t j = 0; j < ctiles; ++j) tile_zero(j);
        int64_t g = 0;
        for (int64_t k = 0; k < STEPS; ++k) {
            if (pairs) {
                _tile_loadd(6, bq + k * tile, ldb);
                _tile_loadd(7, bq + (STEPS + k) * tile, ldb);
                for (int64_t kt = 0; kt < tiles; ++kt) load_a(kt, a_at(kt, k), 2 * GROUP);
                for (int64_t kt = 0; kt < tiles; ++kt) tile_pair(kt), catch_up(++g, G);
                continue;
            }
            for (int64_t t = 0; t < T; ++t) {
                for (int64_t slot = 0; slot < query_slots(H); ++slot) {
                    const uint16_t* b = bq + ((slot * STEPS + k) * T + t) * tile;
                    if (slot == 0) _tile_loadd(5, b, ldb);
                    else if (slot == 1) _tile_loadd(6, b, ldb);
                    else _tile_loadd(7, b, ldb);
                }
                for (int64_t kt = 0; kt < tiles; ++kt) {
                    if (tiles > 1 || t == 0) _tile_loadd(4, a_at(kt, k), 2 * GROUP);
                    if (packed) tile_limbs2(kt); else tile_limbs(kt * T + t);
                    catch_up(++g, G);
                }
            }
        }
        for (int64_t j = 0; j < ctiles; ++j) tile_store(j, c[i % 2][j]);
    }
}

__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512vbmi")))
static void amx_index_scores(const float* q, const float* w, const Rows& keys, const int64_t* table, float* scores,
                             const int64_t H, const int64_t S, const int64_t B) {
    const bool packed = packed_heads(H);
    const int64_t T = (H + 15) / 16, cols = query_cols(H), BATCH = batch_keys(H, keys.q == nullptr);
    std::vector<uint16_t> bq(query_slots(H) * (GROUP / STEP) * T * 16 * 2 * cols, 0);
    split_query(q, bq.data(), H, GROUP, T, cols, packed, keys.q != nullptr);
    alignas(64) float wt[4][16] = {};                        // the head weights, by head tile
    for (int64_t h = 0; h < H; ++h) wt[h / 16][h % 16] = w[h];
    // blocks handed to threads ~2K keys at a time, as they come free (a static half each waited on
    // the slower thread: a vCPU whose sibling is busy; the FP8 pools' scores 0.93-0.98x on a loaded host)
    const int64_t nb = (S + B - 1) / B, CHUNK = std::max<int64_t>(1, 2048 / B);
    #pragma omp parallel
    {
        TileConfig cfg = {};
        cfg.palette = 1;
        for (int i = 0; i < 4; ++i) cfg.rows[i] = KEYS, cfg.colsb[i] = 4 * cols;         // C [16 keys, cols] fp32
        cfg.rows[4] = KEYS, cfg.colsb[4] = 64;                                            // A: 16 keys x 32 bf16
        for (int i = 5; i < 8; ++i) cfg.rows[i] = STEP / 2, cfg.colsb[i] = 4 * cols;     // B: 16 pairs x cols
        load_tile_config(cfg);
        std::vector<Batch> work;                             // a chunk of blocks, in batches
        std::vector<uint16_t> a(keys.q ? 2 * BATCH * GROUP : 0, 0);
        alignas(64) float c[2][4][KEYS * 16];               // each batch's rows stored before they are read
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b0 = 0; b0 < nb; b0 += CHUNK) {
            work.clear();
            for (int64_t b = b0; b < std::min(nb, b0 + CHUNK); ++b) {   // a block's keys: consecutive rows
                const int64_t s1 = std::min((b + 1) * B, S);
                for (int64_t s = b * B; s < s1; s += BATCH)
                    work.push_back({table[b] * B + s - b * B, s, std::min(s1 - s, BATCH)});
            }
            run_batches(work, keys, bq.data(), wt, scores, H, a.data(), c);
        }
        _tile_release();
    }
}
#endif
