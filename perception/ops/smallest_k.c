#include <math.h>
#include <stdint.h>

#define MAX_K 256

/* The k smallest entries (k <= MAX_K) of each row of dist [rows, n], as column indices in ascending order of
   distance, ties to the lower index (a stable sort's order); NaN counts as +inf. Rows r0..r1 into
   out [rows, k]. One pass per row keeps the k best in order, by insertion: after the first few dozen
   entries almost every one fails the first comparison, with the current k-th best. */
void smallest_k(int64_t n, int64_t k, const float *dist, int64_t *out, int64_t r0, int64_t r1) {
    float best[MAX_K];
    int32_t at[MAX_K];
    for (int64_t r = r0; r < r1; r++) {
        const float *row = dist + r * n;
        int64_t count = 0;
        float worst = INFINITY;
        for (int64_t j = 0; j < n; j++) {
            float d = row[j];
            if (count == k && !(d < worst)) continue;  /* not among the k smallest so far */
            if (d != d) d = INFINITY;
            int64_t p = count < k ? count++ : k - 1;   /* the slot that frees up */
            while (p > 0 && best[p - 1] > d) {         /* larger ones move right; ties stay before */
                best[p] = best[p - 1];
                at[p] = at[p - 1];
                p--;
            }
            best[p] = d;
            at[p] = (int32_t)j;
            if (count == k) worst = best[k - 1];
        }
        for (int64_t p = 0; p < k; p++) out[r * k + p] = at[p];
    }
}
