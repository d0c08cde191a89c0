// Sparse MLA attention of many query rows (prefill; built by native.py after vec.h, cache_rows.cpp
// and sparse_attention.cpp): for query i, o[i] = sparse_attention's sum over its own K selected
// rows ids[i] (-1: empty), read in place from the pool through the row's block table. Instead of
// gathering [t, K, C+R] rows into a buffer for batched matmuls, each row is read where it lies.
// Queries are split across OpenMP threads. Reference: MLA.attend_latent.

extern "C" void kernel(const float* q, const int64_t* ids, float* lat_f32, uint8_t* lat_q, float* lat_scale,
                       uint16_t* lat_half, const int64_t* table, float* o, const int64_t t, const int64_t H,
                       const int64_t D, const int64_t C, const int64_t K, const int64_t B, const int64_t layout,
                       const float scale) {
    const Rows lat = rows_of(layout, lat_f32, lat_q, lat_scale, lat_half, D, D - C);
    #pragma omp parallel
    {
        std::vector<float> acc(H * (C + 2));
        std::unique_ptr<float[]> scratch(new float[attend_scratch(H, D, C)]);
        #pragma omp for schedule(dynamic, t / 64 + 1)
        for (int64_t i = 0; i < t; ++i) {
            attend_rows(q + i * H * D, lat, table, ids + i * K, 0, K, acc.data(), scratch.get(), H, D, C, B, scale);
            merge_parts(acc.data(), 1, o + i * H * C, H, C);
        }
    }
}
