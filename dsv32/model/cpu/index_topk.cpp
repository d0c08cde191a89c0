// The lightning indexer of one query row (decode) over every earlier key, read in place from the
// cache pool, and its top-k: score[s] = sum_h w[h] * relu(q[h] . key_s) for the keys s = 0..S-1 at
// pool row slot_of(table, B, s), then the k best key ids (ties: the lower id), best first. Built by
// native.py after vec.h, before
// decode_attention.cpp. Keys are split across OpenMP threads for the scores (each key read once for
// every head); the selection (nth_element, then a sort of the k) is serial.
#include <algorithm>
#include <numeric>
#include <vector>

static void index_topk(const float* q, const float* w, const float* pool, const int64_t* table, float* scores,
                       int64_t* out, const int64_t H, const int64_t D, const int64_t S, const int64_t K,
                       const int64_t B) {
    const int64_t nb = (S + B - 1) / B;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {                       // a block's keys lie in consecutive rows
        const float* base = pool + table[b] * B * D;
        for (int64_t s = b * B; s < (b + 1) * B && s < S; ++s) {
            const float* r = base + (s - b * B) * D;
            float acc = 0.f, v[4];
            for (int64_t h0 = 0; h0 < H; h0 += 4) {
                const int64_t n = H - h0 < 4 ? H - h0 : 4;
                dots4(q + h0 * D, r, D, n, v);
                for (int64_t i = 0; i < n; ++i) acc += w[h0 + i] * (v[i] > 0.f ? v[i] : 0.f);
            }
            scores[s] = acc;
        }
    }
    std::vector<int64_t> ids(S);
    std::iota(ids.begin(), ids.end(), 0);
    auto better = [scores](int64_t a, int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    std::nth_element(ids.begin(), ids.begin() + (K - 1), ids.end(), better);
    std::sort(ids.begin(), ids.begin() + K, better);
    std::copy(ids.begin(), ids.begin() + K, out);
}
