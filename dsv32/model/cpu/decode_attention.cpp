// One decode row's attention over a paged cache in one call (built by native.py after vec.h,
// cache_rows.cpp, top_ids.cpp, index_topk.cpp and sparse_attention.cpp): the new token, at key position S - 1,
// writes its latent and indexer key into its slot, selects its keys (all S while they fit in topk,
// else the indexer's top-k) and attends over them. The pools (cache_rows.cpp's rows_of) are fp32
// (layout 0: lat_f32, ik_f32), FP8 (1: the latent's values, scales and bf16 rope in lat_half; the
// indexer key's values and scales) or bf16 (2: lat_half, ik_half).
// Reference: KV.write, MLA.decode_select, MLA.attend_latent.
#include <algorithm>

#if defined(LAYER)                  // the decode layer's build: layer_attn.cpp calls this function
#define DECODE_ROW static void decode_row
#else
#define DECODE_ROW extern "C" void kernel
#endif

DECODE_ROW(const float* latent, const float* index_k, const float* q, const float* iq, const float* iw,
           float* lat_f32, uint8_t* lat_q, float* lat_scale, uint16_t* lat_half, float* ik_f32,
           uint8_t* ik_q, float* ik_scale, uint16_t* ik_half, const int64_t* table, float* scores, int64_t* ids,
           float* o, const int64_t H, const int64_t D, const int64_t C, const int64_t Hi,
           const int64_t Di, const int64_t S, const int64_t topk, const int64_t B, const int64_t layout,
           const float scale) {
    Rows lat = rows_of(layout, lat_f32, lat_q, lat_scale, lat_half, D, D - C);
    Rows ik = rows_of(layout, ik_f32, ik_q, ik_scale, ik_half, Di, 0);
    const int64_t slot = slot_of(table, B, S - 1);
    lat.put(slot, latent);
    ik.put(slot, index_k);
    int64_t K = S;
    if (S > topk) {
        K = index_topk(iq, iw, ik, table, scores, ids, Hi, Di, S, topk, B);
    } else {
        for (int64_t j = 0; j < S; ++j) ids[j] = j;
    }
    sparse_attention(q, lat, table, ids, o, H, K, D, C, B, scale);
}
