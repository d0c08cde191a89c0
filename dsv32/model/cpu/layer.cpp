// The pieces of a block's decode row in native code (layer_attn.cpp, layer_ffn.cpp), built after
// vec.h, gemv.cpp (LAYER: its weight type `wt`, row_dot and rows_dot, without its entry point) and, with AMX,
// amx_gemv.cpp (its tile blocks for int8 and bf16 weights). One token, every weight read in place
// in its packed format (int8 with a scale per row and group of group_of(K) columns, bf16, fp16) or
// fp32; the small vectors between the products stay in the caller's work buffer. Functions named
// team_* share their loop among the threads of the caller's OpenMP parallel region and end without
// a barrier: the caller places one before the outputs are read. Each mirrors a module of the eager
// forward, named beside it.
#include <algorithm>
#include <cmath>
#include <omp.h>

static const int64_t TEAM_ROWS = 16;                     // weight rows a thread takes at a time

#if defined(AMX) && ISA == 512 && (defined(INT8) || defined(HALF_BF16))
#define TILED 1                     // the weights' products on AMX tiles (amx_gemv.cpp's blocks)
#else
#define TILED 0
#endif

// A packed weight [N, K]; s: the int8 scales [N, K / group_of(K)] (unused otherwise)
struct Weight { const wt* w; const float* s; int64_t N, K; };

static inline int64_t group_of(int64_t K) { return K % 128 == 0 ? 128 : K; }   // cpu/packed.group_size

// Weight rows [n0, n1) of m (rows n0 on: a Weight of its own)
static inline Weight rows_of(const Weight& m, int64_t n0, int64_t n1) {
    return Weight{m.w + n0 * m.K, m.s ? m.s + n0 * (m.K / group_of(m.K)) : nullptr, n1 - n0, m.K};
}

// An activation vector x [K] as the products read it; in TILED builds also as amx_gemv.cpp's
// limbs, which one thread prepares (`set`) for every product that reads x
struct Act {
    const float* x = nullptr;
    int64_t K = 0;
#if TILED
    amx_gemv::AmxRows tiles;
    bool tiled = false;
#endif
    void set(const float* x_, int64_t K_) {
        x = x_, K = K_;
#if TILED
#if defined(INT8)
        tiled = group_of(K) % 64 == 0;                  // amx_gemv.cpp's int8 groups: a multiple of 64
#else
        tiled = true;
#endif
        if (tiled) tiles.set(x, 1, K, group_of(K));
#endif
    }
};

// Each thread's tiles for the team's products (one activation row: amx_gemv.cpp's groups of 1)
static void tiles_begin() {
#if TILED
    amx_gemv::Groups(1, 4).configure();
#endif
}

static void tiles_end() {
#if TILED
    _tile_release();
#endif
}

// y[n] = W[n] . x for the rows of block blk (TEAM_ROWS rows from TEAM_ROWS * blk): a whole block
// on tiles where x has them, else (and a last partial block) with gemv.cpp's rows_dot
static inline void weight_block(const Weight& m, const Act& a, float* y, int64_t blk) {
    const int64_t n0 = blk * TEAM_ROWS, n1 = std::min(m.N, n0 + TEAM_ROWS);
#if TILED
    static_assert(TEAM_ROWS == amx_gemv::ROWS, "a block is one A tile");
    if (a.tiled && n1 - n0 == TEAM_ROWS) {
        thread_local amx_gemv::AmxSums z;
        return amx_gemv::amx_block(a.tiles, m.w, m.s, y, m.N, blk, z);
    }
#endif
    rows_dot(a.x, m.w, m.s, m.K, group_of(m.K), n0, n1, y);
}

static inline int64_t blocks_of(const Weight& m) { return (m.N + TEAM_ROWS - 1) / TEAM_ROWS; }

// y = W x (Linear). Runs of consecutive blocks go to the threads as they come free (each block
// prefetches the next one's first rows: amx_gemv.cpp)
static void team_gemv(const Weight& m, const Act& a, float* y) {
    const int64_t blocks = blocks_of(m);
    #pragma omp for schedule(dynamic, blocks / 64 + 1) nowait
    for (int64_t blk = 0; blk < blocks; ++blk) weight_block(m, a, y, blk);
}

// y = W x for an fp32 weight [N, K] (the indexer's weights_proj, the MoE router)
static void team_gemv_f32(const float* w, int64_t N, int64_t K, const float* x, float* y) {
    #pragma omp for schedule(dynamic, TEAM_ROWS) nowait
    for (int64_t n = 0; n < N; ++n) y[n] = dot(w + n * K, x, K);
}

// out = w * x / sqrt(mean(x^2) + eps) (RMSNorm)
static void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
    const float r = 1.f / std::sqrt(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// x = (x - mean) / sqrt(var + eps) * w + b in place (nn.LayerNorm, biased variance)
static void layer_norm(float* x, const float* w, const float* b, int64_t n, float eps) {
    float mean = 0.f, var = 0.f;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= (float)n;
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(var / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - mean) * r * w[i] + b[i];
}

// MLA's rope (layers.rope_interleaved): pairs (x[2i], x[2i+1]) rotate by frequency i; x -> out [R]
static void rope_interleaved(const float* x, const float* cos, const float* sin, int64_t R, float* out) {
    for (int64_t i = 0; i < R / 2; ++i) {
        const float a = x[2 * i], b = x[2 * i + 1];
        out[2 * i] = a * cos[i] - b * sin[i];
        out[2 * i + 1] = b * cos[i] + a * sin[i];
    }
}

// The indexer's rope (layers.rope_half) in place: x[i] pairs with x[i + R/2]
static void rope_half(float* x, const float* cos, const float* sin, int64_t R) {
    for (int64_t i = 0; i < R / 2; ++i) {
        const float a = x[i], b = x[i + R / 2];
        x[i] = a * cos[i] - b * sin[i];
        x[i + R / 2] = b * cos[i] + a * sin[i];
    }
}

static inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
static inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// MLA.absorb_q: out[h, c] = sum_n q[h, n] W_uk[h, n, c] for the heads' rows of kv_b [H*(nope+v), C]
// (head h's W_uk: rows h*(nope+v) + n, n < nope); q rows ldq apart, out rows ldo apart. The
// team takes (head, group of columns) pairs.
static void team_absorb_q(const Weight& kvb, const float* q, int64_t ldq, int64_t H, int64_t nope, int64_t v,
                          float* out, int64_t ldo) {
    const int64_t C = kvb.K, G = group_of(C), groups = C / G;
    #pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < H * groups; ++t) {
        const int64_t h = t / groups, c0 = t % groups * G;
        float* o = out + h * ldo + c0;
        for (int64_t c = 0; c < G; ++c) o[c] = 0.f;
        for (int64_t n = 0; n < nope; ++n) {
            const int64_t row = h * (nope + v) + n;
#if defined(INT8)
            const vf a = vset1(q[h * ldq + n] * kvb.s[row * groups + c0 / G]);
#else
            const vf a = vset1(q[h * ldq + n]);
#endif
            const wt* w = kvb.w + row * C + c0;
            for (int64_t c = 0; c < G; c += WIDTH) vstore(o + c, vfma(a, wload(w + c), vload(o + c)));
        }
    }
}

// MLA.absorb_o: out[h, j] = o_lat[h] . W_uv[h, j] (head h's W_uv: rows h*(nope+v) + nope + j of kv_b),
// heads[h] holding o_lat[h] (set by the caller); the team takes (head, block of rows) pairs
static void team_absorb_o(const Weight& kvb, const Act* heads, int64_t H, int64_t nope, int64_t v, float* out) {
    const int64_t per = (v + TEAM_ROWS - 1) / TEAM_ROWS;
    #pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < H * per; ++t) {
        const int64_t h = t / per;
        weight_block(rows_of(kvb, h * (nope + v) + nope, (h + 1) * (nope + v)), heads[h], out + h * v, t % per);
    }
}
