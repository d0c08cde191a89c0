// A block's second half for one decode row in one call (model/decode.py's native step), built by
// cpu/layer.py after vec.h, gemv.cpp and layer.cpp: W_uv and o_proj of the attention's o_lat
// [H, C], the residual, the post-attention norm and the MLP, or the MoE (the sigmoid router's
// group-limited top-k, the shared expert and the chosen experts), the residual again: h [D] is
// updated in place. Reference: the eager Block (MLA.absorb_o, o_proj, post_attention_layernorm,
// MLP / MoE with Gate.forward and the chosen experts summed in id order as decode._routed_row).
//
// The MLP (dense block) or the shared expert is w1 / w3 / w2 (gate_proj / up_proj / down_proj);
// a MoE block has E > 0 routed experts, whose six pointers each (w1, s1, w3, s3, w2, s2) are
// experts[6e..6e+6) (scales: any pointer for unscaled formats).
// work (floats): o [H*v], a [D], x [D], act [I], logits [E], acts of the chosen experts [k, Ie]
#include <algorithm>

// Gate.select and Gate.forward's weights: the k experts of the best topk_group groups (a group's
// score: its two best biased scores) by biased score s + bias, ties to the lower id; their
// weights s (normalised to sum 1 when norm), times scaling. -> ids ascending, w in that order.
static void route(const float* s, const float* bias, int64_t E, int64_t n_group, int64_t topk_group, int64_t k,
                  bool norm, float scaling, int64_t* ids, float* w) {
    std::vector<float> biased(E), group(n_group);
    for (int64_t e = 0; e < E; ++e) biased[e] = s[e] + bias[e];
    const int64_t per = E / n_group;
    std::vector<int64_t> order(std::max(E, n_group));
    if (n_group > 1) {
        for (int64_t g = 0; g < n_group; ++g) {
            float a = -INFINITY, b = -INFINITY;                           // the group's two best
            for (int64_t e = g * per; e < (g + 1) * per; ++e) {
                const float x = biased[e];
                if (x > a) { b = a; a = x; } else if (x > b) b = x;
            }
            group[g] = a + b;
        }
        for (int64_t g = 0; g < n_group; ++g) order[g] = g;
        std::stable_sort(order.begin(), order.begin() + n_group, [&](int64_t i, int64_t j) { return group[i] > group[j]; });
        std::vector<bool> kept(n_group, false);
        for (int64_t g = 0; g < topk_group; ++g) kept[order[g]] = true;
        for (int64_t e = 0; e < E; ++e) if (!kept[e / per]) biased[e] = -INFINITY;
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.begin() + E, [&](int64_t i, int64_t j) { return biased[i] > biased[j]; });
    std::sort(order.begin(), order.begin() + k);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) { ids[j] = order[j]; w[j] = s[order[j]]; sum += w[j]; }
    for (int64_t j = 0; j < k; ++j) w[j] = (norm ? w[j] / (sum + 1e-20f) : w[j]) * scaling;
}

// act[n] = silu(w1[n] . x) * (w3[n] . x) (MLP's inner activations)
static void team_swiglu(const Weight& w1, const Weight& w3, const float* x, float* act) {
    #pragma omp for schedule(dynamic, TEAM_ROWS) nowait
    for (int64_t n = 0; n < w1.N; ++n) act[n] = silu(weight_dot(w1, n, x)) * weight_dot(w3, n, x);
}

static Weight expert(const int64_t* experts, int64_t e, int j, int64_t N, int64_t K) {
    const int64_t* p = experts + 6 * e + 2 * j;
    return Weight{(const wt*)p[0], (const float*)p[1], N, K};
}

extern "C" void kernel(float* h, const float* o_lat, const wt* kvb_w, const float* kvb_s, const wt* wo_w,
                       const float* wo_s, const float* post_norm, const wt* w1_w, const float* w1_s, const wt* w3_w,
                       const float* w3_s, const wt* w2_w, const float* w2_s, const float* gate, const float* bias,
                       const int64_t* experts, float* work, int64_t* ids,
                       const int64_t D, const int64_t H, const int64_t nope, const int64_t v, const int64_t C,
                       const int64_t I, const int64_t E, const int64_t Ie, const int64_t n_group,
                       const int64_t topk_group, const int64_t k, const int64_t norm, const float scaling,
                       const float eps) {
    float *o = work, *a = o + H * v, *x = a + D, *act = x + D, *s = act + I, *acts = s + E;
    const Weight kvb{kvb_w, kvb_s, H * (nope + v), C}, wo{wo_w, wo_s, D, H * v};
    const Weight w1{w1_w, w1_s, I, D}, w3{w3_w, w3_s, I, D}, w2{w2_w, w2_s, D, I};
    std::vector<float> wr(k);
    #pragma omp parallel
    {
        team_absorb_o(kvb, o_lat, H, nope, v, o);
        #pragma omp barrier
        team_gemv(wo, o, a);
        #pragma omp barrier
        #pragma omp single
        {
            for (int64_t i = 0; i < D; ++i) h[i] += a[i];
            rms_norm(h, post_norm, D, eps, x);
        }
        team_swiglu(w1, w3, x, act);                                      // the MLP or the shared expert
        if (E > 0) team_gemv_f32(gate, E, D, x, s);                       // the router's logits
        #pragma omp barrier
        if (E > 0) {
            #pragma omp single
            {
                for (int64_t e = 0; e < E; ++e) s[e] = sigmoid(s[e]);
                route(s, bias, E, n_group, topk_group, k, norm != 0, scaling, ids, wr.data());
            }
            #pragma omp for schedule(dynamic, TEAM_ROWS)
            for (int64_t t = 0; t < k * Ie; ++t) {                        // the chosen experts' activations
                const int64_t j = t / Ie, n = t % Ie;
                const Weight e1 = expert(experts, ids[j], 0, Ie, D), e3 = expert(experts, ids[j], 1, Ie, D);
                acts[t] = silu(weight_dot(e1, n, x)) * weight_dot(e3, n, x);
            }
        }
        #pragma omp for schedule(dynamic, TEAM_ROWS)
        for (int64_t n = 0; n < D; ++n) {                                 // h + (routed + shared), or h + mlp
            const float y = weight_dot(w2, n, act);
            if (E == 0) { h[n] += y; continue; }
            float routed = 0.f;
            for (int64_t j = 0; j < k; ++j) routed += weight_dot(expert(experts, ids[j], 2, D, Ie), n, acts + j * Ie) * wr[j];
            h[n] += routed + y;
        }
    }
}
