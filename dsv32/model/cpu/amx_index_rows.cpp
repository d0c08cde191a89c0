// The lightning indexer's scores of many query rows (a prefill chunk) over n consecutive keys of an
// FP8 or bf16 pool, on AMX tiles (built by native.py after cache_rows.cpp and amx_index.cpp, with AMX
// defined): out[i, s] = sum_h w[i, h] * relu(scale[s] * (q[i, h] . e4m3[s])) for i < t, s < n (bf16:
// scale null, 1), where the CPU path otherwise converts the keys and multiplies in fp32 (a GEMM, then
// the head sums). bf16 keys are loaded as they lie (a partial last tile copied, zero-padded).
// The same numerics as amx_index.cpp (exact bf16 keys, three bf16 limbs of the query), as a GEMM:
// OpenMP over tiles of 16 keys, each converted once and held in four A tiles (its 128 values), and
// every query's limbs (B) multiplied with them, 12 tile ops a head tile, into two alternating C
// tiles, whose rows (keys) each query's head sum reads. H <= 64, D == GROUP (as amx_index.cpp).
#if defined(AMX) && ISA == 512

// C_c += A_{4+k} . B_b (c: 0, 1; b: 2, 3; the instructions take immediates)
__attribute__((target("amx-tile,amx-bf16"))) static inline void rows_dp(int c, int64_t k, int b) {
    switch (c * 8 + k * 2 + (b - 2)) {
        case 0: _tile_dpbf16ps(0, 4, 2); break;  case 1: _tile_dpbf16ps(0, 4, 3); break;
        case 2: _tile_dpbf16ps(0, 5, 2); break;  case 3: _tile_dpbf16ps(0, 5, 3); break;
        case 4: _tile_dpbf16ps(0, 6, 2); break;  case 5: _tile_dpbf16ps(0, 6, 3); break;
        case 6: _tile_dpbf16ps(0, 7, 2); break;  case 7: _tile_dpbf16ps(0, 7, 3); break;
        case 8: _tile_dpbf16ps(1, 4, 2); break;  case 9: _tile_dpbf16ps(1, 4, 3); break;
        case 10: _tile_dpbf16ps(1, 5, 2); break; case 11: _tile_dpbf16ps(1, 5, 3); break;
        case 12: _tile_dpbf16ps(1, 6, 2); break; case 13: _tile_dpbf16ps(1, 6, 3); break;
        case 14: _tile_dpbf16ps(1, 7, 2); break; default: _tile_dpbf16ps(1, 7, 3);
    }
}

// out[i, s] for the queries i0 <= i < i1, their limbs in bq (at (i - i0) * per_q) and head weights in
// wt: OpenMP over the key tiles
__attribute__((target("amx-tile,amx-bf16,avx512vbmi")))
static void rows_pass(const uint16_t* bq, const float* wt, const uint8_t* keys, const float* scale, float* out,
                      int64_t i0, int64_t i1, int64_t T, int64_t cols, int64_t n, int64_t ldo, bool half) {
    const int64_t tile = 16 * 2 * cols, STEPS = GROUP / STEP, per_q = LIMBS_Q * STEPS * T * tile;
    const int64_t tiles = (n + KEYS - 1) / KEYS;
    #pragma omp parallel
    {
        TileConfig cfg = {};
        cfg.palette = 1;
        for (int i = 0; i < 2; ++i) cfg.rows[i] = KEYS, cfg.colsb[i] = 4 * cols;         // C [16 keys, cols] fp32
        for (int i = 2; i < 4; ++i) cfg.rows[i] = STEP / 2, cfg.colsb[i] = 4 * cols;     // B: 16 pairs x cols
        for (int i = 4; i < 8; ++i) cfg.rows[i] = KEYS, cfg.colsb[i] = 64;               // A_k: 16 keys x 32 bf16
        load_tile_config(cfg);
        std::vector<uint16_t> a(KEYS * GROUP, 0);
        const E4m3Lookup lut = e4m3_lookup();
        alignas(64) float c[2][KEYS * 16] = {};
        #pragma omp for schedule(dynamic, tiles / 64 + 1)
        for (int64_t kt = 0; kt < tiles; ++kt) {
            const int64_t m = std::min(n - kt * KEYS, KEYS);
            const uint16_t* at = a.data();                  // the tile's 16 keys as bf16 rows
            if (!half) {
                e4m3_to_bf16(lut, keys + kt * KEYS * GROUP, a.data(), m * GROUP);
            } else if (m == KEYS) {
                at = (const uint16_t*)keys + kt * KEYS * GROUP;
            } else {
                std::memcpy(a.data(), (const uint16_t*)keys + kt * KEYS * GROUP, m * GROUP * 2);
                std::memset(a.data() + m * GROUP, 0, (KEYS - m) * GROUP * 2);
            }
            _tile_loadd(4, at + 0 * STEP, 2 * GROUP);
            _tile_loadd(5, at + 1 * STEP, 2 * GROUP);
            _tile_loadd(6, at + 2 * STEP, 2 * GROUP);
            _tile_loadd(7, at + 3 * STEP, 2 * GROUP);
            __m512 sr[KEYS];
            for (int64_t r = 0; r < KEYS; ++r) sr[r] = _mm512_set1_ps(r >= m ? 0.f : half ? 1.f : scale[kt * KEYS + r]);
            // unit v = (query i0 + v / T, head tile v % T): its tile ops into C_{v & 1}, stored to
            // c[v & 1]; the head sums of unit v - 1 run on the vector unit meanwhile
            __m512 acc[KEYS];
            const int64_t units = (i1 - i0) * T;
            int u = 0;                                       // B tiles alternate: 2, 3
            for (int64_t v = 0; v <= units; ++v) {
                if (v < units) {
                    const int64_t i = i0 + v / T, th = v % T;
                    const int cc = (int)(v & 1);
                    if (cc) _tile_zero(1); else _tile_zero(0);
                    for (int64_t k = 0; k < STEPS; ++k)
                        for (int j = 0; j < LIMBS_Q; ++j) {
                            const int b = 2 + (u++ & 1);
                            const uint16_t* bt = bq + (i - i0) * per_q + ((j * STEPS + k) * T + th) * tile;
                            if (b == 2) _tile_loadd(2, bt, 4 * cols); else _tile_loadd(3, bt, 4 * cols);
                            rows_dp(cc, k, b);
                        }
                    if (cc) _tile_stored(1, c[1], 64); else _tile_stored(0, c[0], 64);
                }
                if (v == 0) continue;
                const int64_t p = v - 1, i = i0 + p / T, th = p % T;
                if (th == 0)
                    for (int64_t r = 0; r < KEYS; ++r) acc[r] = _mm512_setzero_ps();
                const __m512 wv = _mm512_loadu_ps(wt + ((i - i0) * T + th) * 16);
                add_head_sums(c[p & 1], sr, m, wv, acc);
                if (th == T - 1) _mm512_mask_storeu_ps(out + i * ldo + kt * KEYS, (__mmask16)((1u << m) - 1), sum16(acc));
            }
        }
        _tile_release();
    }
}

// Passes of as many queries as keep their limbs within ~1 MB (the L2 cache), each over every key
// tile: the keys are converted once a pass, the limbs read from L2 for every key tile
__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512vbmi")))
extern "C" void kernel(const float* q, const float* w, const uint8_t* keys, const float* scale, float* out,
                       const int64_t t, const int64_t H, const int64_t n, const int64_t ldo, const int64_t half) {
    const int64_t T = (H + 15) / 16, cols = H < 16 ? H : 16, per_q = LIMBS_Q * (GROUP / STEP) * T * 16 * 2 * cols;
    const int64_t pass = std::max<int64_t>(4, (1 << 20) / (2 * per_q));
    std::vector<uint16_t> bq(std::min(t, pass) * per_q);
    std::vector<float> wt(std::min(t, pass) * T * 16);
    for (int64_t i0 = 0; i0 < t; i0 += pass) {
        const int64_t i1 = std::min(t, i0 + pass);
        std::fill(bq.begin(), bq.end(), 0), std::fill(wt.begin(), wt.end(), 0.f);
        for (int64_t i = i0; i < i1; ++i) {
            split_query(q + i * H * GROUP, bq.data() + (i - i0) * per_q, H, GROUP, T, cols, false, !half);
            for (int64_t h = 0; h < H; ++h) wt[((i - i0) * T + h / 16) * 16 + h % 16] = w[i * H + h];
        }
        rows_pass(bq.data(), wt.data(), keys, scale, out, i0, i1, T, cols, n, ldo, half);
    }
}
#endif
