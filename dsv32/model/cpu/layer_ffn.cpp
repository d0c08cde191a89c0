// A block's second half for one decode row in one call (model/decode.py's native step), built by
// cpu/layer.py after vec.h, gemv.cpp (amx_gemv.cpp) and layer.cpp: W_uv and o_proj of the
// attention's o_lat [H, C], the residual, the post-attention norm and the MLP, or the MoE (the
// sigmoid router's group-limited top-k, the shared expert and the chosen experts), the residual
// again: h [D] is updated in place. Reference: the eager Block (MLA.absorb_o, o_proj,
// post_attention_layernorm, MLP / MoE with Gate.forward and the chosen experts summed in id order
// as decode._routed_row).
//
// The MLP (dense block) or the shared expert is w1 / w3 / w2 (gate_proj / up_proj / down_proj);
// a MoE block has E > 0 routed experts, whose six pointers each (w1, s1, w3, s3, w2, s2) are
// experts[6e..6e+6) (scales: any pointer for unscaled formats).
#include <algorithm>
#include <vector>

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

static Weight expert(const int64_t* experts, int64_t e, int j, int64_t N, int64_t K) {
    const int64_t* p = experts + 6 * e + 2 * j;
    return Weight{(const wt*)p[0], (const float*)p[1], N, K};
}

// act = silu(g) * u (SwiGLU's inner activations, from gate_proj's g and up_proj's u)
static void team_swiglu(const float* g, const float* u, int64_t n, float* act) {
    #pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) act[i] = silu(g[i]) * u[i];
}

extern "C" void kernel(float* h, const float* o_lat, const wt* kvb_w, const float* kvb_s, const wt* wo_w,
                       const float* wo_s, const float* post_norm, const wt* w1_w, const float* w1_s, const wt* w3_w,
                       const float* w3_s, const wt* w2_w, const float* w2_s, const float* gate, const float* bias,
                       const int64_t* experts, float* work, int64_t* ids,
                       const int64_t D, const int64_t H, const int64_t nope, const int64_t v, const int64_t C,
                       const int64_t I, const int64_t E, const int64_t Ie, const int64_t n_group,
                       const int64_t topk_group, const int64_t k, const int64_t norm, const float scaling,
                       const float eps) {
    // work: o [H*v], a [D], x [D], g, u, act [I], y [D], router scores [E], then per chosen expert
    // g, u, act [Ie] and y [D]
    float *o = work, *a = o + H * v, *x = a + D, *g = x + D, *u = g + I, *act = u + I, *y = act + I, *s = y + D;
    float* ex = s + E;
    const auto eg = [&](int64_t j) { return ex + j * (3 * Ie + D); };            // expert j's g; u, act, y follow
    const Weight kvb{kvb_w, kvb_s, H * (nope + v), C}, wo{wo_w, wo_s, D, H * v};
    const Weight w1{w1_w, w1_s, I, D}, w3{w3_w, w3_s, I, D}, w2{w2_w, w2_s, D, I};
    std::vector<float> wr(k);
    std::vector<Act> heads(H), acts(k);
    Act oa, xa, aa;
    #pragma omp parallel
    {
        tiles_begin();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < H; ++j) heads[j].set(o_lat + j * C, C);
        team_absorb_o(kvb, heads.data(), H, nope, v, o);
        #pragma omp barrier
        #pragma omp single
        oa.set(o, H * v);
        team_gemv(wo, oa, a);
        #pragma omp barrier
        #pragma omp single
        {
            for (int64_t i = 0; i < D; ++i) h[i] += a[i];
            rms_norm(h, post_norm, D, eps, x);
            xa.set(x, D);
        }
        team_gemv(w1, xa, g);                                             // the MLP or the shared expert
        team_gemv(w3, xa, u);
        if (E > 0) team_gemv_f32(gate, E, D, x, s);                       // the router's logits
        #pragma omp barrier
        #pragma omp single
        {
            if (E > 0) {
                for (int64_t e = 0; e < E; ++e) s[e] = sigmoid(s[e]);
                route(s, bias, E, n_group, topk_group, k, norm != 0, scaling, ids, wr.data());
            }
        }
        team_swiglu(g, u, I, act);
        for (int64_t j = 0; j < k; ++j) {                                 // the chosen experts' g and u
            team_gemv(expert(experts, ids[j], 0, Ie, D), xa, eg(j));
            team_gemv(expert(experts, ids[j], 1, Ie, D), xa, eg(j) + Ie);
        }
        #pragma omp barrier
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = -1; j < k; ++j) {                                // the inner activations' limbs
            if (j < 0) {
                aa.set(act, I);
                continue;
            }
            float* ej = eg(j);
            for (int64_t i = 0; i < Ie; ++i) ej[2 * Ie + i] = silu(ej[i]) * ej[Ie + i];
            acts[j].set(ej + 2 * Ie, Ie);
        }
        team_gemv(w2, aa, y);
        for (int64_t j = 0; j < k; ++j) team_gemv(expert(experts, ids[j], 2, D, Ie), acts[j], eg(j) + 3 * Ie);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < D; ++n) {                                 // h + (routed + shared), or h + mlp
            if (E == 0) { h[n] += y[n]; continue; }
            float routed = 0.f;
            for (int64_t j = 0; j < k; ++j) routed += eg(j)[3 * Ie + n] * wr[j];
            h[n] += routed + y[n];
        }
        tiles_end();
    }
}
