#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Shapes: u, delta, z, out, du, ddelta, dz [b, d, L]; A, dA [d or b*d, NS]; B, C, dB, dC [b, g, L, NS];
   D, bias, dD, dbias [d or b*d]. Channels c0..c1 of the b*d channels; D, z, bias may be NULL. */

/* One loop per output and no branch inside: with the sigmoid's store under an `if` in the same loop, the
   backward's call ran scalar (a third of its time). */
static void delta_of(const float *restrict dc, float bd, int32_t softplus, int64_t L, float *restrict dt,
                     float *restrict sg) {
    if (softplus) {
        for (int64_t t = 0; t < L; t++) dt[t] = fsoftplus(dc[t] + bd);
        if (sg) for (int64_t t = 0; t < L; t++) sg[t] = fsigmoid(dc[t] + bd);
    } else {
        for (int64_t t = 0; t < L; t++) dt[t] = dc[t] + bd;
        if (sg) for (int64_t t = 0; t < L; t++) sg[t] = 1.0f;
    }
}

void scan_fwd(int64_t d, int64_t L, int64_t g, const float *u, const float *delta, const float *A,
              const float *B, const float *C, const float *D, const float *z, const float *bias,
              int32_t softplus, float *out, int64_t c0, int64_t c1) {
    float *dt = malloc(sizeof(float) * L);
    for (int64_t c = c0; c < c1; c++) {
        const int64_t bi = c / d, di = c % d, gi = di / (d / g);
        const float *uc = u + c * L, *Bc = B + (bi * g + gi) * L * NS, *Cc = C + (bi * g + gi) * L * NS;
        float *oc = out + c * L, h[NS], a[NS];
        delta_of(delta + c * L, bias ? bias[di] : 0.0f, softplus, L, dt, NULL);
        for (int k = 0; k < NS; k++) { h[k] = 0.0f; a[k] = A[di * NS + k]; }
        for (int64_t t = 0; t < L; t++) {
            const float *Bt = Bc + t * NS, *Ct = Cc + t * NS, dtt = dt[t], du = dtt * uc[t];
            float y = 0.0f;
            for (int k = 0; k < NS; k++) {
                h[k] = fexp(dtt * a[k]) * h[k] + du * Bt[k];
                y += h[k] * Ct[k];
            }
            oc[t] = y;
        }
        const float Dd = D ? D[di] : 0.0f;
        for (int64_t t = 0; t < L; t++) oc[t] += Dd * uc[t];
        if (z) {
            const float *zc = z + c * L;
            for (int64_t t = 0; t < L; t++) oc[t] *= zc[t] * fsigmoid(zc[t]);
        }
    }
    free(dt);
}

void scan_bwd(int64_t d, int64_t L, int64_t g, const float *u, const float *delta, const float *A,
              const float *B, const float *C, const float *D, const float *z, const float *bias,
              int32_t softplus, const float *gout, float *du, float *ddelta, float *dA, float *dB, float *dC,
              float *dD, float *dz, float *dbias, int64_t c0, int64_t c1) {
    float *H = malloc(sizeof(float) * ((2 * L + 1) * NS + 4 * L));
    float *E = H + (L + 1) * NS, *dt = E + L * NS, *sg = dt + L, *y = sg + L, *gy = y + L;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t bi = c / d, di = c % d, gi = di / (d / g);
        const float *uc = u + c * L, *Bc = B + (bi * g + gi) * L * NS, *Cc = C + (bi * g + gi) * L * NS;
        float *dBc = dB + (bi * g + gi) * L * NS, *dCc = dC + (bi * g + gi) * L * NS;
        const float *gc = gout + c * L, Dd = D ? D[di] : 0.0f;
        float a[NS], carry[NS], dAacc[NS];
        delta_of(delta + c * L, bias ? bias[di] : 0.0f, softplus, L, dt, sg);
        /* recompute the states: H row t + 1 is h_t, row 0 is h_{-1} = 0; E row t is exp(dt_t A). The state
           is carried in h, as the forward carries it, and only written to H: reading h_{t-1} back from H put a
           store and a load on the recurrence's chain. The same operations, so the same bits. */
        float h[NS];
        for (int k = 0; k < NS; k++) {
            a[k] = A[di * NS + k];
            H[k] = h[k] = carry[k] = dAacc[k] = 0.0f;
        }
        for (int64_t t = 0; t < L; t++) {
            const float *restrict Bt = Bc + t * NS;
            const float dtt = dt[t], dut = dtt * uc[t];
            float *restrict ht = H + (t + 1) * NS, *restrict et = E + t * NS;
            for (int k = 0; k < NS; k++) {
                const float e = fexp(dtt * a[k]);
                h[k] = e * h[k] + dut * Bt[k];
                et[k] = e;
                ht[k] = h[k];
            }
        }
        if (z) {  /* only the gate's gradient needs y: its sum over the states is a horizontal add per step */
            for (int64_t t = 0; t < L; t++) {
                const float *Ct = Cc + t * NS, *ht = H + (t + 1) * NS;
                float yt = 0.0f;
                for (int k = 0; k < NS; k++) yt += ht[k] * Ct[k];
                y[t] = yt;
            }
        }
        /* out = (y + D u) * silu(z): gy = dout/dy, dz, dD */
        float dDacc = 0.0f;
        if (z) {
            const float *zc = z + c * L;
            float *dzc = dz + c * L;
            for (int64_t t = 0; t < L; t++) {
                const float s = fsigmoid(zc[t]), silu = zc[t] * s;
                gy[t] = gc[t] * silu;
                dzc[t] = gc[t] * (y[t] + Dd * uc[t]) * s * (1.0f + zc[t] * (1.0f - s));
            }
        } else {
            for (int64_t t = 0; t < L; t++) gy[t] = gc[t];
        }
        for (int64_t t = 0; t < L; t++) dDacc += gy[t] * uc[t];
        /* the adjoint, backwards: dh_t = gy_t C_t + exp(dt_{t+1} A) dh_{t+1} */
        float *duc = du + c * L, *ddc = ddelta + c * L, dbacc = 0.0f;
        for (int64_t t = L - 1; t >= 0; t--) {
            const float *Bt = Bc + t * NS, *Ct = Cc + t * NS, *ht = H + (t + 1) * NS, *hp = H + t * NS;
            const float *et = E + t * NS, gt = gy[t], dtt = dt[t], ut = uc[t], dut = dtt * ut;
            float *dBt = dBc + t * NS, *dCt = dCc + t * NS, q = 0.0f, r = 0.0f;
            for (int k = 0; k < NS; k++) {
                const float dh = gt * Ct[k] + carry[k], w = dh * hp[k] * et[k];
                dCt[k] += gt * ht[k];
                dBt[k] += dh * dut;
                q += dh * Bt[k];
                r += w * a[k];
                dAacc[k] += w * dtt;
                carry[k] = et[k] * dh;
            }
            duc[t] = q * dtt + gt * Dd;
            ddc[t] = (q * ut + r) * sg[t];
            dbacc += ddc[t];
        }
        for (int k = 0; k < NS; k++) dA[c * NS + k] = dAacc[k];
        dD[c] = dDacc;
        dbias[c] = dbacc;
    }
    free(H);
}
