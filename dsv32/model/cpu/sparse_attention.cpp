// Sparse MLA attention of one query row (decode) over the latent rows the indexer selected, read
// in place from the cache pool: for each head h,
//   o[h, :C] = sum_j softmax_j(scale * q[h] . row_j) * row_j[:C]
// over the K selected key positions ids[j] (-1: an empty selection, skipped), row_j the pool row
// at slot_of(table, B, ids[j]) (cache_rows.cpp: in place, or dequantised). Built by native.py after
// index_topk.cpp, before decode_attention.cpp.
// The selected rows are split across OpenMP threads and each is read once, for every head: an
// online softmax (running max and sum per head) accumulates each thread's part, and the parts are
// merged in thread order at the end. sparse_prefill.cpp runs the same per query of a prefill.
#include <cmath>
#include <vector>
#include <omp.h>

// o[:C] = a * o[:C] + w * r[:C]
static inline void scale_axpy(float* o, float a, float w, const float* r, int64_t C) {
    const vf av = vset1(a), wv = vset1(w);
    int64_t c = 0;
    for (; c + WIDTH <= C; c += WIDTH) vstore(o + c, vfma(wv, vload(r + c), vmul(av, vload(o + c))));
    for (; c < C; ++c) o[c] = a * o[c] + w * r[c];
}

// the rows ids[j0..j1) (-1: skipped) summed into acc [H, P] per head: o[:C], running max, running
// sum (an online softmax: a new maximum rescales what is summed)
static void attend_rows(const float* q, const Rows& rows, const int64_t* table, const int64_t* ids, int64_t j0,
                        int64_t j1, float* acc, float* scratch, const int64_t H, const int64_t D, const int64_t C,
                        const int64_t B, const float scale) {
    const int64_t P = C + 2;
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < C; ++c) acc[h * P + c] = 0.f;
        acc[h * P + C] = -INFINITY, acc[h * P + C + 1] = 0.f;
    }
    float s[4];
    for (int64_t j = j0; j < j1; ++j) {
        if (ids[j] < 0) continue;
        const float* r = rows.get(slot_of(table, B, ids[j]), 1, scratch);
        if (j + 1 < j1 && ids[j + 1] >= 0)                 // the next row's lines, while this one is summed
            rows.prefetch(slot_of(table, B, ids[j + 1]));
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
            const int64_t n = H - h0 < 4 ? H - h0 : 4;
            dots4(q + h0 * D, r, D, n, s);
            for (int64_t i = 0; i < n; ++i) {
                float* a = acc + (h0 + i) * P;
                const float x = s[i] * scale;
                if (x > a[C]) {
                    const float e = std::exp(a[C] - x);
                    a[C] = x, a[C + 1] = e * a[C + 1] + 1.f;
                    scale_axpy(a, e, 1.f, r, C);
                } else {
                    const float p = std::exp(x - a[C]);
                    a[C + 1] += p;
                    scale_axpy(a, 1.f, p, r, C);
                }
            }
        }
    }
}

// o [H, C] = the softmax-weighted sums of n parts [n, H, P] merged in order (zero where nothing
// was selected)
static void merge_parts(const float* part, int64_t n, float* o, const int64_t H, const int64_t C) {
    const int64_t P = C + 2;
    for (int64_t h = 0; h < H; ++h) {
        float M = -INFINITY, L = 0.f;
        for (int64_t t = 0; t < n; ++t) M = std::fmax(M, part[(t * H + h) * P + C]);
        for (int64_t c = 0; c < C; ++c) o[h * C + c] = 0.f;
        if (M == -INFINITY) continue;
        for (int64_t t = 0; t < n; ++t) {
            const float* acc = part + (t * H + h) * P;
            const float a = std::exp(acc[C] - M);
            L += a * acc[C + 1];
            scale_axpy(o + h * C, 1.f, a, acc, C);
        }
        for (int64_t c = 0; c < C; ++c) o[h * C + c] /= L;
    }
}

static void sparse_attention(const float* q, const Rows& rows, const int64_t* table, const int64_t* ids, float* o,
                             const int64_t H, const int64_t K, const int64_t D, const int64_t C, const int64_t B,
                             const float scale) {
    const int64_t P = C + 2;
    std::vector<float> part(omp_get_max_threads() * H * P);
    int used = 1;
    #pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        if (t == 0) used = (int)nt;
        std::vector<float> scratch(rows.f32 ? 0 : D);
        attend_rows(q, rows, table, ids, K * t / nt, K * (t + 1) / nt, part.data() + t * H * P, scratch.data(),
                    H, D, C, B, scale);
    }
    merge_parts(part.data(), used, o, H, C);
}
