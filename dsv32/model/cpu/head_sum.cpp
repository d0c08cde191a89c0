// The lightning indexer's head sum over one block of per-head dot products (built by native.py
// after vec.h): out[i, j] = sum_h w[i, h] * relu(s[i * H + h, j]) for t query rows and n keys, s
// [t * H, n] contiguous, out rows ld apart. One pass over s while it is still in the cache, where
// torch runs relu_ and a bmm with an inner size of H (~20% of the indexer's time beside its GEMM).
// Rows are split across OpenMP threads. Reference: indexer.index_scores' torch path.
#include <cmath>

extern "C" void kernel(const float* s, const float* w, float* out, const int64_t t, const int64_t H,
                       const int64_t n, const int64_t ld) {
    #pragma omp parallel for schedule(dynamic, t / 64 + 1)
    for (int64_t i = 0; i < t; ++i) {
        const float* si = s + i * H * n;
        const float* wi = w + i * H;
        float* o = out + i * ld;
        int64_t j = 0;
        for (; j + WIDTH <= n; j += WIDTH) {
            vf acc = vzero();
            for (int64_t h = 0; h < H; ++h) acc = vfma(vset1(wi[h]), vmax0(vload(si + h * n + j)), acc);
            vstore(o + j, acc);
        }
        for (; j < n; ++j) {
            float acc = 0.f;
            for (int64_t h = 0; h < H; ++h) acc = std::fma(wi[h], si[h * n + j] < 0.f ? 0.f : si[h * n + j], acc);
            o[j] = acc;
        }
    }
}
