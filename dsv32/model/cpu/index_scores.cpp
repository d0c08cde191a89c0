// The indexer's scores of one query row over a pool's first S keys, alone (built by native.py after
// index_topk.cpp): what decode_attention.cpp selects its top-k from, for tests to hold against
// Indexer.scores. The pool is fp32 (layout 0), FP8 values with their scales (1) or bf16 (2).
extern "C" void kernel(const float* iq, const float* iw, float* ik_f32, uint8_t* ik_q, float* ik_scale,
                       uint16_t* ik_half, const int64_t* table, float* scores, const int64_t Hi, const int64_t Di,
                       const int64_t S, const int64_t B, const int64_t layout) {
    const Rows ik = rows_of(layout, ik_f32, ik_q, ik_scale, ik_half, Di, 0);
    index_scores(iq, iw, ik, table, scores, Hi, Di, S, B);
}
