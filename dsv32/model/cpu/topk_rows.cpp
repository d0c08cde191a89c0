// The prefill indexer's causal top-k (built by native.py after vec.h and top_ids.cpp): for each of
// t query rows of scores [t, S], the k best of its first limit[i] keys (those at or before the
// query's position) as ids ascending, -1 after them where fewer than k are visible. Rows are split
// across OpenMP threads. Reference: causal_topk_reference (torch.topk, then sorted the same way).

extern "C" void kernel(const float* scores, const int64_t* limit, int64_t* out, const int64_t t, const int64_t S,
                       const int64_t k) {
    #pragma omp parallel
    {
        TopScratch sc;
        #pragma omp for schedule(dynamic, t / 64 + 1)
        for (int64_t i = 0; i < t; ++i) {
            const int64_t n = std::min(std::max(limit[i], (int64_t)0), S);
            sc.reserve(n);
            const int64_t got = top_ids(scores + i * S, n, k, out + i * k, sc);
            std::fill(out + i * k + got, out + (i + 1) * k, (int64_t)-1);
        }
    }
}
