// The lightning indexer of one query row (decode) over every earlier key, read from the cache
// pool (cache_rows.cpp: in place, or 16 FP8 or bf16 rows at a time converted), and its top-k: score[s] =
// sum_h w[h] * relu(q[h] . key_s) for the keys s = 0..S-1 at pool row slot_of(table, B, s), then
// the k best key ids (top_ids.cpp: ties to the lower id; ascending). Built by native.py after
// cache_rows.cpp and top_ids.cpp, before decode_attention.cpp. Blocks of keys are split across
// OpenMP threads for the scores; the selection is serial. Where built with AMX, an FP8 or bf16 pool's
// scores are amx_index.cpp's.
//
// With AVX-512 the scores go 16 keys at a time: per head, 16 accumulators (one a key) over the
// key rows, then one transposing reduction turns them into a vector of 16 dot products (~46
// instructions where 16 separate horizontal sums take ~128); the rest key by key.
#include <vector>

// the score of one key row r
static inline float key_score(const float* q, const float* w, const float* r, int64_t H, int64_t D) {
    float acc = 0.f, v[4];
    for (int64_t h0 = 0; h0 < H; h0 += 4) {
        const int64_t n = H - h0 < 4 ? H - h0 : 4;
        dots4(q + h0 * D, r, D, n, v);
        for (int64_t i = 0; i < n; ++i) acc += w[h0 + i] * (v[i] > 0.f ? v[i] : 0.f);
    }
    return acc;
}

#if ISA == 512
// the scores of the 16 consecutive key rows from r
static inline void tile_scores(const float* q, const float* w, const float* r, int64_t H, int64_t D, float* out) {
    __m512 score = _mm512_setzero_ps(), acc[16];
    for (int64_t h = 0; h < H; ++h) {
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 qv = _mm512_loadu_ps(q + h * D + d);
            for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r + j * D + d), acc[j]);
        }
        score = _mm512_fmadd_ps(_mm512_set1_ps(w[h]), _mm512_max_ps(sum16(acc), _mm512_setzero_ps()), score);
    }
    _mm512_storeu_ps(out, score);
}
static const int64_t TILE = 16;
#else
static const int64_t TILE = 0;
#endif

static const int64_t CHUNK = 16;                         // rows dequantised at a time (FP8)

// scores[s] for the keys s < S (on AMX tiles for an FP8 pool where built with AMX)
static void index_scores(const float* q, const float* w, const Rows& keys, const int64_t* table, float* scores,
                         const int64_t H, const int64_t D, const int64_t S, const int64_t B) {
#if defined(AMX) && ISA == 512
    if (!keys.f32 && H <= 64 && D == GROUP) return amx_index_scores(q, w, keys, table, scores, H, S, B);
#endif
    const int64_t nb = (S + B - 1) / B;
    #pragma omp parallel
    {
        std::vector<float> scratch(keys.f32 ? 0 : CHUNK * D);
        #pragma omp for schedule(dynamic, nb / 64 + 1)
        for (int64_t b = 0; b < nb; ++b) {                   // a block's keys lie in consecutive rows
            const int64_t s1 = (b + 1) * B < S ? (b + 1) * B : S;
            for (int64_t s = b * B; s < s1; s += CHUNK) {
                const int64_t n = s1 - s < CHUNK ? s1 - s : CHUNK;
                const float* r = keys.get(table[b] * B + s - b * B, n, scratch.data());   // [n, D]
                int64_t i = 0;
#if ISA == 512
                if (D % 16 == 0 && n == TILE) tile_scores(q, w, r, H, D, scores + s), i = n;
#endif
                for (; i < n; ++i) scores[s + i] = key_score(q, w, r + i * D, H, D);
            }
        }
    }
}

// the number of ids written to out: K, or fewer where fewer scores exceed -inf (NaN)
static int64_t index_topk(const float* q, const float* w, const Rows& keys, const int64_t* table, float* scores,
                       int64_t* out, const int64_t H, const int64_t D, const int64_t S, const int64_t K,
                       const int64_t B) {
    index_scores(q, w, keys, table, scores, H, D, S, B);
    TopScratch sc;
    sc.reserve(S);
    return top_ids(scores, S, K, out, sc);
}
