// The int8 GEMV on AMX tiles (built by native.py after vec.h and gemv.cpp with INT8 and AMX
// defined, where the CPU has AMX-INT8 and the process may use its tile data): y[m, n] = sum_k
// x[m, k] * W[n, k] * s[n, k / G], as gemv.cpp computes it, without gemv.cpp's two conversions
// (int8 -> int32 -> fp32) per 16 weights, which keep that loop at ~80% of the memory's read rate.
//
// Each activation row x[m] is split, per group of G columns, into a scale and three int8 "limbs":
// x[k] = sx * (a0[k] + a1[k] / 254 + a2[k] / 254^2) + e, |e| <= sx * 0.5 / 254^2 (sx = max |x| / 127
// over the group, so e is within 6.1e-8 of the group's largest |x|: fp32's own rounding).
// TDPBSSD then sums the int8 products exactly in int32 (the weight rows are the A tile, read in
// place from the [N, K] layout; the limbs of every row of x are the columns of B), and each group's
// three sums meet their scales in fp32. Rows past the last whole 16 take gemv.cpp's row_dot.
// Callers guarantee K % G == 0, G % 64 == 0, M <= 4 (12 columns of B), and ISA 512.
#include <vector>

static const int64_t ROWS = 16;        // weight rows a tile (the A tile's rows)
static const int64_t CHUNK = 64;       // columns a tile op (the A tile's 64 bytes a row)
static const int LIMBS = 3;
static const int64_t AHEAD = 4;        // groups ahead that each row prefetches (measured: 1-8)

struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

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

__attribute__((target("amx-tile,amx-int8")))
extern "C" void kernel(const float* x, const int8_t* w, const float* s, float* y,
                       const int64_t M, const int64_t N, const int64_t K, const int64_t G) {
    const int64_t Gs = K / G, width = 4 * LIMBS * M, cols = LIMBS * M, blocks = N / ROWS;
    std::vector<int8_t> b(K / CHUNK * ROWS * width);
    std::vector<float> sx(M * Gs);
    split_rows(x, b.data(), sx.data(), M, K, G);
    #pragma omp parallel
    {
        TileConfig cfg = {};
        cfg.palette = 1;
        cfg.rows[0] = ROWS, cfg.colsb[0] = 4 * cols;         // C: int32 [16, cols]
        cfg.rows[1] = ROWS, cfg.colsb[1] = CHUNK;            // A: the weights' [16, 64] bytes
        cfg.rows[2] = ROWS, cfg.colsb[2] = width;            // B: [16, 4 * cols] limb bytes
        _tile_loadconfig(&cfg);
        alignas(64) int32_t c[ROWS * 4 * LIMBS];
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i at_c = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)cols));
        const __m512i at_s = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)Gs));
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int8_t* wb = w + blk * ROWS * K;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t g = 0; g < Gs; ++g) {
                // this block's rows AHEAD groups on, or the next block's first groups
                const int64_t ga = g + AHEAD;
                const char* pf = (const char*)(ga < Gs ? wb + ga * G : wb + ROWS * K + (ga - Gs) * G);
                for (int64_t r = 0; r < ROWS; ++r)
                    for (int64_t l = 0; l < G; l += 64) _mm_prefetch(pf + r * K + l, _MM_HINT_T0);
                _tile_zero(0);
                for (int64_t k = g * G; k < (g + 1) * G; k += CHUNK) {
                    _tile_loadd(1, wb + k, K);
                    _tile_loadd(2, b.data() + k / CHUNK * ROWS * width, width);
                    _tile_dpbssd(0, 1, 2);
                }
                _tile_stored(0, c, 4 * cols);
                const __m512 sw = _mm512_i32gather_ps(at_s, s + blk * ROWS * Gs + g, 4);   // [16] row scales
                for (int64_t m = 0; m < M; ++m) {
                    const int32_t* cm = c + m * LIMBS;
                    __m512 v = _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm + 2, 4));
                    v = _mm512_fmadd_ps(v, _mm512_set1_ps(1.f / 254.f),
                                        _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm + 1, 4)));
                    v = _mm512_fmadd_ps(v, _mm512_set1_ps(1.f / 254.f),
                                        _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at_c, cm, 4)));
                    acc[m] = _mm512_fmadd_ps(v, _mm512_mul_ps(sw, _mm512_set1_ps(sx[m * Gs + g])), acc[m]);
                }
            }
            for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + blk * ROWS, acc[m]);
        }
        _tile_release();
    }
    for (int64_t n = blocks * ROWS; n < N; ++n)
        for (int64_t m = 0; m < M; ++m)
            y[m * N + n] = row_dot(x + m * K, w + n * K, s + n * Gs, K, G);
}
