#include <stdint.h>
#include <stdlib.h>

/* Mamba's causal depthwise convolution then SiLU, one row (batch b, channel c) at a time:
   pre[t] = bias[c] + sum_j w[c, j] x[t - (K - 1) + j] (x before t = 0 is 0), out[t] = silu(pre[t]).
   x, out, grad_out, grad_x [b, C, L] as rows r0..r1 of the b*C; w [C, K]; bias [C] or NULL; grad_w [b*C, K],
   grad_bias [b*C] per row (the caller sums over the batch, so no two threads write one place). The loops run
   over t innermost, so they vectorise; `pre` is a row's buffer of L floats. */
static void pre_activation(int64_t L, int64_t K, const float *restrict x, const float *restrict w, float b,
                           float *restrict pre) {
    for (int64_t t = 0; t < L; t++) pre[t] = b;
    for (int64_t j = 0; j < K; j++) {
        const int64_t shift = K - 1 - j;
        const float wj = w[j];
        for (int64_t t = shift; t < L; t++) pre[t] += wj * x[t - shift];
    }
}

void conv_silu_fwd(int64_t C, int64_t L, int64_t K, const float *x, const float *w, const float *bias,
                   float *out, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t c = r % C;
        float *restrict o = out + r * L;
        pre_activation(L, K, x + r * L, w + c * K, bias ? bias[c] : 0.0f, o);
        for (int64_t t = 0; t < L; t++) o[t] *= fsigmoid(o[t]);
    }
}

void conv_silu_bwd(int64_t C, int64_t L, int64_t K, const float *x, const float *w, const float *bias,
                   const float *grad_out, float *grad_x, float *grad_w, float *grad_bias, int64_t r0,
                   int64_t r1) {
    float *pre = malloc(sizeof(float) * L);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t c = r % C;
        const float *restrict xr = x + r * L, *restrict g = grad_out + r * L, *restrict wc = w + c * K;
        float *restrict gx = grad_x + r * L;
        pre_activation(L, K, xr, wc, bias ? bias[c] : 0.0f, pre);
        float gb = 0.0f;
        for (int64_t t = 0; t < L; t++) {  /* pre becomes d loss / d pre: silu'(p) = s (1 + p (1 - s)) */
            const float s = fsigmoid(pre[t]);
            pre[t] = g[t] * s * (1.0f + pre[t] * (1.0f - s));
            gb += pre[t];
            gx[t] = 0.0f;
        }
        for (int64_t j = 0; j < K; j++) {
            const int64_t shift = K - 1 - j;
            const float wj = wc[j];
            float gw = 0.0f;
            for (int64_t t = shift; t < L; t++) {
                gx[t - shift] += wj * pre[t];
                gw += pre[t] * xr[t - shift];
            }
            grad_w[r * K + j] = gw;
        }
        grad_bias[r] = gb;
    }
    free(pre);
}
