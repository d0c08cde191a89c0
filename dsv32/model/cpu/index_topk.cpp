// The lightning indexer of one query row (decode) over every earlier key, read in place from the
// cache pool, and its top-k: score[s] = sum_h w[h] * relu(q[h] . pool[slot_s]), then the k best key
// ids (ties: the lower id), best first. Built by native.py after vec.h. Keys are split across
// OpenMP threads for the scores; the selection (nth_element, then a sort of the k) is serial.
#include <algorithm>
#include <numeric>
#include <vector>

extern "C" void kernel(const float* q, const float* w, const float* pool, const int64_t* slots, float* scores,
                       int64_t* out, const int64_t H, const int64_t D, const int64_t S, const int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
        const float* r = pool + slots[s] * D;
        float acc = 0.f;
        for (int64_t h = 0; h < H; ++h) {
            const float v = dot(q + h * D, r, D);
            acc += w[h] * (v > 0.f ? v : 0.f);
        }
        scores[s] = acc;
    }
    std::vector<int64_t> ids(S);
    std::iota(ids.begin(), ids.end(), 0);
    auto better = [scores](int64_t a, int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    std::nth_element(ids.begin(), ids.begin() + (K - 1), ids.end(), better);
    std::sort(ids.begin(), ids.begin() + K, better);
    std::copy(ids.begin(), ids.begin() + K, out);
}
