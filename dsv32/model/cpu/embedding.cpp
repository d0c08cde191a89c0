// Rows of a packed embedding table as fp32 (a decode step's few tokens), built by cpu/layer.py
// after vec.h, gemv.cpp and layer.cpp (LAYER and the table's storage): out[i] = w[ids[i]] (times
// its int8 scales, one per group_of(D) values); an id outside [0, V) throws (no row is read).
// Reference: cpu/packed.embedding_rows.
#include <stdexcept>
#include <string>

extern "C" void kernel(const int64_t* ids, const wt* w, const float* s, float* out, const int64_t n, const int64_t V,
                       const int64_t D) {
    const int64_t G = group_of(D);
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= V)
            throw std::out_of_range("token id " + std::to_string(ids[i]) + " is outside the vocabulary [0, " +
                                    std::to_string(V) + ")");
    for (int64_t i = 0; i < n; ++i) {
        const wt* row = w + ids[i] * D;
        float* o = out + i * D;
        for (int64_t d = 0; d < D; d += WIDTH) {
#if defined(INT8)
            vstore(o + d, vmul(wload(row + d), vset1(s[ids[i] * (D / G) + d / G])));
#else
            vstore(o + d, wload(row + d));
#endif
        }
    }
}
