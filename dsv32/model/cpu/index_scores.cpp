// The indexer's scores of one query row over a pool's first S keys, alone (built by native.py after
// index_topk.cpp): what decode_attention.cpp selects its top-k from, for tests to hold against
// Indexer.scores. The pool is fp32 (fp8 = 0) or FP8 values with their scales (fp8 = 1).
extern "C" void kernel(const float* iq, const float* iw, float* ik_f32, uint8_t* ik_q, float* ik_scale,
                       const int64_t* table, float* scores, const int64_t Hi, const int64_t Di, const int64_t S,
                       const int64_t B, const int64_t fp8) {
    const Rows ik = fp8 ? Rows{nullptr, ik_q, ik_scale, nullptr, Di, 0} : Rows{ik_f32, nullptr, nullptr, nullptr, Di, 0};
    index_scores(iq, iw, ik, table, scores, Hi, Di, S, B);
}
