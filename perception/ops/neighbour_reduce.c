#include <stdint.h>
#include <stdlib.h>

/* The max and the sum over each target's k neighbours' feature rows, without the [T, k, C] gather.
   features [R, C], sources [T, k] (rows of features), top and total [T, C]; targets t0..t1. A NaN in a
   neighbour's row wins the max, as it does in torch's amax. */
void reduce_fwd(int64_t C, int64_t k, const float *features, const int64_t *sources, float *top, float *total,
                int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t *s = sources + t * k;
        float *restrict m = top + t * C, *restrict u = total + t * C;
        const float *restrict r = features + s[0] * C;
        for (int64_t c = 0; c < C; c++) { m[c] = r[c]; u[c] = r[c]; }
        for (int64_t j = 1; j < k; j++) {
            r = features + s[j] * C;
            for (int64_t c = 0; c < C; c++) {
                m[c] = (r[c] > m[c] || r[c] != r[c]) ? r[c] : m[c];
                u[c] += r[c];
            }
        }
    }
}

/* The gradient into features: each target's sum gradient goes to all k neighbours, its max gradient to the
   neighbours that reach the max, shared equally among ties (as torch's amax shares it). Accumulates into
   grad [R, C]; targets that share a neighbour write the same row, so one thread runs all the targets. */
void reduce_bwd(int64_t C, int64_t k, const float *features, const int64_t *sources, const float *top,
                const float *grad_top, const float *grad_total, float *grad, int64_t t0, int64_t t1) {
    float *ties = malloc(sizeof(float) * C);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t *s = sources + t * k;
        const float *m = top + t * C, *gm = grad_top + t * C, *gs = grad_total ? grad_total + t * C : NULL;
        for (int64_t c = 0; c < C; c++) ties[c] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float *r = features + s[j] * C;
            for (int64_t c = 0; c < C; c++) ties[c] += (r[c] == m[c]) ? 1.0f : 0.0f;
        }
        for (int64_t j = 0; j < k; j++) {
            const float *r = features + s[j] * C;
            float *g = grad + s[j] * C;
            for (int64_t c = 0; c < C; c++) {
                const float share = (r[c] == m[c]) ? gm[c] / ties[c] : 0.0f;
                g[c] += share + (gs ? gs[c] : 0.0f);
            }
        }
    }
    free(ties);
}
