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

/* The transposes between edge rows [n, D] and the chunk's [D, CHUNK] lanes move 8 x 8 tiles through
   registers (GCC's and Clang's vector extensions; any target): element by element, they took most of the
   kernel's time. They only move values, and put_rows still adds each edge into its target's row in edge
   order, so the results are the same bits as element by element. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline void transpose8(v8f r[8]) { /* r[i][j] -> r[j][i] */
    v8f t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = SHUFFLE(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = SHUFFLE(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = SHUFFLE(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = SHUFFLE(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* [n, D] -> [D, CHUNK], lanes from n on zeroed; edge s + e's row is its own (k = 0) or row (s + e) / k of src */
static void load_rows(const float *src, int64_t D, int64_t s, int64_t n, int64_t k, float *dst) {
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) {
        const float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = src + (k > 0 ? (s + e + i) / k : s + e + i) * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            v8f r[8];
            for (int i = 0; i < 8; i++) r[i] = load8(rows[i] + d);
            transpose8(r);
            for (int j = 0; j < 8; j++) store8(dst + (d + j) * CHUNK + e, r[j]);
        }
        for (; d < D; d++)
            for (int i = 0; i < 8; i++) dst[d * CHUNK + e + i] = rows[i][d];
    }
    for (; e < n; e++)
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = src[(k > 0 ? (s + e) / k : s + e) * D + d];
    for (e = n; e < CHUNK; e++)
        for (int64_t d = 0; d < D; d++) dst[d * CHUNK + e] = 0.0f;
}

/* [D, CHUNK] -> rows [n, D]: written (k = 0) or added into row (s + e) / k, edges in order (k > 0) */
static void put_rows(const float *src, int64_t D, int64_t s, int64_t n, int64_t k, float *dst) {
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) {
        float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = dst + (k > 0 ? (s + e + i) / k : s + e + i) * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            v8f r[8];
            for (int j = 0; j < 8; j++) r[j] = load8(src + (d + j) * CHUNK + e);
            transpose8(r);
            for (int i = 0; i < 8; i++) store8(rows[i] + d, k > 0 ? load8(rows[i] + d) + r[i] : r[i]);
        }
        for (; d < D; d++)
            for (int i = 0; i < 8; i++) {
                if (k > 0) rows[i][d] += src[d * CHUNK + e + i];
                else rows[i][d] = src[d * CHUNK + e + i];
            }
    }
    for (; e < n; e++) {
        float *row = dst + (k > 0 ? (s + e) / k : s + e) * D;
        for (int64_t d = 0; d < D; d++) {
            if (k > 0) row[d] += src[d * CHUNK + e];
            else row[d] = src[d * CHUNK + e];
        }
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
        load_rows(x1, d1, s, n, 0, X1);
        load_rows(x2, d2, s, n, 0, X2);
        load_rows(w, dw, s, n, 0, W);
        memset(O, 0, sizeof(float) * CHUNK * dout);
        for (int64_t t = 0; t < nterms; t++) {
            const float c = coef[t];
            const float *restrict pa = X1 + a[t] * CHUNK, *restrict pb = X2 + b[t] * CHUNK;
            const float *restrict pw = W + wr[t] * CHUNK;
            float *restrict po = O + o[t] * CHUNK;
            for (int e = 0; e < CHUNK; e++) po[e] += c * pw[e] * pa[e] * pb[e];
        }
        put_rows(O, dout, s, n, k, out);
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
        load_rows(x1, d1, s, n, 0, X1);
        load_rows(x2, d2, s, n, 0, X2);
        load_rows(w, dw, s, n, 0, W);
        load_rows(gout, dout, s, n, k, G);
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
        put_rows(GX1, d1, s, n, 0, dx1);
        if (dx2) put_rows(GX2, d2, s, n, 0, dx2);
        put_rows(GW, dw, s, n, 0, ddw);
    }
    free(buf);
}
