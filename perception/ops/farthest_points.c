#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Farthest point sampling of m of the n points of each sample pos [B, n, 3], from each sample's first pick
   first[b], into chosen [B, m]; samples b0..b1. The squared distances are torch's (p - q).square().sum(-1)
   to the rounding: each difference and square rounded, the three added in order; this file is compiled
   without contraction into fused multiply-adds or reassociation (`STRICT_FLAGS`), so the picks are the torch
   loop's. A point's distance to the picked set is the least of them; the next pick is the first point of
   the largest (argmax's order). */
void farthest_points(int64_t n, int64_t m, const float *pos, const int64_t *first, int64_t *chosen, int64_t b0,
                     int64_t b1) {
    float *nearest = malloc(sizeof(float) * n);
    for (int64_t b = b0; b < b1; b++) {
        const float *p = pos + b * n * 3;
        int64_t *out = chosen + b * m, current = first[b];
        for (int64_t i = 0; i < n; i++) nearest[i] = INFINITY;
        for (int64_t s = 0; s < m; s++) {
            out[s] = current;
            const float qx = p[current * 3], qy = p[current * 3 + 1], qz = p[current * 3 + 2];
            float best = -INFINITY;
            int64_t at = 0;
            for (int64_t i = 0; i < n; i++) {
                const float dx = p[i * 3] - qx, dy = p[i * 3 + 1] - qy, dz = p[i * 3 + 2] - qz;
                const float sx = dx * dx, sy = dy * dy, sz = dz * dz;
                const float d = (sx + sy) + sz;
                const float v = d < nearest[i] ? d : nearest[i];
                nearest[i] = v;
                if (v > best) {
                    best = v;
                    at = i;
                }
            }
            current = at;
        }
    }
    free(nearest);
}
