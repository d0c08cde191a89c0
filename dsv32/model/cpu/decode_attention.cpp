// One decode row's attention over a paged cache in one call (built by native.py after vec.h,
// index_topk.cpp and sparse_attention.cpp): the new token, at key position S - 1, writes its
// latent and indexer key into its slot, selects its keys (all S while they fit in topk, else the
// indexer's top-k) and attends over them. Reference: KV.write, MLA.decode_select, MLA.attend_latent.
#include <algorithm>

extern "C" void kernel(const float* latent, const float* index_k, const float* q, const float* iq, const float* iw,
                       float* lat_pool, float* ik_pool, const int64_t* table, float* scores, int64_t* ids,
                       float* o, const int64_t H, const int64_t D, const int64_t C, const int64_t Hi,
                       const int64_t Di, const int64_t S, const int64_t topk, const int64_t B, const float scale) {
    const int64_t slot = slot_of(table, B, S - 1);
    std::copy(latent, latent + D, lat_pool + slot * D);
    std::copy(index_k, index_k + Di, ik_pool + slot * Di);
    int64_t K = S;
    if (S > topk) {
        index_topk(iq, iw, ik_pool, table, scores, ids, Hi, Di, S, topk, B);
        K = topk;
    } else {
        for (int64_t j = 0; j < S; ++j) ids[j] = j;
    }
    sparse_attention(q, lat_pool, table, ids, o, H, K, D, C, B, scale);
}
