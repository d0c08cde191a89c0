// Sparse MLA attention of one query row (decode) over the latent rows the indexer selected, read
// in place from the cache pool: for each head h,
//   o[h, :C] = sum_j softmax_j(scale * q[h] . pool[slot_j]) * pool[slot_j, :C]
// over the K selected slots (slot -1: an empty selection, skipped). Built by native.py after vec.h.
// Heads are split across OpenMP threads; each thread reads every selected row twice (the scores of
// its heads, then their weighted sums). `scratch` holds the H x K probabilities.
#include <cmath>
#include <omp.h>

// o[:C] += w * r[:C]
static inline void axpy(float* o, float w, const float* r, int64_t C) {
    const vf wv = vset1(w);
    int64_t c = 0;
    for (; c + WIDTH <= C; c += WIDTH) vstore(o + c, vfma(wv, vload(r + c), vload(o + c)));
    for (; c < C; ++c) o[c] += w * r[c];
}

extern "C" void kernel(const float* q, const float* pool, const int64_t* slots, float* o, float* scratch,
                       const int64_t H, const int64_t K, const int64_t D, const int64_t C, const float scale) {
    #pragma omp parallel
    {
        // this thread's heads [h0, h1): each selected row is read once for all of them per pass
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t h0 = H * t / nt, h1 = H * (t + 1) / nt;
        for (int64_t j = 0; j < K; ++j) {
            const float* r = pool + (slots[j] < 0 ? 0 : slots[j]) * D;
            for (int64_t h = h0; h < h1; ++h)
                scratch[h * K + j] = slots[j] < 0 ? -INFINITY : dot(q + h * D, r, D) * scale;
        }
        for (int64_t h = h0; h < h1; ++h) {                 // softmax over the row's K scores
            float* p = scratch + h * K;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < K; ++j) mx = p[j] > mx ? p[j] : mx;
            for (int64_t j = 0; j < K; ++j) {
                p[j] = slots[j] < 0 ? 0.f : std::exp(p[j] - mx);
                sum += p[j];
            }
            for (int64_t j = 0; j < K; ++j) p[j] /= sum;
            for (int64_t c = 0; c < C; ++c) o[h * C + c] = 0.f;
        }
        for (int64_t j = 0; j < K; ++j) {
            if (slots[j] < 0) continue;
            const float* r = pool + slots[j] * D;
            for (int64_t h = h0; h < h1; ++h) axpy(o + h * C, scratch[h * K + j], r, C);
        }
    }
}
