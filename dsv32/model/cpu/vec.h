// Float vector operations for the native kernels (prepended to each by native.py): ISA 512 (AVX-512),
// 256 (AVX2 + FMA + F16C) or 1 (portable scalar code); by default the best the compiler targets.
#include <cstdint>
#include <cstring>
#if !defined(ISA)
#if defined(__AVX512F__)
#define ISA 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ISA 256
#else
#define ISA 1
#endif
#endif
#if ISA > 1
#include <immintrin.h>
#endif

#if ISA == 512
#define WIDTH 16
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vset1(float s) { return _mm512_set1_ps(s); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vmax0(vf a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }   // NaN stays NaN
#elif ISA == 256
#define WIDTH 8
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vset1(float s) { return _mm256_set1_ps(s); }
static inline vf vmax0(vf a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define WIDTH 1
typedef float vf;
static inline vf vzero() { return 0.f; }
static inline vf vload(const float* p) { return *p; }
static inline void vstore(float* p, vf a) { *p = a; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vdiv(vf a, vf b) { return a / b; }
static inline vf vset1(float s) { return s; }
static inline float vsum(vf a) { return a; }
static inline vf vmax0(vf a) { return a < 0.f ? 0.f : a; }
#endif

#if ISA == 512
// the AMX tile configuration (LDTILECFG's 64 bytes): palette 1, each tile's rows and bytes a row
struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
// LDTILECFG of cfg. The empty asm makes the compiler store every field first: GCC 12 does not count
// the instruction as reading its operand's 64 bytes, and a configuration inlined into a larger
// function lost its stores (a #GP at the load, once amx_gemv.cpp's kernel was split into functions).
__attribute__((target("amx-tile"))) static inline void load_tile_config(const TileConfig& cfg) {
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

#if defined(AMX)
// The query / activation split of the AMX kernels (amx_gemv.cpp, amx_index.cpp) for the 16 values
// x[0..16): x = b0 + b1 + b2 + e (|e| <= 2^-24 |x|), each limb the bf16 rounding of what the earlier
// ones left (bf16 products are exact in fp32, so three limbs keep fp32's accuracy). Limb j's pair
// (x[2i], x[2i + 1]) goes to at + i * pair_stride + j * limb_stride (uint16 units).
__attribute__((target("avx512bf16")))
static inline void bf16_limbs(const float* x, uint16_t* at, int64_t pair_stride, int64_t limb_stride) {
    __m512 v = _mm512_loadu_ps(x);
    for (int j = 0; j < 3; ++j) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);               // 16 bf16, rounded to nearest
        alignas(32) uint32_t pair[8];
        _mm256_store_si256((__m256i*)pair, h);
        for (int i = 0; i < 8; ++i) std::memcpy(at + i * pair_stride + j * limb_stride, pair + i, 4);
        v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
}
#endif

// lane j of the result: the sum of a[j]'s 16 lanes
static inline __m512 sum16(const __m512* a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; ++i)            // 128-bit quarters: [a.0+a.2, a.1+a.3, a'.0+a'.2, a'.1+a'.3]
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)            // quarter k of c[i]: 4 partial sums of a[4i + k]
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    const __m512 u0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const __m512 u1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x44), _mm512_shuffle_ps(u0, u1, 0xEE));
    // lane 4k + m of r holds a[4m + k]
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, r);
}
#endif

// q . r over D values (two accumulators, scalar tail)
static inline float dot(const float* q, const float* r, int64_t D) {
    vf a0 = vzero(), a1 = vzero();
    int64_t d = 0;
    for (; d + 2 * WIDTH <= D; d += 2 * WIDTH) {
        a0 = vfma(vload(q + d), vload(r + d), a0);
        a1 = vfma(vload(q + d + WIDTH), vload(r + d + WIDTH), a1);
    }
    float acc = vsum(vadd(a0, a1));
    for (; d < D; ++d) acc += q[d] * r[d];
    return acc;
}

// out[i] = q[i] . r for the n <= 4 query rows q + i * D: one pass over r for all of them
static inline void dots4(const float* q, const float* r, int64_t D, int64_t n, float* out) {
    if (n < 4) {
        for (int64_t i = 0; i < n; ++i) out[i] = dot(q + i * D, r, D);
        return;
    }
    vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t d = 0;
    for (; d + WIDTH <= D; d += WIDTH) {
        const vf x = vload(r + d);
        a0 = vfma(vload(q + d), x, a0);
        a1 = vfma(vload(q + D + d), x, a1);
        a2 = vfma(vload(q + 2 * D + d), x, a2);
        a3 = vfma(vload(q + 3 * D + d), x, a3);
    }
    out[0] = vsum(a0), out[1] = vsum(a1), out[2] = vsum(a2), out[3] = vsum(a3);
    for (; d < D; ++d)
        for (int64_t i = 0; i < 4; ++i) out[i] += q[i * D + d] * r[d];
}

// the cache slot of key position s through a block table of B-slot blocks
static inline int64_t slot_of(const int64_t* table, int64_t B, int64_t s) { return table[s / B] * B + s % B; }

