// The packed GEMV on AMX tiles (built by native.py after vec.h and gemv.cpp with AMX and INT8 or
// HALF_BF16 defined, where the CPU has AMX and the process may use its tile data): y[m, n] =
// sum_k x[m, k] * W[n, k] (* s[n, k / G] for int8), as gemv.cpp computes it, without gemv.cpp's
// conversions (int8 -> int32 -> fp32, or bf16 -> fp32) per 16 weights, which keep that loop at
// ~80% of the memory's read rate. The weight rows are the A tile, read in place from the [N, K]
// layout; the activations, split into "limbs" of the tile unit's input type, are the columns of B.
// Rows past the last whole 16 take gemv.cpp's row_dot.
//
// int8 (TDPBSSD): each activation row x[m] is split, per group of G columns, into a scale and
// three int8 limbs: x[k] = sx * (a0[k] + a1[k] / 254 + a2[k] / 254^2) + e, |e| <= sx * 0.5 / 254^2
// (sx = max |x| / 127 over the group, so e is within 6.1e-8 of the group's largest |x|: fp32's own
// rounding). The tile unit sums the int8 products exactly in int32, and each group's three sums
// meet their scales in fp32. Callers guarantee K % G == 0, G % 64 == 0, M <= 15.
//
// bf16 (TDPBF16PS): x[k] = b0[k] + b1[k] + b2[k] + e, each limb the bf16 rounding of what the
// earlier ones left (|e| <= 2^-24 |x|); the products of bf16 values are exact in fp32, which the
// tile unit sums them in (no groups: one sum per limb over all K). Callers guarantee K % 32 == 0,
// M <= 15. Both: ISA 512; the weight tile is read once for all M rows (5 a B tile, 3 B tiles).
// The decode layer (layer.cpp, built with LAYER: no entry point here) runs the same blocks
// (amx_block) over activations it splits once (AmxRows) inside its own OpenMP team.
#include <algorithm>
#include <vector>

namespace amx_gemv {            // (the decode layer's build holds other kernels' ROWS, CHUNK, ...)

static const int64_t ROWS = 16;        // weight rows a tile (the A tile's rows)
static const int LIMBS = 3;
static const int64_t PER_TILE = 5;     // activation rows a B tile holds (their limbs: 15 of 16 columns)
static const int TILES = 3;            // B and C tiles beside the A tile: up to 15 activation rows
                                       // (tiles: C_t = t, A = 3, B_t = 4 + t)

// The activation rows in groups of PER_TILE, one B tile (and one C tile) a group
struct Groups {
    int64_t n, rows[TILES], width[TILES];   // groups, rows and B-tile row bytes of each
    Groups(int64_t M, int64_t bytes) : n((M + PER_TILE - 1) / PER_TILE) {
        for (int64_t t = 0; t < n; ++t) {
            rows[t] = std::min(PER_TILE, M - t * PER_TILE);
            width[t] = bytes * LIMBS * rows[t];
        }
    }
    // the tile unit's configuration: C_t [16, 4 * columns] bytes, A [16, 64], B_t [16, width]
    __attribute__((target("amx-tile"))) void configure() const {
        TileConfig cfg = {};
        cfg.palette = 1;
        cfg.rows[3] = ROWS, cfg.colsb[3] = 64;
        for (int64_t t = 0; t < n; ++t) {
            cfg.rows[t] = ROWS, cfg.colsb[t] = 4 * LIMBS * rows[t];
            cfg.rows[4 + t] = ROWS, cfg.colsb[4 + t] = width[t];
        }
        load_tile_config(cfg);
    }
    __attribute__((target("amx-tile"))) void zero() const {
        _tile_zero(0);
        if (n > 1) _tile_zero(1);
        if (n > 2) _tile_zero(2);
    }
    // C_t -> c + t * ROWS * 16 (4-byte values: int32 or fp32), row r at c + r * 16: a row's columns
    // are the lanes of one vector (those past LIMBS * rows[t] are not written)
    __attribute__((target("amx-tile"))) void store(void* c) const {
        char* at = (char*)c;
        _tile_stored(0, at, 64);
        if (n > 1) _tile_stored(1, at + 64 * ROWS, 64);
        if (n > 2) _tile_stored(2, at + 128 * ROWS, 64);
    }
};

// C_t += A . B_t for the groups (tile numbers are immediates: one line a tile); A at a, B_t at b[t]
#define TILE_PRODUCTS(OP, T, a, lda, b, ldb)                                  \
    _tile_loadd(3, a, lda);                                                   \
    _tile_loadd(4, b[0], ldb[0]);                                             \
    OP(0, 3, 4);                                                              \
    if (T > 1) { _tile_loadd(5, b[1], ldb[1]); OP(1, 3, 5); }                 \
    if (T > 2) { _tile_loadd(6, b[2], ldb[2]); OP(2, 3, 6); }

#if defined(INT8)
static const int64_t CHUNK = 64;       // columns a tile op (the A tile's 64 bytes a row)
static const int64_t AHEAD = 4;        // groups ahead that each row prefetches (measured: 1-8)

// x [M, K] -> the B tiles b [K / 64][16 rows][4 * LIMBS * M bytes] (row r, column c = m * LIMBS +
// j holds limb j of x[m, 4r .. 4r + 3]) and the scales sx [M][K / G]; 16 columns at a time
static void split_rows(const float* x, int8_t* b, float* sx, int64_t M, int64_t K, int64_t G) {
    const int64_t width = 4 * LIMBS * M;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < K; g += G) {
            const float* xg = x + m * K + g;
            __m512 top = _mm512_setzero_ps(), nan = _mm512_setzero_ps();    // nan: 0, or NaN if an x is inf / NaN
            for (int64_t k = 0; k < G; k += 16) {
                const __m512 v = _mm512_loadu_ps(xg + k);
                top = _mm512_max_ps(top, _mm512_abs_ps(v));
                nan = _mm512_add_ps(nan, _mm512_mul_ps(v, _mm512_setzero_ps()));
            }
            const float t = _mm512_reduce_max_ps(top) + _mm512_reduce_add_ps(nan);
            const float s = t > 0.f ? t / 127.f : t == 0.f ? 1.f : t;         // NaN: every output NaN
            sx[m * (K / G) + g / G] = s;
            for (int64_t k = 0; k < G; k += 16) {
                const int64_t kk = g + k;
                int8_t* at = b + (kk / CHUNK) * ROWS * width + (kk % CHUNK) / 4 * width + m * 4 * LIMBS;
                __m512 v = _mm512_div_ps(_mm512_loadu_ps(xg + k), _mm512_set1_ps(s));
                for (int j = 0; j < LIMBS; ++j) {
                    const __m512 a = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    alignas(16) int32_t q[4];          // 4 columns' bytes in each int32
                    _mm_store_si128((__m128i*)q, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
                    for (int i = 0; i < 4; ++i) std::memcpy(at + i * width + 4 * j, q + i, 4);
                    v = _mm512_mul_ps(_mm512_sub_ps(v, a), _mm512_set1_ps(254.f));
                }
            }
        }
}

static const int64_t FEW = 2;          // activation rows up to which each row's sums are gathered
                                       // from C (~4 gathers a row); above, C's rows are read whole

// Few rows: out[m] (lane r: weight row r) += (C[r, (m, 0)] + C[r, (m, 1)] / 254 + C[r, (m, 2)] / 254^2)
// * s[r, g] * sx[m, g], C's three columns of row m gathered over the 16 weight rows
static inline void gather_sums(const int32_t* c, const float* sb, const float* sx, int64_t M, int64_t Gs,
                               int64_t g, __m512* out) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i at_c = _mm512_slli_epi32(lane, 4);                              // row r at c + 16 r
    const __m512 sw = _mm512_i32gather_ps(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)Gs)), sb + g, 4);
    for (int64_t m = 0; m < M; ++m) {
        const int32_t* cm = c + m * LIMBS;
        __m512 v = _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm + 2, 4));
        v = _mm512_fmadd_ps(v, _mm512_set1_ps(1.f / 254.f), _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm + 1, 4)));
        v = _mm512_fmadd_ps(v, _mm512_set1_ps(1.f / 254.f), _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm, 4)));
        out[m] = _mm512_fmadd_ps(v, _mm512_mul_ps(sw, _mm512_set1_ps(sx[m * Gs + g])), out[m]);
    }
}

// More rows: acc[t][r, lane (m, j)] += C_t[r, lane] * s[r, g] * lsx[g, t, lane], C's rows read whole
static inline void row_sums(const int32_t (*c)[ROWS * 16], const float* sb, const float* lsx, int64_t T, int64_t Gs,
                            int64_t g, float (*acc)[ROWS * 16]) {
    for (int64_t r = 0; r < ROWS; ++r) {
        const __m512 sw = _mm512_set1_ps(sb[r * Gs + g]);
        for (int64_t t = 0; t < T; ++t) {
            const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(lsx + (g * T + t) * 16), sw);
            float* a = acc[t] + r * 16;
            _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[t] + r * 16)), f, _mm512_load_ps(a)));
        }
    }
}

// The activations x [M, K] as the tile unit takes them: each group's B tile of limbs (split_rows),
// their scales, and (M > FEW) the limbs' weights per lane
struct AmxRows {
    Groups grp;
    std::vector<int8_t> bt[TILES];
    std::vector<float> sx, lsx;         // sx [M][K / G]; lsx [Gs][tiles][16]: lane m * LIMBS + j of tile t in
                                        // group g weighs limb j: sx[m, g] / 254^j (0 past its columns)
    int64_t M = 0, K = 0, G = 0;
    AmxRows() : grp(1, 4) {}
    void set(const float* x, int64_t M_, int64_t K_, int64_t G_) {
        M = M_, K = K_, G = G_, grp = Groups(M, 4);
        const int64_t Gs = K / G;
        sx.assign(M * Gs, 0.f);
        for (int64_t t = 0; t < grp.n; ++t) {
            bt[t].resize(K / CHUNK * ROWS * grp.width[t]);
            split_rows(x + t * PER_TILE * K, bt[t].data(), sx.data() + t * PER_TILE * Gs, grp.rows[t], K, G);
        }
        lsx.assign(M > FEW ? Gs * grp.n * 16 : 0, 0.f);
        for (int64_t g = 0; g < Gs && M > FEW; ++g)
            for (int64_t t = 0; t < grp.n; ++t)
                for (int64_t l = 0; l < LIMBS * grp.rows[t]; ++l)
                    lsx[(g * grp.n + t) * 16 + l] = sx[(t * PER_TILE + l / LIMBS) * Gs + g] *
                                                    (l % LIMBS == 0 ? 1.f : l % LIMBS == 1 ? 1.f / 254.f : 1.f / 64516.f);
    }
};

// A thread's tile outputs and sums (weight row r, lane (m, j): limb j's sum, where M > FEW)
struct AmxSums {
    alignas(64) int32_t c[TILES][ROWS * 16] = {};
    alignas(64) float acc[TILES][ROWS * 16];
};

// One row (decode's common case): out (lane r: weight row r) += (C[r, 0] + C[r, 1] / 254 + C[r, 2] /
// 254^2) * s[r, g] * sx[g], from C stored packed (c: 16 rows of 3 int32, tile row stride 12 bytes):
// each limb's column taken by two permutes where gather_sums' gathers cost ~3x the block's tile ops
static inline void one_row_sums(const int32_t* c, const float* sb, float sx, int64_t Gs, int64_t g, __m512& out) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 sw = _mm512_i32gather_ps(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)Gs)), sb + g, 4);
    const __m512i c0 = _mm512_loadu_si512(c), c1 = _mm512_loadu_si512(c + 16), c2 = _mm512_loadu_si512(c + 32);
    const __m512i three = _mm512_mullo_epi32(lane, _mm512_set1_epi32(3));
    __m512 limb[LIMBS];
    for (int j = 0; j < LIMBS; ++j) {                    // lane r: c[3 r + j], from c0|c1 below 32, else c2
        const __m512i at = _mm512_add_epi32(three, _mm512_set1_epi32(j));
        const __m512i low = _mm512_permutex2var_epi32(c0, at, c1);
        const __mmask16 high = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32(32));
        limb[j] = _mm512_cvtepi32_ps(_mm512_mask_permutexvar_epi32(low, high, _mm512_sub_epi32(at, _mm512_set1_epi32(32)), c2));
    }
    __m512 v = _mm512_fmadd_ps(limb[2], _mm512_set1_ps(1.f / 254.f), limb[1]);
    v = _mm512_fmadd_ps(v, _mm512_set1_ps(1.f / 254.f), limb[0]);
    out = _mm512_fmadd_ps(v, _mm512_mul_ps(sw, _mm512_set1_ps(sx)), out);
}

// y[m, n] for the 16 weight rows of block blk (n = 16 blk ..), every row m of a (W [N, K], s [N, K / G]);
// the thread's tiles configured for a's groups
__attribute__((target("amx-tile,amx-int8")))
static inline void amx_block(const AmxRows& a, const int8_t* w, const float* s, float* y, int64_t N, int64_t blk,
                             AmxSums& z) {
    const int64_t M = a.M, K = a.K, G = a.G, Gs = K / G;
    const Groups& grp = a.grp;
    const int8_t* wb = w + blk * ROWS * K;
    const float* sb = s + blk * ROWS * Gs;
    __m512 few[FEW];                                     // few rows: row m, lane r
    for (int64_t m = 0; m < std::min(M, FEW); ++m) few[m] = _mm512_setzero_ps();
    if (M > FEW) std::fill(z.acc[0], z.acc[0] + grp.n * ROWS * 16, 0.f);
    for (int64_t g = 0; g < Gs; ++g) {
        // this block's rows AHEAD groups on, or the next block's first groups
        const int64_t ga = g + AHEAD;
        const char* pf = (const char*)(ga < Gs ? wb + ga * G : wb + ROWS * K + (ga - Gs) * G);
        for (int64_t r = 0; r < ROWS; ++r)
            for (int64_t l = 0; l < G; l += 64) _mm_prefetch(pf + r * K + l, _MM_HINT_T0);
        grp.zero();
        for (int64_t k = g * G; k < (g + 1) * G; k += CHUNK) {
            const int8_t* b[TILES];
            for (int64_t t = 0; t < grp.n; ++t) b[t] = a.bt[t].data() + k / CHUNK * ROWS * grp.width[t];
            TILE_PRODUCTS(_tile_dpbssd, grp.n, wb + k, K, b, grp.width)
        }
        if (M == 1) {
            _tile_stored(0, z.c[0], 4 * LIMBS);
            one_row_sums(z.c[0], sb, a.sx[g], Gs, g, few[0]);
            continue;
        }
        grp.store(z.c);
        if (M > FEW)
            row_sums(z.c, sb, a.lsx.data(), grp.n, Gs, g, z.acc);
        else
            gather_sums(z.c[0], sb, a.sx.data(), M, Gs, g, few);
    }
    if (M <= FEW) {
        for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + blk * ROWS, few[m]);
        return;
    }
    for (int64_t t = 0; t < grp.n; ++t)
        for (int64_t r = 0; r < ROWS; ++r)
            for (int64_t i = 0; i < grp.rows[t]; ++i) {
                const float* acc = z.acc[t] + r * 16 + i * LIMBS;
                y[(t * PER_TILE + i) * N + blk * ROWS + r] = (acc[2] + acc[1]) + acc[0];
            }
}

#endif

#if defined(HALF_BF16)
static const int64_t CHUNK = 32;       // columns a tile op (the A tile's 64 bytes a row)
static const int64_t AHEAD = 8;        // chunks ahead that each row prefetches (4-16 measured: within 2%)

// x [M, K] -> the B tiles b [K / 32][16 rows][2 * LIMBS * M] bf16 (row r, column c = m * LIMBS + j
// holds limb j of x[m, 2r], x[m, 2r + 1]); 16 columns at a time
__attribute__((target("avx512bf16")))
static void split_rows(const float* x, uint16_t* b, int64_t M, int64_t K) {
    const int64_t width = 2 * LIMBS * M;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; k += 16)
            bf16_limbs(x + m * K + k, b + (k / CHUNK) * ROWS * width + (k % CHUNK) / 2 * width + m * 2 * LIMBS, width, 2);
}

// The activations x [M, K] as the tile unit takes them: each group's B tile of limbs (split_rows)
struct AmxRows {
    Groups grp;
    std::vector<uint16_t> bt[TILES];
    int64_t M = 0, K = 0;
    AmxRows() : grp(1, 4) {}
    void set(const float* x, int64_t M_, int64_t K_, int64_t = 0) {
        M = M_, K = K_, grp = Groups(M, 4);                  // B rows: 2 bf16 (4 bytes) a column
        for (int64_t t = 0; t < grp.n; ++t) {
            bt[t].resize(K / CHUNK * ROWS * grp.width[t] / 2);
            split_rows(x + t * PER_TILE * K, bt[t].data(), grp.rows[t], K);
        }
    }
};

struct AmxSums { alignas(64) float c[TILES][ROWS * 16]; };   // a thread's tile outputs

// y[m, n] for the 16 weight rows of block blk (n = 16 blk ..), every row m of a (W [N, K]); the
// thread's tiles configured for a's groups
__attribute__((target("amx-tile,amx-bf16")))
static inline void amx_block(const AmxRows& a, const uint16_t* w, const float*, float* y, int64_t N, int64_t blk,
                             AmxSums& z) {
    const int64_t M = a.M, K = a.K, chunks = K / CHUNK;
    const Groups& grp = a.grp;
    const uint16_t* wb = w + blk * ROWS * K;
    grp.zero();
    for (int64_t ch = 0; ch < chunks; ++ch) {
        // this block's rows AHEAD chunks on, or the next block's first chunks
        const int64_t ca = ch + AHEAD;
        const char* pf = (const char*)(ca < chunks ? wb + ca * CHUNK : wb + ROWS * K + (ca - chunks) * CHUNK);
        for (int64_t r = 0; r < ROWS; ++r) _mm_prefetch(pf + r * 2 * K, _MM_HINT_T0);
        const uint16_t* b[TILES];
        for (int64_t t = 0; t < grp.n; ++t) b[t] = a.bt[t].data() + ch * ROWS * grp.width[t] / 2;
        TILE_PRODUCTS(_tile_dpbf16ps, grp.n, wb + ch * CHUNK, 2 * K, b, grp.width)
    }
    grp.store(z.c);
    for (int64_t r = 0; r < ROWS; ++r)
        for (int64_t m = 0; m < M; ++m) {
            const float* cm = z.c[m / PER_TILE] + r * 16 + (m % PER_TILE) * LIMBS;
            y[m * N + blk * ROWS + r] = (cm[2] + cm[1]) + cm[0];
        }
}

#endif

}  // namespace amx_gemv

#if !defined(LAYER)                  // the decode layer (layer.cpp) calls amx_block itself
#if defined(INT8)
#define AMX_GEMV_TARGET "amx-tile,amx-int8"
#else
#define AMX_GEMV_TARGET "amx-tile,amx-bf16"
#endif

// y = x W^T for either storage (int8: s and G; bf16: s null, G = K): the whole blocks on tiles, the
// rows past the last whole 16 with row_dot
__attribute__((target(AMX_GEMV_TARGET)))
static void gemv_tiles(const float* x, const wt* w, const float* s, float* y, const int64_t M, const int64_t N,
                       const int64_t K, const int64_t G) {
    using namespace amx_gemv;
    const int64_t blocks = N / ROWS;
    AmxRows a;
    a.set(x, M, K, G);
    #pragma omp parallel
    {
        a.grp.configure();
        AmxSums z;
        // blocks go to threads ~1/64 at a time as they come free: a static half each waits on the
        // slower thread (a vCPU whose sibling is busy; the int8 LM head ~10% faster on a loaded host)
        #pragma omp for schedule(dynamic, blocks / 64 + 1)
        for (int64_t blk = 0; blk < blocks; ++blk) amx_block(a, w, s, y, N, blk, z);
        _tile_release();
    }
    for (int64_t n = blocks * ROWS; n < N; ++n)
        for (int64_t m = 0; m < M; ++m)
            y[m * N + n] = row_dot(x + m * K, w + n * K, s ? s + n * (K / G) : nullptr, K, G);
}

#if defined(INT8)
extern "C" void kernel(const float* x, const int8_t* w, const float* s, float* y,
                       const int64_t M, const int64_t N, const int64_t K, const int64_t G) {
    gemv_tiles(x, w, s, y, M, N, K, G);
}
#endif
#if defined(HALF_BF16)
extern "C" void kernel(const float* x, const uint16_t* w, float* y, const int64_t M, const int64_t N, const int64_t K) {
    gemv_tiles(x, w, nullptr, y, M, N, K, K);
}
#endif
#endif
