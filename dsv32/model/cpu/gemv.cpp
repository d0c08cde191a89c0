// Packed-weight GEMV for decode: y[m, n] = sum_k x[m, k] * W[n, k], fp32 activations, W stored as
// int8 with one fp32 scale per (row, G columns) (INT8), as fp16 / bf16 (HALF_FP16 / HALF_BF16), or
// fp32 (FP32: the native decode layer's plain weights). Built by dsv32/model/cpu/native.py after
// vec.h, with one of those defined (and ISA, see vec.h, when the tests build each variant); LAYER
// leaves the entry point to layer_attn.cpp / layer_ffn.cpp, which use row_dot.
//
// Each weight row is read once, in order, for all M activation rows: one row (row_dot) or a block
// of rows (block_dots: four rows side by side where K is long, a batch's activation rows against
// each loaded weight vector) at a time, every output summed as row_dot sums it, so a row's result
// does not depend on the batch it came in. Two accumulators per group hide the FMA latency and
// the group's scale multiplies the vector sum (one horizontal sum an output).
// A software prefetch 16 KiB ahead keeps the stream at the memory's bandwidth (without it, ~17
// GB/s of ~26 on the Intel Xeon this was measured on); on AMD's Zen the hardware prefetchers keep
// row_dot's one stream going by themselves and the prefetches only cost (bench-model decode steps
// 1.06-1.1x faster without them), so row_dot prefetches on Intel CPUs only; block_dots' four
// streams of a row each need them there too (an int8 7168-column GEMV 1.18x). Rows are split
// across OpenMP threads.
// Callers guarantee K % 32 == 0 and (INT8) G % 32 == 0, K % G == 0.

#include <algorithm>

#if defined(INT8)
typedef int8_t wt;
#elif defined(FP32)
typedef float wt;
#else
typedef uint16_t wt;
#endif

static const int64_t PREFETCH_BYTES = 16384;
#if defined(__x86_64__)
static const bool ROW_PREFETCH = (__builtin_cpu_init(), __builtin_cpu_is("intel"));   // see above
#else
static const bool ROW_PREFETCH = false;
#endif

// WIDTH weights as fp32
#if defined(FP32)
static inline vf wload(const wt* p) { return vload(p); }
#elif ISA == 512
static inline vf wload(const wt* p) {
#if defined(INT8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(HALF_FP16)
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#endif
}
#elif ISA == 256
static inline vf wload(const wt* p) {
#if defined(INT8)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#elif defined(HALF_FP16)
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#endif
}
#else
static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline vf wload(const wt* p) {
#if defined(INT8)
    return (float)*p;
#elif defined(HALF_FP16)
    const uint32_t h = *p, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_to_float(sign | 0x7f800000u | (m << 13));          // inf, nan
    if (e == 0) {                                                                    // zero, subnormal
        const float v = (float)m * 5.9604644775390625e-08f;                          // m * 2^-24
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((e + 112) << 23) | (m << 13));
#else
    return bits_to_float((uint32_t)*p << 16);
#endif
}
#endif

// One output: the dot product of x [K] with the weight row w [K] (scales s [K / G] for int8).
static inline float row_dot(const float* x, const wt* w, const float* s, int64_t K, int64_t G) {
    vf acc = vzero();
    for (int64_t g = 0; g < K; g += G) {
        vf a0 = vzero(), a1 = vzero();
        for (int64_t k = g; k < g + G; k += 2 * WIDTH) {
            if (ROW_PREFETCH) __builtin_prefetch((const char*)(w + k) + PREFETCH_BYTES);
            a0 = vfma(wload(w + k), vload(x + k), a0);
            a1 = vfma(wload(w + k + WIDTH), vload(x + k + WIDTH), a1);
        }
#if defined(INT8)
        acc = vfma(vadd(a0, a1), vset1(s[g / G]), acc);
#else
        acc = vadd(acc, vadd(a0, a1));
#endif
    }
    return vsum(acc);
}

// NR x MR outputs, each as row_dot computes it (the same sums in the same order): y[m * ldy + r] =
// the dot product of x + m * K with the weight row w + r * K (scales s + r * (K / G)), r < NR,
// m < MR. Each weight vector is loaded once for the MR activation rows and each x vector once for
// the NR weight rows. One activation row takes four weight rows where x is long (QUAD_K: 7168 or
// 16384 fp32 values no longer stay in L1 beside the weight stream, and row_dot read x from L2 once
// a row; with shorter x one stream of weights at a time reads faster: bench/README.md,
// "Weight-format kernels"); a batch's rows take blocks (gemv_rows), where row_dot's loop per
// activation row was bound by its loads.
static const int64_t QUAD_K = 4096;
template <int NR, int MR>
static inline void block_dots(const float* x, const wt* w, const float* s, int64_t K, int64_t G, float* y,
                              int64_t ldy) {
    vf acc[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[r][m] = vzero();
    for (int64_t g = 0; g < K; g += G) {
        vf a0[NR][MR], a1[NR][MR];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MR; ++m) a0[r][m] = a1[r][m] = vzero();
        for (int64_t k = g; k < g + G; k += 2 * WIDTH) {
            vf x0[MR], x1[MR];
            for (int m = 0; m < MR; ++m) x0[m] = vload(x + m * K + k), x1[m] = vload(x + m * K + k + WIDTH);
            for (int r = 0; r < NR; ++r) {
                const wt* wr = w + r * K;
                __builtin_prefetch((const char*)(wr + k) + PREFETCH_BYTES);
                const vf w0 = wload(wr + k), w1 = wload(wr + k + WIDTH);
                for (int m = 0; m < MR; ++m) a0[r][m] = vfma(w0, x0[m], a0[r][m]), a1[r][m] = vfma(w1, x1[m], a1[r][m]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MR; ++m)
#if defined(INT8)
                acc[r][m] = vfma(vadd(a0[r][m], a1[r][m]), vset1(s[r * (K / G) + g / G]), acc[r][m]);
#else
                acc[r][m] = vadd(acc[r][m], vadd(a0[r][m], a1[r][m]));
#endif
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) y[m * ldy + r] = vsum(acc[r][m]);
}

// y[n] = W[n] . x for the rows n0 <= n < n1 of W [N, K] (scales s [N, K / G] for int8, else null):
// four at a time where K >= QUAD_K
static inline void rows_dot(const float* x, const wt* w, const float* s, int64_t K, int64_t G, int64_t n0,
                            int64_t n1, float* y) {
    const int64_t Gs = s ? K / G : 0;                    // (s + n * Gs: null for null s)
    int64_t n = n0;
    if (K >= QUAD_K)
        for (; n + 4 <= n1; n += 4) block_dots<4, 1>(x, w + n * K, s + n * Gs, K, G, y + n, 0);
    for (; n < n1; ++n) y[n] = row_dot(x, w + n * K, s + n * Gs, K, G);
}

#if defined(AMX) || defined(LAYER)
// the entry points are amx_gemv.cpp's (or the decode layer's)
#else
// y [M, N] = x [M, K] W^T for M > 1: blocks of NR weight rows across the threads, each against MR
// activation rows at a time (the last M % MR one by one, the last N % NR weight rows with row_dot)
template <int NR, int MR>
static void batch_rows(const float* x, const wt* w, const float* s, float* y, int64_t M, int64_t N, int64_t K,
                       int64_t G) {
    const int64_t Gs = s ? K / G : 0, blocks = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(dynamic, blocks / 64 + 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n = NR * b;
        if (n + NR > N) {                                // the last rows
            for (int64_t m = 0; m < M; ++m)
                for (int64_t i = n; i < N; ++i) y[m * N + i] = row_dot(x + m * K, w + i * K, s + i * Gs, K, G);
            continue;
        }
        int64_t m = 0;
        for (; m + MR <= M; m += MR) block_dots<NR, MR>(x + m * K, w + n * K, s + n * Gs, K, G, y + m * N + n, N);
        for (; m < M; ++m) block_dots<NR, 1>(x + m * K, w + n * K, s + n * Gs, K, G, y + m * N + n, N);
    }
}

// y [M, N] = x [M, K] W^T: rows across the threads, each read once for every activation row. A
// batch takes four weight rows by two activation rows where a weight row fills a 4 KiB page, one
// by four where it is shorter (four short rows side by side read slower: their streams share
// pages); one activation row takes row_dot a row (rows_dot: four where K >= QUAD_K). Measured on
// an AMD EPYC against the loop of row_dot per activation row: 1.0-1.45x at 2-32 rows
// (bench/README.md, "Weight-format kernels").
static void gemv_rows(const float* x, const wt* w, const float* s, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t G) {
    if (M > 1 && K * (int64_t)sizeof(wt) >= 4096)
        return batch_rows<4, 2>(x, w, s, y, M, N, K, G);
    if (M > 1)
        return batch_rows<1, 4>(x, w, s, y, M, N, K, G);
    const int64_t Gs = s ? K / G : 0;
    if (K < QUAD_K) {
        #pragma omp parallel for schedule(dynamic, N / 64 + 1)
        for (int64_t n = 0; n < N; ++n) y[n] = row_dot(x, w + n * K, s + n * Gs, K, G);
        return;
    }
    const int64_t quads = (N + 3) / 4;
    #pragma omp parallel for schedule(dynamic, quads / 64 + 1)
    for (int64_t b = 0; b < quads; ++b) rows_dot(x, w, s, K, G, 4 * b, std::min(N, 4 * b + 4), y);
}
#if defined(INT8)
extern "C" void kernel(const float* x, const wt* w, const float* s, float* y,
                       const int64_t M, const int64_t N, const int64_t K, const int64_t G) {
    gemv_rows(x, w, s, y, M, N, K, G);
}
#else
extern "C" void kernel(const float* x, const wt* w, float* y,
                       const int64_t M, const int64_t N, const int64_t K) {
    gemv_rows(x, w, nullptr, y, M, N, K, K);
}
#endif
#endif
