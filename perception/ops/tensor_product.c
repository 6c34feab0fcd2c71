#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e3nn's "uvu" tensor product with a weight per edge, as a list of terms. Term t reads component a[t] of x1,
   b[t] of x2 and wr[t] of the weights, and adds c[t] * w * x1 * x2 into component o[t] of the output.
   Inputs and outputs are [E, D] (edge-major, as torch holds them). Edges e0..e1 run in chunks of CHUNK: each
   chunk is transposed into [D, CHUNK] buffers, where the chunk's edges are the SIMD lanes and every buffer
   stays in cache while all the terms pass over it, and its results are transposed back.
   With k > 0 the edges come grouped by target, k each in target order (a kNN graph), and the output is each
   target's sum, [E / k, D]: edge e's row is added into row e / k (zeroed by the caller), edges in order, as
   index_add_ adds them; the backward reads edge e's output gradient from row e / k. The [E, D] messages and
   their gradient never exist. A target's edges must not be split between two calls (e0, e1). */
#define CHUNK 64

static void load(const float *src, int64_t D, int64_t s, int64_t n, float *dst) { /* [n, D] -> [D, CHUNK] */
    for (int64_t e = 0; e < n; e++)
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = src[(s + e) * D + d];
    for (int64_t e = n; e < CHUNK; e++)
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = 0.0f;
}

static void store(const float *src, int64_t D, int64_t s, int64_t n, float *dst) { /* [D, CHUNK] -> [n, D] */
    for (int64_t e = 0; e < n; e++)
        for (int64_t d = 0; d < D; d++) dst[(s + e) * D + d] = src[d * CHUNK + e];
}

static void load_grouped(const float *src, int64_t D, int64_t s, int64_t n, int64_t k, float *dst) {
    for (int64_t e = 0; e < n; e++) /* edge s + e's row is its target's, (s + e) / k */
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = src[(s + e) / k * D + d];
    for (int64_t e = n; e < CHUNK; e++)
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = 0.0f;
}

static void add_grouped(const float *src, int64_t D, int64_t s, int64_t n, int64_t k, float *dst) {
    for (int64_t e = 0; e < n; e++) {
        float *row = dst + (s + e) / k * D;
        for (int64_t d = 0; d < D; d++) row[d] += src[d * CHUNK + e];
    }
}

void tp_fwd(int64_t d1, int64_t d2, int64_t dw, int64_t dout, int64_t nterms, const int32_t *a, const int32_t *b,
            const int32_t *o, const int32_t *wr, const float *coef, const float *x1, const float *x2,
            const float *w, int64_t k, float *out, int64_t e0, int64_t e1) {
    float *buf = malloc(sizeof(float) * CHUNK * (d1 + d2 + dw + dout));
    float *restrict X1 = buf, *restrict X2 = X1 + d1 * CHUNK, *restrict W = X2 + d2 * CHUNK;
    float *restrict O = W + dw * CHUNK;
    for (int64_t s = e0; s < e1; s += CHUNK) {
        const int64_t n = (e1 - s) < CHUNK ? (e1 - s) : CHUNK;
        load(x1, d1, s, n, X1);
        load(x2, d2, s, n, X2);
        load(w, dw, s, n, W);
        memset(O, 0, sizeof(float) * CHUNK * dout);
        for (int64_t t = 0; t < nterms; t++) {
            const float c = coef[t];
            const float *restrict pa = X1 + a[t] * CHUNK, *restrict pb = X2 + b[t] * CHUNK;
            const float *restrict pw = W + wr[t] * CHUNK;
            float *restrict po = O + o[t] * CHUNK;
            for (int e = 0; e < CHUNK; e++) po[e] += c * pw[e] * pa[e] * pb[e];
        }
        if (k > 0) add_grouped(O, dout, s, n, k, out);
        else store(O, dout, s, n, out);
    }
    free(buf);
}

/* The gradients of tp_fwd's output gout ([E / k, D] with k > 0): dx1 and ddw always, dx2 where it is not
   NULL. */
void tp_bwd(int64_t d1, int64_t d2, int64_t dw, int64_t dout, int64_t nterms, const int32_t *a, const int32_t *b,
            const int32_t *o, const int32_t *wr, const float *coef, const float *x1, const float *x2,
            const float *w, int64_t k, const float *gout, float *dx1, float *dx2, float *ddw, int64_t e0,
            int64_t e1) {
    float *buf = malloc(sizeof(float) * CHUNK * 2 * (d1 + d2 + dw + dout));
    float *restrict X1 = buf, *restrict X2 = X1 + d1 * CHUNK, *restrict W = X2 + d2 * CHUNK;
    float *restrict G = W + dw * CHUNK, *restrict GX1 = G + dout * CHUNK, *restrict GX2 = GX1 + d1 * CHUNK;
    float *restrict GW = GX2 + d2 * CHUNK;
    for (int64_t s = e0; s < e1; s += CHUNK) {
        const int64_t n = (e1 - s) < CHUNK ? (e1 - s) : CHUNK;
        load(x1, d1, s, n, X1);
        load(x2, d2, s, n, X2);
        load(w, dw, s, n, W);
        if (k > 0) load_grouped(gout, dout, s, n, k, G);
        else load(gout, dout, s, n, G);
        memset(GX1, 0, sizeof(float) * CHUNK * (d1 + d2 + dw));
        for (int64_t t = 0; t < nterms; t++) {
            const float c = coef[t];
            const float *restrict pa = X1 + a[t] * CHUNK, *restrict pb = X2 + b[t] * CHUNK;
            const float *restrict pw = W + wr[t] * CHUNK, *restrict pg = G + o[t] * CHUNK;
            float *restrict qa = GX1 + a[t] * CHUNK, *restrict qb = GX2 + b[t] * CHUNK;
            float *restrict qw = GW + wr[t] * CHUNK;
            if (dx2) {
                for (int e = 0; e < CHUNK; e++) {
                    const float g = c * pg[e];
                    qa[e] += g * pw[e] * pb[e];
                    qw[e] += g * pa[e] * pb[e];
                    qb[e] += g * pw[e] * pa[e];
                }
            } else {
                for (int e = 0; e < CHUNK; e++) {
                    const float g = c * pg[e] * pb[e];
                    qa[e] += g * pw[e];
                    qw[e] += g * pa[e];
                }
            }
        }
        store(GX1, d1, s, n, dx1);
        if (dx2) store(GX2, d2, s, n, dx2);
        store(GW, dw, s, n, ddw);
    }
    free(buf);
}
