// The k best of one row of scores, as ids in ascending order (built by native.py after vec.h, before
// the kernels that select keys: index_topk.cpp, topk_rows.cpp). Best: the greater score; of equal
// scores, the lower id; -inf and NaN scores are never taken. Instead of a selection over every id
// (nth_element: ~4 ns a score, its compares reading scores at random), a threshold below the k-th
// best is estimated from an evenly spaced sample, one branch-free pass keeps the ids at or above it
// (~k of them), and an exact selection runs over those only. Where the estimate keeps fewer than k
// ids (an unlucky sample), a four times lower one, then every id, is taken instead.
#include <algorithm>
#include <cmath>
#include <memory>

// scratch for top_ids of up to n scores: ids and values [n + 1], left uninitialised
struct TopScratch {
    std::unique_ptr<int64_t[]> ids;
    std::unique_ptr<float[]> vals;
    int64_t size = 0;
    void reserve(int64_t n) {
        if (size < n + 1) size = n + 1, ids.reset(new int64_t[size]), vals.reset(new float[size]);
    }
};

// the ids i < n with s[i] >= lo (s[i] > lo where strict), ascending, into ids; returns their count.
// Vectorised: a compare mask per 16 (AVX-512) or 8 (AVX2) scores, its set bits (few) written out.
static inline int64_t keep_from(const float* s, int64_t n, float lo, bool strict, int64_t* ids) {
    int64_t c = 0, i = 0;
#if ISA == 512
    const __m512 l = _mm512_set1_ps(lo);
    for (; i + 16 <= n; i += 16)
        for (uint32_t m = strict ? _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), l, _CMP_GT_OQ)
                                 : _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), l, _CMP_GE_OQ); m; m &= m - 1)
            ids[c++] = i + __builtin_ctz(m);
#elif ISA == 256
    const __m256 l = _mm256_set1_ps(lo);
    for (; i + 8 <= n; i += 8)
        for (uint32_t m = _mm256_movemask_ps(strict ? _mm256_cmp_ps(_mm256_loadu_ps(s + i), l, _CMP_GT_OQ)
                                                    : _mm256_cmp_ps(_mm256_loadu_ps(s + i), l, _CMP_GE_OQ)); m; m &= m - 1)
            ids[c++] = i + __builtin_ctz(m);
#endif
    for (; i < n; ++i) ids[c] = i, c += strict ? s[i] > lo : s[i] >= lo;
    return c;
}

// the k best of s[0..n) by id, ascending, into out; returns how many (k, or fewer where fewer than k
// scores exceed -inf). sc must hold n + 1 ids and values.
static int64_t top_ids(const float* s, const int64_t n, const int64_t k, int64_t* out, TopScratch& sc) {
    int64_t* ids = sc.ids.get();
    float* vals = sc.vals.get();
    int64_t c = -1;
    if (n > 4 * k) {                                     // a threshold from m evenly spaced scores
        const int64_t m = std::min(n / 4, 4 * k + 256), stride = n / m;
        for (int64_t j = 0; j < m; ++j) vals[j] = s[j * stride] == s[j * stride] ? s[j * stride] : -INFINITY;  // NaN: -inf
        int64_t r = std::min(m, (3 * k) / (2 * stride) + 8);   // ~1.5k + 8 strides expected above it
        for (int attempt = 0; attempt < 2 && c < k; ++attempt, r = std::min(m, 4 * r)) {
            std::nth_element(vals, vals + (r - 1), vals + m, std::greater<float>());
            const float lo = vals[r - 1];
            c = lo > -INFINITY ? keep_from(s, n, lo, false, ids) : -1;
            if (r == m) break;
        }
    }
    if (c < k) c = keep_from(s, n, -INFINITY, true, ids);
    if (c <= k) {
        std::copy(ids, ids + c, out);
        return c;
    }
    for (int64_t j = 0; j < c; ++j) vals[j] = s[ids[j]];
    std::nth_element(vals, vals + (k - 1), vals + c, std::greater<float>());
    const float kth = vals[k - 1];                       // the k-th best score
    int64_t ties = k;                                    // how many ids scoring kth to take
    for (int64_t j = 0; j < k - 1; ++j) ties -= vals[j] > kth;
    int64_t o = 0;
    for (int64_t j = 0; j < c && o < k; ++j) {
        const float v = s[ids[j]];
        if (v > kth || (v == kth && ties-- > 0)) out[o++] = ids[j];
    }
    return o;
}
