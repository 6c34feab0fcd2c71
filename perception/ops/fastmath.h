/* Branch-free exp, sigmoid and softplus in float32, so that loops over them vectorise (libm's expf does not
   without -ffast-math). exp's argument is clamped to [-87, 88]; exp(-87) ~ 1.6e-38 stands in for 0. Put
   before a kernel's source by `Kernel(headers=...)` (perception/ops/native.py). */
#include <stdint.h>
#include <string.h>

static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = __builtin_rintf(x * 1.4426950408889634f);
    float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f
              + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}
static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }
static inline float fsoftplus(float x) {  /* max(x, 0) + log1p(exp(-|x|)), log1p by the atanh series */
    float e = fexp(x < 0.0f ? x : -x), s = e / (2.0f + e), s2 = s * s;
    float l = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9
              + s2 * (1.0f / 11 + s2 * (1.0f / 13)))))));
    return (x > 0.0f ? x : 0.0f) + l;
}
