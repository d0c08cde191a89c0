// Sparse MLA attention of one query row (decode) over the latent rows the indexer selected, read
// in place from the cache pool: for each head h,
//   o[h, :C] = sum_j softmax_j(scale * q[h] . row_j) * row_j[:C]
// over the K selected key positions ids[j] (-1: an empty selection, skipped), row_j the pool row
// at slot_of(table, B, ids[j]) (cache_rows.cpp: in place, or dequantised). Built by native.py after
// amx_attention.cpp, before decode_attention.cpp and sparse_prefill.cpp.
// The selected rows are split across OpenMP threads and each is read once, for every head: an
// online softmax (running max and sum per head) accumulates each thread's part, a tile of rows at
// a time, and the parts are merged at the end, each thread a share of the heads. sparse_prefill.cpp
// runs the same per query of a prefill. Where amx_attention.cpp takes the pool and shapes (bf16 or
// FP8, many heads; built with AMX), its tiles do the work instead: the decode's rows go to the threads
// a chunk at a time as they come free (a static half each was 1.25-1.47x slower on this host), each
// chunk's part kept apart and the parts merged in chunk order, so the result has the same bits
// whichever thread took which chunk (accumulating a thread's chunks in one part did not: 0.90-0.95x
// the time, 85 different results in 200 calls).
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>
#include <omp.h>

// o[:C] = a * o[:C] + w * r[:C]
static inline void scale_axpy(float* o, float a, float w, const float* r, int64_t C) {
    const vf av = vset1(a), wv = vset1(w);
    int64_t c = 0;
    for (; c + WIDTH <= C; c += WIDTH) vstore(o + c, vfma(wv, vload(r + c), vmul(av, vload(o + c))));
    for (; c < C; ++c) o[c] = a * o[c] + w * r[c];
}

static const int64_t ROWS = 16;                          // rows a tile

// sc[h, i] = scale * q[h] . r[i] for a whole tile (n == ROWS) with AVX-512: per head, an
// accumulator a row and one transposing reduction (sum16, vec.h); false where it does not apply.
// index_topk.cpp's tile_scores has the same loop over 16 consecutive rows: a shared helper taking
// row pointers made the indexer 15-50% slower at 8K-32K keys (its rows are one stride apart).
static inline bool tile_dots(const float* q, const float* const* r, int64_t n, float* sc, const int64_t H,
                             const int64_t D, const float scale) {
#if ISA == 512
    if (n != ROWS || D % 16 != 0) return false;
    const __m512 sv = _mm512_set1_ps(scale);
    __m512 acc[ROWS];
    for (int64_t h = 0; h < H; ++h) {
        for (int i = 0; i < ROWS; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 qv = _mm512_loadu_ps(q + h * D + d);
            for (int i = 0; i < ROWS; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r[i] + d), acc[i]);
        }
        _mm512_storeu_ps(sc + h * ROWS, _mm512_mul_ps(sum16(acc), sv));
    }
    return true;
#else
    (void)q, (void)r, (void)n, (void)sc, (void)H, (void)D, (void)scale;
    return false;
#endif
}

static const int64_t HEADS = 4;                         // heads whose sums take each row load

// a[h][:C] = e[h] a[h][:C] + sum_i p[h][i] r[i][:C] for the m <= HEADS heads of a block (a[h] at
// acc + h * P): each row vector loaded once for the block's heads, each head's sum in the order of
// one head's loop (the same rounding; a call 0.84-0.90x at 4-128 heads. The same blocking of the
// scores, two heads by 8 rows, gained nothing more and was dropped)
static inline void add_rows(float* acc, int64_t P, const float* e, const float (*p)[ROWS], int64_t m,
                            const float* const* r, int64_t n, int64_t C) {
    int64_t c = 0;
    if (m == HEADS)
        for (; c + WIDTH <= C; c += WIDTH) {
            vf v0 = vmul(vset1(e[0]), vload(acc + c)), v1 = vmul(vset1(e[1]), vload(acc + P + c));
            vf v2 = vmul(vset1(e[2]), vload(acc + 2 * P + c)), v3 = vmul(vset1(e[3]), vload(acc + 3 * P + c));
            for (int64_t i = 0; i < n; ++i) {
                const vf x = vload(r[i] + c);
                v0 = vfma(vset1(p[0][i]), x, v0), v1 = vfma(vset1(p[1][i]), x, v1);
                v2 = vfma(vset1(p[2][i]), x, v2), v3 = vfma(vset1(p[3][i]), x, v3);
            }
            vstore(acc + c, v0), vstore(acc + P + c, v1), vstore(acc + 2 * P + c, v2), vstore(acc + 3 * P + c, v3);
        }
    for (int64_t h = 0; h < m; ++h) {
        float* a = acc + h * P;
        const vf ev = vset1(e[h]);
        int64_t k = c;
        for (; k + WIDTH <= C; k += WIDTH) {
            vf v = vmul(ev, vload(a + k));
            for (int64_t i = 0; i < n; ++i) v = vfma(vset1(p[h][i]), vload(r[i] + k), v);
            vstore(a + k, v);
        }
        for (; k < C; ++k) {
            float v = e[h] * a[k];
            for (int64_t i = 0; i < n; ++i) v += p[h][i] * r[i][k];
            a[k] = v;
        }
    }
}

// the rows ids[j0..j1) (-1: skipped) summed into acc [H, P] per head: o[:C], running max, running
// sum (an online softmax). A tile of ROWS rows at a time: its scores for every head (tile_dots, or
// 4 heads' query rows against each row of a partial tile), then each head's sums rescaled and the
// tile's rows added in one pass over them, HEADS heads at a time (`add_rows`), so queries and sums
// stream once a tile, not once a row. scratch: ROWS * D floats (FP8 rows dequantised there) and
// H * ROWS scores.
static void attend_rows(const float* q, const Rows& rows, const int64_t* table, const int64_t* ids, int64_t j0,
                        int64_t j1, float* acc, float* scratch, const int64_t H, const int64_t D, const int64_t C,
                        const int64_t B, const float scale) {
#if defined(AMX) && ISA == 512
    if (amx_attends(rows, H, j1 - j0, D, C)) {
        AmxAttention amx(q, nullptr, rows, table, scratch, B, H, D, C, scale);
        amx.add(ids + j0, j1 - j0);
        return amx.write(acc);
    }
#endif
    const int64_t P = C + 2;
    float* sc = scratch + ROWS * D;                        // [H, ROWS]
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < C; ++c) acc[h * P + c] = 0.f;
        acc[h * P + C] = -INFINITY, acc[h * P + C + 1] = 0.f;
    }
    const float* r[ROWS];
    float s[4], e[HEADS], p[HEADS][ROWS];
    for (int64_t j = j0; j < j1;) {
        int64_t n = 0;
        for (; n < ROWS && j < j1; ++j)
            if (ids[j] >= 0) r[n] = rows.get(slot_of(table, B, ids[j]), 1, scratch + n * D), ++n;
        if (n == 0) break;                                 // only empty slots were left
        for (int64_t k = j; k < j1 && k < j + ROWS; ++k)   // the next tile's lines, while this one is summed
            if (ids[k] >= 0) rows.prefetch(slot_of(table, B, ids[k]));
        if (!tile_dots(q, r, n, sc, H, D, scale))
            for (int64_t h0 = 0; h0 < H; h0 += 4) {
                const int64_t m = H - h0 < 4 ? H - h0 : 4;
                for (int64_t i = 0; i < n; ++i) {
                    dots4(q + h0 * D, r[i], D, m, s);
                    for (int64_t k = 0; k < m; ++k) sc[(h0 + k) * ROWS + i] = s[k] * scale;
                }
            }
        for (int64_t h0 = 0; h0 < H; h0 += HEADS) {
            const int64_t m = H - h0 < HEADS ? H - h0 : HEADS;
            for (int64_t k = 0; k < m; ++k) {             // each head's running max and sum
                float* a = acc + (h0 + k) * P;
                const float* sh = sc + (h0 + k) * ROWS;
                float M = a[C];
                for (int64_t i = 0; i < n; ++i) M = std::fmax(M, sh[i]);
                e[k] = std::exp(a[C] - M);                // 0 for the first tile (max -inf)
                float L = e[k] * a[C + 1];
                for (int64_t i = 0; i < n; ++i) L += (p[k][i] = std::exp(sh[i] - M));
                a[C] = M, a[C + 1] = L;
            }
            add_rows(acc + h0 * P, P, e, p, m, r, n, C);
        }
    }
}

// the floats of attend_rows' scratch
static int64_t attend_scratch(int64_t H, int64_t D, int64_t C) {
    const int64_t n = ROWS * D + H * ROWS;
#if defined(AMX) && ISA == 512
    return std::max(n, amx_scratch_floats(H, D, C));
#else
    (void)C;
    return n;
#endif
}

// o [H, C] = the softmax-weighted sums of n parts [n, H, P] merged in order (zero where nothing
// was selected), for the heads h0..h1
static void merge_parts(const float* part, int64_t n, float* o, const int64_t H, const int64_t C, int64_t h0 = 0,
                        int64_t h1 = -1) {
    const int64_t P = C + 2;
    for (int64_t h = h0; h < (h1 < 0 ? H : h1); ++h) {
        float M = -INFINITY, L = 0.f;
        for (int64_t t = 0; t < n; ++t) M = std::fmax(M, part[(t * H + h) * P + C]);
        float* oh = o + h * C;
        std::memset(oh, 0, C * sizeof(float));
        if (M == -INFINITY) continue;
        for (int64_t t = 0; t < n; ++t) {
            const float* acc = part + (t * H + h) * P;
            const float a = std::exp(acc[C] - M);
            L += a * acc[C + 1];
            scale_axpy(oh, 1.f, a, acc, C);
        }
        int64_t c = 0;                                     // o / L (vectors: inductor's flags build
        for (; c + WIDTH <= C; c += WIDTH) vstore(oh + c, vdiv(vload(oh + c), vset1(L)));   // no loop vectorizer)
        for (; c < C; ++c) oh[c] /= L;
    }
}

static void sparse_attention(const float* q, const Rows& rows, const int64_t* table, const int64_t* ids, float* o,
                             const int64_t H, const int64_t K, const int64_t D, const int64_t C, const int64_t B,
                             const float scale) {
    const int64_t P = C + 2;
    int64_t parts = omp_get_max_threads();                 // a thread's part each (tiles: a chunk's)
#if defined(AMX) && ISA == 512
    const bool amx = amx_attends(rows, H, K, D, C);
    std::unique_ptr<uint16_t[]> bq(new uint16_t[amx ? query_halves(H, D) : 0]);
    if (amx) parts = (K + AMX_ROWS - 1) / AMX_ROWS;
#endif
    std::unique_ptr<float[]> part(new float[parts * H * P]);
    #pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        std::unique_ptr<float[]> scratch(new float[attend_scratch(H, D, C)]);
        int64_t n = nt;
#if defined(AMX) && ISA == 512
        if (amx) {                    // the query's tiles built once, shared; chunks as threads come free
            #pragma omp for schedule(static, 1)
            for (int64_t i = 0; i < amx_heads(H) / 16; ++i) query_tiles(q, bq.get(), H, D, i, i + 1);
            AmxAttention state(q, bq.get(), rows, table, scratch.get(), B, H, D, C, scale);
            #pragma omp for schedule(dynamic, 1) nowait
            for (int64_t c = 0; c < parts; ++c) {
                state.begin();
                state.add(ids + c * AMX_ROWS, std::min(AMX_ROWS, K - c * AMX_ROWS));
                state.write(part.get() + c * H * P);
            }
            n = parts;
        } else
#endif
        attend_rows(q, rows, table, ids, K * t / nt, K * (t + 1) / nt, part.get() + t * H * P, scratch.get(), H, D,
                    C, B, scale);
        #pragma omp barrier
        merge_parts(part.get(), n, o, H, C, H * t / nt, H * (t + 1) / nt);   // each thread its heads
    }
}
