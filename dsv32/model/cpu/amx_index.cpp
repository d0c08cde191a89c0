// The lightning indexer's scores over an FP8 key pool on AMX tiles (built by native.py after
// cache_rows.cpp, before index_topk.cpp, with AMX defined, where the CPU has AMX-BF16 and the process
// may use its tile data): score[s] = sum_h w[h] * relu(q[h] . key_s) for every key s < S, where the
// AVX-512 code dequantises each key to fp32 and spends H * D / 16 FMAs on it (compute-bound).
//
// Each e4m3 byte becomes the bf16 of its exact value (a 128-entry table: e4m3 values have at most 4
// significant bits, so bf16 holds every one, subnormals included) and 16 keys are an A tile. The
// query is split, as amx_gemv.cpp splits activations, into three bf16 limbs, q = b0 + b1 + b2 + e
// (|e| <= 2^-24 |q|), laid along the B tile's columns by head; TDPBF16PS sums the exact bf16
// products in fp32, all three limbs into the same accumulator, and each key's sums meet its scale in
// fp32: score = sum_h w[h] relu(scale * (q[h] . e4m3)). Callers guarantee H <= 64 (up to four C
// tiles of 16 heads) and D == GROUP (one scale a key, as the model's 128 values).
#if defined(AMX) && ISA == 512
#include <algorithm>
#include <vector>

static const int64_t KEYS = 16;           // keys a tile (the A tile's rows)
static const int64_t STEP = 32;           // key values a tile op (the A tile's 64 bytes a row)
static const int LIMBS_Q = 3;

// the 128 e4m3 magnitudes (bytes 0..127) as bf16 bits, built once
static const uint16_t* e4m3_bf16_table() {
    alignas(64) static uint16_t v[128];
    static const bool built = [] {
        for (int i = 0; i < 128; ++i) v[i] = bf16_of(fp8_value((uint8_t)i));
        return true;
    }();
    (void)built;
    return v;
}

// out[i] = the bf16 bits of e4m3 byte x[i], for i < n (a multiple of 32): the magnitude looked up,
// the sign moved from bit 7 to bit 15
static inline void e4m3_to_bf16(const uint8_t* x, uint16_t* out, int64_t n) {
    const uint16_t* table = e4m3_bf16_table();
    const __m512i t0 = _mm512_load_si512(table), t1 = _mm512_load_si512(table + 32);
    const __m512i t2 = _mm512_load_si512(table + 64), t3 = _mm512_load_si512(table + 96);
    const __m512i bit6 = _mm512_set1_epi16(0x40), sign = _mm512_set1_epi16((short)0x8000);
    for (int64_t i = 0; i < n; i += 32) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(x + i)));
        const __m512i lo = _mm512_permutex2var_epi16(t0, b, t1), hi = _mm512_permutex2var_epi16(t2, b, t3);
        const __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(b, bit6), lo, hi);
        _mm512_storeu_si512(out + i, _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(b, 8), sign, 0xF8));  // v | (b << 8 & sign)
    }
}

// q [H, D] -> its limbs (vec.h's bf16_limbs) as B tiles: tile (j, k, t) at bq + ((j * D / STEP + k) * T
// + t) * 16 * 2 * cols holds limb j of values k * STEP .. + STEP of heads 16 t .. 16 t + cols, row r
// column c the pair (2r, 2r + 1); heads past H stay 0
__attribute__((target("avx512bf16")))
static void split_query(const float* q, uint16_t* bq, int64_t H, int64_t D, int64_t T, int64_t cols) {
    const int64_t tile = 16 * 2 * cols;
    for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; d += 16)
            bf16_limbs(q + h * D + d, bq + (d / STEP * T + h / 16) * tile + (d % STEP) / 2 * 2 * cols + 2 * (h % 16),
                       2 * cols, D / STEP * T * tile);
}

// acc[r] += w * relu(s[r] * c[r, :]) for the keys r < m, c a C tile's rows (16 floats a row)
static inline void add_head_sums(const float* c, const __m512* s, int64_t m, __m512 w, __m512* acc) {
    for (int64_t r = 0; r < m; ++r) acc[r] = _mm512_fmadd_ps(vmax0(_mm512_mul_ps(s[r], _mm512_load_ps(c + r * 16))), w, acc[r]);
}

// The tile unit's operations on a tile number held in a variable (the instructions take immediates):
// C tiles 0..3, the A tile 4, B tiles 5..7
__attribute__((target("amx-tile"))) static inline void tile_zero(int64_t i) {
    switch (i) { case 0: _tile_zero(0); break; case 1: _tile_zero(1); break; case 2: _tile_zero(2); break; default: _tile_zero(3); }
}
__attribute__((target("amx-tile"))) static inline void tile_store(int64_t i, float* c) {
    switch (i) { case 0: _tile_stored(0, c, 64); break; case 1: _tile_stored(1, c, 64); break;
                 case 2: _tile_stored(2, c, 64); break; default: _tile_stored(3, c, 64); }
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

// c[i] = the products of a batch of n <= NKT * 16 keys a [n, GROUP] (bf16) with the query's heads
// (bq: split_query's limbs), as C tile i = kt * T + t holds them for key tile kt, head tile t (NKT =
// 4 / T key tiles a batch: 64 keys for H <= 16); row r of c[i]: key kt * 16 + r's heads. Per 32
// values the three limbs of a head tile are loaded once (B_5..7) and each key tile once per head
// tile (A: ~40% faster than a B tile a limb and an A tile a product)
__attribute__((target("amx-tile,amx-bf16")))
static void batch_products(const uint16_t* a, int64_t n, const uint16_t* bq, int64_t T, int64_t cols,
                           float (*c)[KEYS * 16]) {
    const int64_t tiles = (n + KEYS - 1) / KEYS, tile = 16 * 2 * cols, ldb = 4 * cols;
    for (int64_t i = 0; i < tiles * T; ++i) tile_zero(i);
    for (int64_t k = 0; k < GROUP / STEP; ++k)
        for (int64_t t = 0; t < T; ++t) {
            _tile_loadd(5, bq + ((0 * (GROUP / STEP) + k) * T + t) * tile, ldb);
            _tile_loadd(6, bq + ((1 * (GROUP / STEP) + k) * T + t) * tile, ldb);
            _tile_loadd(7, bq + ((2 * (GROUP / STEP) + k) * T + t) * tile, ldb);
            for (int64_t kt = 0; kt < tiles; ++kt) {
                if (tiles > 1 || t == 0) _tile_loadd(4, a + kt * KEYS * GROUP + k * STEP, 2 * GROUP);
                tile_limbs(kt * T + t);
            }
        }
    for (int64_t i = 0; i < tiles * T; ++i) tile_store(i, c[i]);
}

// out[r] = sum_h w[h] relu(scale[r] * c[r, h]) for the n keys of a batch
static void batch_scores(const float* scale, int64_t n, int64_t T, const float (*wt)[16], const float (*c)[KEYS * 16],
                         float* out) {
    for (int64_t kt = 0; kt * KEYS < n; ++kt) {
        const int64_t m = n - kt * KEYS < KEYS ? n - kt * KEYS : KEYS;
        __m512 acc[KEYS], sr[KEYS];
        for (int64_t r = 0; r < KEYS; ++r) acc[r] = _mm512_setzero_ps(), sr[r] = _mm512_set1_ps(r < m ? scale[kt * KEYS + r] : 0.f);
        for (int64_t t = 0; t < T; ++t) add_head_sums(c[kt * T + t], sr, m, _mm512_load_ps(wt[t]), acc);
        _mm512_mask_storeu_ps(out + kt * KEYS, (__mmask16)((1u << m) - 1), sum16(acc));
    }
}

__attribute__((target("amx-tile,amx-bf16,avx512bf16")))
static void amx_index_scores(const float* q, const float* w, const Rows& keys, const int64_t* table, float* scores,
                             const int64_t H, const int64_t S, const int64_t B) {
    const int64_t T = (H + 15) / 16, cols = H < 16 ? H : 16, BATCH = 4 / T * KEYS;
    std::vector<uint16_t> bq(LIMBS_Q * (GROUP / STEP) * T * 16 * 2 * cols, 0);
    split_query(q, bq.data(), H, GROUP, T, cols);
    alignas(64) float wt[4][16] = {};                        // the head weights, by head tile
    for (int64_t h = 0; h < H; ++h) wt[h / 16][h % 16] = w[h];
    const int64_t nb = (S + B - 1) / B;
    #pragma omp parallel
    {
        TileConfig cfg = {};
        cfg.palette = 1;
        for (int i = 0; i < 4; ++i) cfg.rows[i] = KEYS, cfg.colsb[i] = 4 * cols;         // C [16 keys, cols] fp32
        cfg.rows[4] = KEYS, cfg.colsb[4] = 64;                                            // A: 16 keys x 32 bf16
        for (int i = 5; i < 8; ++i) cfg.rows[i] = STEP / 2, cfg.colsb[i] = 4 * cols;     // B: 16 pairs x cols
        _tile_loadconfig(&cfg);
        std::vector<uint16_t> a(BATCH * GROUP, 0);
        alignas(64) float c[4][KEYS * 16] = {};
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {                   // a block's keys lie in consecutive rows
            const int64_t s1 = (b + 1) * B < S ? (b + 1) * B : S;
            for (int64_t s = b * B; s < s1; s += BATCH) {
                const int64_t n = std::min(s1 - s, BATCH), row = table[b] * B + s - b * B;
                e4m3_to_bf16(keys.q + row * GROUP, a.data(), n * GROUP);
                batch_products(a.data(), n, bq.data(), T, cols, c);
                batch_scores(keys.scale + row, n, T, wt, c, scores + s);
            }
        }
        _tile_release();
    }
}
#endif
