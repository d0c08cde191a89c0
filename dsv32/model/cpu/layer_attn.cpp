// A block's attention half for one decode row in one call (model/decode.py's native step), built
// by cpu/layer.py after vec.h, gemv.cpp (amx_gemv.cpp), the decode attention's files and layer.cpp:
// the input norm, MLA's and the indexer's projections, norms and ropes, the absorbed query, then
// decode_attention.cpp's decode_row (cache write, indexer top-k, sparse attention) -> o_lat [H, C].
// Reference: the eager Block (input_layernorm, MLA.project, Indexer.key / query, MLA.absorb_q,
// then KV.write, MLA.decode_select, MLA.attend_latent).
//
// work (floats): x [D], q_a [Q], qr [Q], kv [C+R], latent [C+R], ik [Di], iw [Hi], q [H, nope+R],
// iq [Hi, Di], qa [H, C+R] (the absorbed queries)
extern "C" void kernel(const float* h, const float* cos, const float* sin, const float* in_norm,
                       const wt* qa_w, const float* qa_s, const float* qa_norm, const wt* qb_w, const float* qb_s,
                       const wt* kva_w, const float* kva_s, const float* kv_norm, const wt* kvb_w, const float* kvb_s,
                       const wt* wk_w, const float* wk_s, const float* k_norm_w, const float* k_norm_b,
                       const wt* wqb_w, const float* wqb_s, const float* wproj,
                       float* lat_f32, uint8_t* lat_q, float* lat_scale, uint16_t* lat_half, float* ik_f32,
                       uint8_t* ik_q, float* ik_scale, uint16_t* ik_half, const int64_t* table,
                       float* work, float* scores, int64_t* ids, float* o,
                       const int64_t D, const int64_t Q, const int64_t H, const int64_t nope, const int64_t R,
                       const int64_t C, const int64_t v, const int64_t Hi, const int64_t Di, const int64_t S,
                       const int64_t topk, const int64_t block, const int64_t layout, const float eps,
                       const float k_eps, const float scale) {
    const int64_t L = C + R, P = nope + R;
    float *x = work, *q_a = x + D, *qr = q_a + Q, *kv = qr + Q, *latent = kv + L, *ik = latent + L;
    float *iw = ik + Di, *q = iw + Hi, *iq = q + H * P, *qa = iq + Hi * Di;
    const Weight qa_m{qa_w, qa_s, Q, D}, qb_m{qb_w, qb_s, H * P, Q}, kva_m{kva_w, kva_s, L, D};
    const Weight kvb_m{kvb_w, kvb_s, H * (nope + v), C}, wk_m{wk_w, wk_s, Di, D}, wqb_m{wqb_w, wqb_s, Hi * Di, Q};
    const float w_scale = (float)(std::pow((double)Hi, -0.5) * std::pow((double)Di, -0.5));  // Indexer.query
    Act xa, qra;                                                          // x and qr as the products read them
    #pragma omp parallel
    {
        tiles_begin();
        #pragma omp single
        {
            rms_norm(h, in_norm, D, eps, x);
            xa.set(x, D);
        }                                                                 // (barrier)
        team_gemv(qa_m, xa, q_a);                                         // everything that reads x
        team_gemv(kva_m, xa, kv);
        team_gemv(wk_m, xa, ik);
        team_gemv_f32(wproj, Hi, D, x, iw);
        #pragma omp barrier
        #pragma omp single
        {
            rms_norm(q_a, qa_norm, Q, eps, qr);
            qra.set(qr, Q);
            rms_norm(kv, kv_norm, C, eps, latent);
            rope_interleaved(kv + C, cos, sin, R, latent + C);
            layer_norm(ik, k_norm_w, k_norm_b, Di, k_eps);
            rope_half(ik, cos, sin, R);                                   // the indexer's rope dims come first
            for (int64_t j = 0; j < Hi; ++j) iw[j] *= w_scale;
        }
        team_gemv(qb_m, qra, q);                                          // everything that reads qr
        team_gemv(wqb_m, qra, iq);
        #pragma omp barrier
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < H + Hi; ++t) {                            // ropes of each head's query
            if (t < H) rope_interleaved(q + t * P + nope, cos, sin, R, qa + t * L + C);
            else rope_half(iq + (t - H) * Di, cos, sin, R);
        }
        team_absorb_q(kvb_m, q, P, H, nope, v, qa, L);
        tiles_end();
    }
    decode_row(latent, ik, qa, iq, iw, lat_f32, lat_q, lat_scale, lat_half, ik_f32, ik_q, ik_scale, ik_half, table,
               scores, ids, o, H, L, C, Hi, Di, S, topk, block, layout, scale);
}
