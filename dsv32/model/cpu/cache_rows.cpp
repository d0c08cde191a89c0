// How the decode kernels read and write a cache pool's rows (built by native.py after vec.h, before
// index_topk.cpp): an fp32 pool, read in place; a bf16 pool; or the FP8 deployment layout of
// engine/cache.py: e4m3 values with one fp32 scale per GROUP of them and, for the latent, its R rope
// values in bf16 after them. Reads hand out fp32 rows (a pointer into the fp32 pool, or rows
// converted into the caller's scratch: value x scale as `dequantize_groups` rounds it, bf16 exactly);
// writes round as the engine's do (FP8: as `quantize_groups`, scale = max(amax, 1e-12) / 448, value /
// scale rounded to nearest even; bf16: to nearest even).
#include <cmath>

static const int64_t GROUP = 128;

// an e4m3fn byte's value: exponent bias 7, subnormals at steps of 2^-9
static inline float fp8_value(uint8_t x) {
    const int e = (x >> 3) & 15, m = x & 7;
    const float v = e ? std::ldexp((float)(8 + m), e - 10) : std::ldexp((float)m, -9);
    return x & 0x80 ? -v : v;
}

// out[i] = value of x[i] * s for i < n. Vectorised: the byte's exponent and mantissa placed in an
// fp16's (bias 15) make the fp16 the value / 256, subnormals included, which the hardware converts;
// (v / 256) * (256 s) rounds as v * s (powers of two are exact)
static inline void fp8_dequant(const uint8_t* x, float s, float* out, int64_t n) {
    int64_t i = 0;
#if ISA == 512
    const __m512 sv = _mm512_set1_ps(s * 256.f);
    const __m256i sign = _mm256_set1_epi16(0x4000);
    for (; i + 16 <= n; i += 16) {                         // b << 7, its bit 14 (the sign) moved to 15
        const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(x + i))), 7);
        const __m256i h = _mm256_add_epi16(b, _mm256_and_si256(b, sign));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtph_ps(h), sv));
    }
#elif ISA == 256
    const __m256 sv = _mm256_set1_ps(s * 256.f);
    const __m128i sign = _mm_set1_epi16(0x80), rest = _mm_set1_epi16(0x7F);
    for (; i + 8 <= n; i += 8) {
        const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(x + i)));
        const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, sign), 8),
                                       _mm_slli_epi16(_mm_and_si128(b, rest), 7));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtph_ps(h), sv));
    }
#endif
    for (; i < n; ++i) out[i] = fp8_value(x[i]) * s;
}

// |x| <= 448 -> the nearest e4m3fn byte (ties to even)
static inline uint8_t fp8_of(float x) {
    const float a = std::fabs(x);
    uint8_t code;
    if (a < 0.015625f) {                                   // below 2^-6: subnormal steps of 2^-9
        code = (uint8_t)std::nearbyint(a * 512.f);
    } else {                                               // keep 3 mantissa bits, rebias 127 -> 7
        uint32_t b;
        std::memcpy(&b, &a, 4);
        b += 0x7FFFF + ((b >> 20) & 1);
        code = (uint8_t)((b >> 20) - (120 << 3));
    }
    return std::signbit(x) ? code | 0x80 : code;
}

static inline float bf16_value(uint16_t x) {
    const uint32_t b = (uint32_t)x << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t bf16_of(float x) {                  // nearest, ties to even
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// out[i] = the fp32 value of the bf16 x[i] for i < n (exact: the bits shifted up)
static inline void bf16_dequant(const uint16_t* x, float* out, int64_t n) {
    int64_t i = 0;
#if ISA == 512
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + i))), 16)));
#elif ISA == 256
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(x + i))), 16)));
#endif
    for (; i < n; ++i) out[i] = bf16_value(x[i]);
}

// One pool's rows of D values: fp32 [N, D], or (f32 null) FP8 values [N, D - R], their scales
// [N, (D - R) / GROUP] and R bf16 values [N, R]; a bf16 pool [N, D] is the last with R = D
struct Rows {
    float* f32;
    uint8_t* q;
    float* scale;
    uint16_t* tail;
    int64_t D, R;

    // the n consecutive rows from `slot` in fp32: in place, or dequantised into scratch [n, D]
    const float* get(int64_t slot, int64_t n, float* scratch) const {
        if (f32) return f32 + slot * D;
        const int64_t Q = D - R;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t row = slot + i;
            float* out = scratch + i * D;
            for (int64_t g = 0; g < Q; g += GROUP) fp8_dequant(q + row * Q + g, scale[row * (Q / GROUP) + g / GROUP], out + g, GROUP);
            bf16_dequant(tail + row * R, out + Q, R);
        }
        return scratch;
    }

    void prefetch(int64_t slot) const {
        if (f32) {
            for (int64_t c = 0; c < D * (int64_t)sizeof(float); c += 64) __builtin_prefetch((const char*)(f32 + slot * D) + c);
            return;
        }
        for (int64_t c = 0; c < D - R; c += 64) __builtin_prefetch(q + slot * (D - R) + c);
        for (int64_t c = 0; c < R * 2; c += 64) __builtin_prefetch((const char*)(tail + slot * R) + c);
    }

    void put(int64_t slot, const float* x) {
        if (f32) {
            std::memcpy(f32 + slot * D, x, D * sizeof(float));
            return;
        }
        const int64_t Q = D - R;
        for (int64_t g = 0; g < Q; g += GROUP) {
            float amax = 0.f;
            for (int64_t i = 0; i < GROUP; ++i) amax = std::fmax(amax, std::fabs(x[g + i]));
            const float s = std::fmax(amax, 1e-12f) / 448.f;
            scale[slot * (Q / GROUP) + g / GROUP] = s;
            for (int64_t i = 0; i < GROUP; ++i) q[slot * Q + g + i] = fp8_of(std::fmin(std::fmax(x[g + i] / s, -448.f), 448.f));
        }
        for (int64_t r = 0; r < R; ++r) tail[slot * R + r] = bf16_of(x[Q + r]);
    }
};

// layout 0: an fp32 pool f32 [N, D]; 1: FP8 (q, scale) with R bf16 values after them (half); 2: a
// bf16 pool half [N, D] (the Python side: cpu/pages.LAYOUTS)
static inline Rows rows_of(int64_t layout, float* f32, uint8_t* q, float* scale, uint16_t* half, int64_t D, int64_t R) {
    if (layout == 0) return Rows{f32, nullptr, nullptr, nullptr, D, 0};
    if (layout == 1) return Rows{nullptr, q, scale, half, D, R};
    return Rows{nullptr, nullptr, nullptr, half, D, D};
}
