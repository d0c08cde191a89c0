// Sparse MLA attention over a bf16 or FP8 latent pool on AMX tiles (built by native.py after
// cache_rows.cpp and amx_index.cpp, whose tile operations it uses, before sparse_attention.cpp, with
// AMX defined, where the CPU has AMX-BF16): sparse_attention.cpp's attend_rows with many heads, where
// its vector code spends 2 H (D + C) FMA lanes a row and runs at ~40 GFLOP/s with 128 heads (the real
// model's).
// Both products are GEMMs on tiles, a chunk of the selected rows at a time (copied from their slots
// into one buffer, 128 of them):
//   scores [rows, heads] = rows [rows, D] . q^T: the copied rows are A tiles as they lie, the query
//     three bf16 limbs (vec.h's bf16_limbs: as exact as fp32, the rows being bf16) laid along the B
//     tiles' columns by head;
//   o [heads, C] += p [heads, rows] . rows[:, :C]: p (the online softmax's exp(scale s - M), per head)
//     three bf16 limbs as A tiles (the scores' 16 x 16 blocks transposed to put rows along them), the
//     rows' first C values paired for B tiles (VNNI: two rows' values side by side).
// The softmax keeps a running max and sum per head across chunks (o rescaled where the max grows; its
// exp a vector polynomial, exp16), and the part is handed back as attend_rows' (o, max, sum).
// Outputs differ from the vector code's by fp32 rounding (other orders; tests hold both to float64).
// FP8 rows (chunk_scores, `gather`): the bf16 of each e4m3 value / 256 (exact), the scale per group
// applied to the group's products after the tiles and folded into p for its columns' sums.
// A decode call 1.4-4.2x faster than the vector code from 16 heads over 256 rows to 128 over 2048
// (up to 5.4x in other runs), 2.1-11x than gathering the rows for torch's fp32 GEMMs (bench/README.md,
// "Sparse attention kernels"). The scratch keeps room for the query's tiles even where the decode
// shares one copy (~0.4 MB a thread at 128 heads).
#if defined(AMX) && ISA == 512
#include <algorithm>

static const int64_t AMX_ROWS = 128;                     // selected rows a chunk (a multiple of 32)
static const int64_t AMX_MIN_HEADS = 16;                 // fewer: the vector code (a tile's width)

// Whether K selected rows of a bf16 pool, or an FP8 one whose C values are the scaled groups (its rope
// after them), take the tiles: 16+ heads, 64+ rows and 2048+ head-rows (below, the query's tiles and
// the rows padded to 32 cost more than the vector code: 16 heads at 64 rows 1.17x, 128 heads at 32
// rows 1.25x its time; at 16 x 128 even)
static inline bool amx_attends(const Rows& rows, int64_t H, int64_t K, int64_t D, int64_t C) {
    const bool pool = rows.f32 == nullptr && (rows.q == nullptr || (rows.R == D - C && C % GROUP == 0));
    return pool && H >= AMX_MIN_HEADS && K >= 64 && H * K >= 2048 && D % 32 == 0 && C % 32 == 0;
}

// The thread's scratch (uint16 units): the query's B tiles [3 limbs][D/32 steps][T head tiles][16
// pairs][16 heads][2], the gathered rows [AMX_ROWS][D], the paired rows [AMX_ROWS/2][C][2], p's limbs
// [groups][3][Hp][AMX_ROWS] (FP8: one set a scaled group, p times the rows' scales); (floats) scores
// [AMX_ROWS][16 T], o [Hp][C], max and sum [Hp], the rows' scales [C / GROUP][AMX_ROWS] and four C
// tiles' rows. Hp: H rounded up to 32 (head tiles go in pairs in the sums; the extra heads' p is 0).
struct AmxScratch {
    uint16_t *bq, *rows, *pairs, *pl;
    float *sc, *o, *m, *l, *scl, *part;
};
static inline int64_t amx_heads(int64_t H) { return (H + 31) / 32 * 32; }
static inline int64_t query_halves(int64_t H, int64_t D) { return 3 * D * amx_heads(H); }
static inline int64_t amx_scratch_floats(int64_t H, int64_t D, int64_t C) {
    const int64_t Hp = amx_heads(H), G = std::max<int64_t>(1, C / GROUP);
    const int64_t halves = 3 * D * Hp + AMX_ROWS * D + AMX_ROWS * C + G * 3 * Hp * AMX_ROWS;
    return halves / 2 + AMX_ROWS * Hp + Hp * C + 2 * Hp + G * AMX_ROWS + 4 * 256 + 64;
}
static inline AmxScratch amx_scratch(float* s, int64_t H, int64_t D, int64_t C) {
    const int64_t Hp = amx_heads(H), G = std::max<int64_t>(1, C / GROUP);
    s = (float*)(((uintptr_t)s + 63) & ~(uintptr_t)63);
    AmxScratch a;
    a.part = s, a.sc = a.part + 4 * 256, a.o = a.sc + AMX_ROWS * Hp, a.m = a.o + Hp * C, a.l = a.m + Hp;
    a.scl = a.l + Hp;
    a.bq = (uint16_t*)(a.scl + G * AMX_ROWS), a.rows = a.bq + 3 * D * Hp, a.pairs = a.rows + AMX_ROWS * D;
    a.pl = a.pairs + AMX_ROWS * C;
    return a;
}

// out[i] = the bf16 of e4m3 byte x[i] / 256 (exact) for i < n (a multiple of 16), in order: the byte's
// exponent and mantissa placed in an fp16's make the fp16 the value / 256 (cache_rows.cpp's
// fp8_dequant), which converts to fp32 and rounds to bf16 unchanged (4 significant bits)
__attribute__((target("avx512bf16")))
static inline void e4m3_bf16(const uint8_t* x, uint16_t* out, int64_t n) {
    const __m256i sign = _mm256_set1_epi16(0x4000);
    for (int64_t i = 0; i < n; i += 16) {
        const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(x + i))), 7);
        const __m512 f = _mm512_cvtph_ps(_mm256_add_epi16(b, _mm256_and_si256(b, sign)));
        _mm256_storeu_si256((__m256i*)(out + i), (__m256i)_mm512_cvtneps_pbh(f));
    }
}

// exp(x) for the softmax: 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor series to
// r^7 (relative error < 1e-8); below -104 the result underflows to 0 (min and max return their second
// operand where one is NaN)
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));   // NaN stays NaN
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// b[i] = column i of the 16 x 16 floats a (rows lda apart) for i < 16, rows ldb apart
static inline void transpose16(const float* a, int64_t lda, float* b, int64_t ldb) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(a + i * lda);
    for (int i = 0; i < 16; i += 2)
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4)
        for (int j = 0; j < 2; ++j) {
            const __m512d x = _mm512_castps_pd(t[i + j]), y = _mm512_castps_pd(t[i + j + 2]);
            r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            r[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
        }
    for (int i = 0; i < 16; i += 8)                          // 128-bit lanes: rows i.. and i + 4..
        for (int j = 0; j < 4; ++j) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; ++j) {                            // 256-bit halves: rows j and j + 8
        const __m512 lo = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88), hi = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
        r[j] = lo, r[j + 8] = hi;
    }
    static const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};   // r[i]'s column
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(b + order[i] * ldb, r[i]);
}

// The query's B tiles of head tiles t0..t1: limb l of q[h, 32 k + 2 i + j] at bq[(((l * steps + k) *
// T + h / 16) * 16 + i) * 32 + 2 (h % 16) + j] (T = Hp / 16 head tiles, `query_halves` in all; heads
// past H zero). Per head the 32 values' limbs as 16 pairs (cvtne2ps: x = b0 + b1 + b2 + e as
// bf16_limbs), a tile's 16 heads of them transposed.
__attribute__((target("avx512bf16")))
static void query_tiles(const float* q, uint16_t* bq, int64_t H, int64_t D, int64_t t0, int64_t t1) {
    const int64_t T = amx_heads(H) / 16, steps = D / 32, tile = 512;
    alignas(64) float limbs[3][16][16];                      // [limb][head][pair] as 32-bit pairs
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t k = 0; k < steps; ++k) {
            for (int64_t h = 0; h < 16; ++h) {
                if (t * 16 + h >= H) {
                    for (int l = 0; l < 3; ++l) _mm512_store_ps(limbs[l][h], _mm512_setzero_ps());
                    continue;
                }
                const float* x = q + (t * 16 + h) * D + k * 32;
                __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
                for (int l = 0; l < 3; ++l) {
                    const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);   // values 0..31 in order
                    _mm512_store_si512(limbs[l][h], b);
                    const __m512i b0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(b));
                    const __m512i b1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(b, 1));
                    v0 = _mm512_sub_ps(v0, _mm512_castsi512_ps(_mm512_slli_epi32(b0, 16)));
                    v1 = _mm512_sub_ps(v1, _mm512_castsi512_ps(_mm512_slli_epi32(b1, 16)));
                }
            }
            for (int l = 0; l < 3; ++l)
                transpose16(limbs[l][0], 16, (float*)(bq + ((l * steps + k) * T + t) * tile), 16);
        }
}

// out[l][i] = limb l of v[i] for the 16 values v, limbs `ld` apart (as bf16_limbs, in order)
__attribute__((target("avx512bf16")))
static inline void limbs16(__m512 v, uint16_t* out, int64_t ld) {
    for (int l = 0; l < 3; ++l) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_storeu_si256((__m256i*)(out + l * ld), h);
        v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
}

// pairs[i][c][j] = rows[2 i + j][c] for c < C: each two rows' first C values side by side (B tiles)
static void pair_rows(const uint16_t* rows, uint16_t* pairs, int64_t n, int64_t D, int64_t C) {
    alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < n / 2; ++i) {
        const uint16_t *r0 = rows + 2 * i * D, *r1 = r0 + D;
        uint16_t* out = pairs + i * 2 * C;
        for (int64_t c = 0; c < C; c += 32) {
            const __m512i a = _mm512_loadu_si512(r0 + c), b = _mm512_loadu_si512(r1 + c);
            _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

// sc [n32, Hp] = the chunk's rows . the query's limbs, for the head tiles t < Tq. FP8 rows (G scaled
// groups of the first G * GROUP values, then the rope): each group's products summed on the tiles
// apart, then scaled by the rows' scales into sc, the rope's added (in group order)
__attribute__((target("amx-tile,amx-bf16")))
static void chunk_scores(const AmxScratch& a, int64_t n32, int64_t Tq, int64_t Hp, int64_t D, int64_t G) {
    const int64_t steps = D / 32, T = Hp / 16, RT = n32 / 16, per = GROUP / 32;
    for (int64_t t = 0; t < Tq; ++t)
        for (int64_t r0 = 0; r0 < RT; r0 += 4) {
            const int64_t m = std::min<int64_t>(4, RT - r0);
            for (int64_t g = 0; g <= G; ++g) {              // the steps of group g (G: the rest)
                for (int64_t i = 0; i < m; ++i) tile_zero(i);
                for (int64_t k = g * per; k < (g < G ? (g + 1) * per : steps); ++k) {
                    const uint16_t* b = a.bq + (k * T + t) * 512;
                    _tile_loadd(5, b, 64);
                    _tile_loadd(6, b + steps * T * 512, 64);
                    _tile_loadd(7, b + 2 * steps * T * 512, 64);
                    for (int64_t i = 0; i < m; ++i) {
                        _tile_loadd(4, a.rows + (r0 + i) * 16 * D + k * 32, 2 * D);
                        tile_limbs(i);
                    }
                }
                if (G == 0) {                                // bf16 rows: the sums are the scores
                    for (int64_t i = 0; i < m; ++i) tile_store(i, a.sc + (r0 + i) * 16 * Hp + t * 16, 4 * Hp);
                    continue;
                }
                for (int64_t i = 0; i < m; ++i) tile_store(i, a.part + i * 256);
                for (int64_t r = 0; r < m * 16; ++r) {
                    float* out = a.sc + (r0 * 16 + r) * Hp + t * 16;
                    const __m512 v = _mm512_load_ps(a.part + r * 16);
                    const __m512 s = _mm512_set1_ps(g < G ? a.scl[g * AMX_ROWS + r0 * 16 + r] : 1.f);
                    _mm512_storeu_ps(out, g == 0 ? _mm512_mul_ps(s, v) : _mm512_fmadd_ps(s, v, _mm512_loadu_ps(out)));
                }
            }
        }
}

// The online softmax of the chunk's n rows (of n32) for head tile t: p = exp(scale s - M) into the
// limbs of p (A tiles: heads by rows; rows n.. zero; FP8: of p times each group's row scales), the
// running max and sum updated, o's rows rescaled where the max grew
__attribute__((target("avx512bf16")))
static void chunk_softmax(const AmxScratch& a, int64_t n, int64_t n32, int64_t t, int64_t Hp, int64_t C, int64_t G,
                          float scale) {
    float* sc = a.sc + t * 16;
    const __m512 sv = _mm512_set1_ps(scale), old = _mm512_loadu_ps(a.m + t * 16);
    const __mmask16 seen = _mm512_cmp_ps_mask(old, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);   // o nonzero
    __m512 M = old;
    for (int64_t r = 0; r < n; ++r) {
        const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(sc + r * Hp), sv);
        _mm512_storeu_ps(sc + r * Hp, s);
        M = _mm512_max_ps(M, s);
    }
    const __m512 e = exp16(_mm512_sub_ps(old, M));
    __m512 L = _mm512_mul_ps(e, _mm512_loadu_ps(a.l + t * 16));
    for (int64_t r = 0; r < n32; ++r) {
        const __m512 p = r < n ? exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + r * Hp), M)) : _mm512_setzero_ps();
        _mm512_storeu_ps(sc + r * Hp, p);
        L = _mm512_add_ps(L, p);
    }
    _mm512_storeu_ps(a.m + t * 16, M), _mm512_storeu_ps(a.l + t * 16, L);
    alignas(64) float ev[16], pt[16 * 16];
    _mm512_store_ps(ev, e);
    for (int64_t h = 0; h < 16; ++h)
        if (ev[h] != 1.f && (seen >> h & 1)) {
            float* o = a.o + (t * 16 + h) * C;
            for (int64_t c = 0; c < C; c += 16)
                _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_set1_ps(ev[h]), _mm512_loadu_ps(o + c)));
        }
    const int64_t limb = Hp * AMX_ROWS;
    for (int64_t r0 = 0; r0 < n32; r0 += 16) {
        transpose16(sc + r0 * Hp, Hp, pt, 16);
        for (int64_t g = 0; g < std::max<int64_t>(1, G); ++g) {
            const __m512 s = G ? _mm512_loadu_ps(a.scl + g * AMX_ROWS + r0) : _mm512_set1_ps(1.f);
            for (int64_t h = 0; h < 16; ++h)
                limbs16(_mm512_mul_ps(s, _mm512_load_ps(pt + h * 16)), a.pl + (g * 3 * Hp + t * 16 + h) * AMX_ROWS + r0,
                        limb);
        }
    }
}

// o [Hp, C] += p [Hp, n32] . rows [n32, :C]: C tiles (head tiles t, t + 1) x (column tiles c, c + 1)
// loaded from o (zero for the first chunk), the chunk's K tiles of 32 rows, each with p's three limbs
// (FP8: those of the columns' group)
__attribute__((target("amx-tile,amx-bf16")))
static void chunk_sums(const AmxScratch& a, int64_t n32, int64_t Tq, int64_t Hp, int64_t C, int64_t G, bool first) {
    const int64_t ld = 4 * C, limb = Hp * AMX_ROWS;
    for (int64_t t = 0; t < Tq; t += 2)
        for (int64_t c = 0; c < C / 16; c += 2) {
            float* o0 = a.o + t * 16 * C + c * 16;
            float* o1 = o0 + 16 * C;
            if (first) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            } else {
                _tile_loadd(0, o0, ld); _tile_loadd(1, o0 + 16, ld);
                _tile_loadd(2, o1, ld); _tile_loadd(3, o1 + 16, ld);
            }
            for (int64_t kr = 0; kr < n32 / 32; ++kr) {
                const uint16_t* b = a.pairs + kr * 16 * 2 * C + c * 32;
                _tile_loadd(6, b, ld);
                _tile_loadd(7, b + 32, ld);
                const uint16_t* p = a.pl + ((G ? c * 16 / GROUP * 3 * Hp : 0) + t * 16) * AMX_ROWS + kr * 32;
                for (int64_t l = 0; l < 3; ++l) {
                    _tile_loadd(4, p + l * limb, 2 * AMX_ROWS);
                    _tile_loadd(5, p + l * limb + 16 * AMX_ROWS, 2 * AMX_ROWS);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, o0, ld); _tile_stored(1, o0 + 16, ld);
            _tile_stored(2, o1, ld); _tile_stored(3, o1 + 16, ld);
        }
}

// attend_rows (sparse_attention.cpp) on tiles, as one thread's state (holding the tiles while it
// lives): `add` sums selected rows into it, AMX_ROWS at a time, `write` writes acc [H, C + 2] (o[:C]
// unnormalised, running max, running sum) as attend_rows does, and `begin` starts afresh (the decode
// hands each chunk of AMX_ROWS to the thread that comes free and keeps its part apart, so the merged
// result does not depend on which thread took it). bq: the query's tiles (`query_tiles`, shared by
// the threads), or null to build them in scratch (amx_scratch_floats(H, D, C) floats).
struct AmxAttention {
    const Rows& rows;
    const int64_t *table, B, H, D, C, Hp, Tq, G;            // G: an FP8 pool's scaled groups (bf16: 0)
    const float scale;
    AmxScratch a;
    bool first = true;                                   // nothing summed yet

    __attribute__((target("amx-tile,amx-bf16,avx512bf16")))
    AmxAttention(const float* q, const uint16_t* bq, const Rows& rows, const int64_t* table, float* scratch,
                 int64_t B, int64_t H, int64_t D, int64_t C, float scale)
        : rows(rows), table(table), B(B), H(H), D(D), C(C), Hp(amx_heads(H)), Tq((H + 15) / 16),
          G(rows.q ? C / GROUP : 0), scale(scale), a(amx_scratch(scratch, H, D, C)) {
        if (bq == nullptr) query_tiles(q, a.bq, H, D, 0, Hp / 16);
        else a.bq = (uint16_t*)bq;
        TileConfig cfg = {};
        cfg.palette = 1;
        for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
        load_tile_config(cfg);
        for (int64_t l = 0; l < 3 * std::max<int64_t>(1, G); ++l)   // a head tile past Tq keeps p = 0
            std::memset(a.pl + (l * Hp + Tq * 16) * AMX_ROWS, 0, (Hp - Tq * 16) * AMX_ROWS * sizeof(uint16_t));
        begin();
    }

    __attribute__((target("amx-tile"))) ~AmxAttention() { _tile_release(); }

    void begin() {
        for (int64_t h = 0; h < Hp; ++h) a.m[h] = -INFINITY, a.l[h] = 0.f;
        first = true;
    }

    // the rows of the key positions ids[0..k) (-1: skipped), AMX_ROWS at a time
    __attribute__((target("amx-tile,amx-bf16,avx512bf16")))
    void add(const int64_t* ids, int64_t k) {
        for (int64_t j = 0; j < k;) {
            int64_t n = 0;
            for (; n < AMX_ROWS && j < k; ++j)
                if (ids[j] >= 0) gather(slot_of(table, B, ids[j]), n++);
            if (n == 0) return;
            const int64_t n32 = (n + 31) / 32 * 32;
            std::memset(a.rows + n * D, 0, (n32 - n) * D * 2);
            for (int64_t g = 0; g < G; ++g) std::memset(a.scl + g * AMX_ROWS + n, 0, (n32 - n) * sizeof(float));
            chunk_scores(a, n32, Tq, Hp, D, G);
            for (int64_t t = 0; t < Tq; ++t) chunk_softmax(a, n, n32, t, Hp, C, G, scale);
            pair_rows(a.rows, a.pairs, n32, D, C);
            chunk_sums(a, n32, Tq, Hp, C, G, first);
            first = false;
        }
    }

    // pool row `slot` as the chunk's row n: bf16 as it lies; FP8 values / 256 in bf16 (exact), the rope
    // after them, the scales times 256 by group
    __attribute__((target("avx512bf16")))
    void gather(int64_t slot, int64_t n) {
        if (G == 0) return (void)std::memcpy(a.rows + n * D, rows.tail + slot * D, D * 2);
        e4m3_bf16(rows.q + slot * C, a.rows + n * D, C);
        std::memcpy(a.rows + n * D + C, rows.tail + slot * (D - C), (D - C) * 2);
        for (int64_t g = 0; g < G; ++g) a.scl[g * AMX_ROWS + n] = rows.scale[slot * G + g] * 256.f;
    }

    void write(float* acc) const {
        const int64_t P = C + 2;
        for (int64_t h = 0; h < H; ++h) {
            if (first) std::memset(acc + h * P, 0, C * sizeof(float));   // no rows: nothing summed
            else std::memcpy(acc + h * P, a.o + h * C, C * sizeof(float));
            acc[h * P + C] = a.m[h], acc[h * P + C + 1] = a.l[h];
        }
    }
};
#endif
