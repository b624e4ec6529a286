/* Fused score + key-window compaction for core selection on the CPU: the rule of select_core_torch.chunk_window
 * followed by nonzero and gather, in one read of Δnew and Δold.
 *
 * For each element i: x = fp32(Δnew[i]), y = fp32(Δold[i]); it is a candidate when x and y have opposite signs,
 * magnitudes below FLT_MIN counting as no sign; its key is the int32 bit pattern of |x − y| (0 for non-candidates).
 * Elements whose key lies in [lo, hi] are written, in index order, as (base + i, key, x · scale); the count is
 * returned.
 * A NaN or inf in either input sets *nonfinite.
 *
 * Compiled at run time by window_cpu.py (plain C99, no torch headers), strict IEEE arithmetic (no -ffast-math), so
 * the keys and values are the bits torch computes. Each block of BLOCK elements is scored in a vectorisable loop;
 * then a bit mask per 32 elements marks the kept ones, and only those are visited (count trailing zeros).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256

static inline float load_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline float load_f64(const void *p, int64_t i) { return (float)((const double *)p)[i]; }
static inline float load_bf16(const void *p, int64_t i) {
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#ifdef __FLT16_MAX__
static inline float load_f16(const void *p, int64_t i) { return (float)((const _Float16 *)p)[i]; }
#else
static inline float load_f16(const void *p, int64_t i) { /* exact IEEE half → float, subnormals included */
    uint32_t h = ((const uint16_t *)p)[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man) {
        uint32_t e = 113u;
        while (!(man & 0x400u)) { man <<= 1; e--; }
        bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

#define DEFINE_WINDOW(NAME, LOAD_X, LOAD_Y)                                                                          \
    int64_t NAME(const void *x, const void *y, int64_t n, int32_t base, int32_t lo, int32_t hi, float scale,    \
                 int32_t *index, int32_t *key, float *value, int32_t *nonfinite) {                               \
        int64_t count = 0;                                                                                        \
        int32_t bad = 0;                                                                                          \
        float a[BLOCK];                                                                                           \
        int32_t k[BLOCK];                                                                                         \
        for (int64_t start = 0; start < n; start += BLOCK) {                                                      \
            int len = n - start < BLOCK ? (int)(n - start) : BLOCK;                                               \
            for (int j = 0; j < len; j++) {                                                                       \
                float u = LOAD_X(x, start + j), v = LOAD_Y(y, start + j), d = fabsf(u - v);                       \
                int32_t bits, candidate = ((u >= FLT_MIN) & (v <= -FLT_MIN)) | ((u <= -FLT_MIN) & (v >= FLT_MIN)); \
                memcpy(&bits, &d, sizeof bits);                                                                   \
                bad |= !(fabsf(u) <= FLT_MAX) | !(fabsf(v) <= FLT_MAX);                                           \
                k[j] = bits & -candidate;                                                                         \
                a[j] = u * scale;                                                                                 \
            }                                                                                                     \
            for (int g = 0; g < len; g += 32) {                                                                   \
                uint32_t kept = 0;                                                                                \
                int width = len - g < 32 ? len - g : 32;                                                          \
                for (int j = 0; j < width; j++)                                                                   \
                    kept |= (uint32_t)((k[g + j] >= lo) & (k[g + j] <= hi)) << j;                                 \
                while (kept) {                                                                                    \
                    int j = g + __builtin_ctz(kept);                                                              \
                    kept &= kept - 1;                                                                             \
                    index[count] = base + (int32_t)start + j;                                                     \
                    key[count] = k[j];                                                                            \
                    value[count] = a[j];                                                                          \
                    count++;                                                                                      \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        *nonfinite |= bad;                                                                                        \
        return count;                                                                                             \
    }

/* window_<Δnew dtype>_<Δold dtype> */
#define DEFINE_ROW(X, LOAD_X)                                                                                     \
    DEFINE_WINDOW(window_##X##_f32, LOAD_X, load_f32)                                                             \
    DEFINE_WINDOW(window_##X##_f64, LOAD_X, load_f64)                                                             \
    DEFINE_WINDOW(window_##X##_bf16, LOAD_X, load_bf16)                                                           \
    DEFINE_WINDOW(window_##X##_f16, LOAD_X, load_f16)

DEFINE_ROW(f32, load_f32)
DEFINE_ROW(f64, load_f64)
DEFINE_ROW(bf16, load_bf16)
DEFINE_ROW(f16, load_f16)

/* Stable in-place compaction of an (index, value) buffer: entries with keep[i] move to the front, in order; returns
 * how many were kept (the final cut of core selection, where nearly every entry is kept). */
#define DEFINE_COMPACT(NAME, INDEX_T)                                                                                \
    int64_t NAME(const uint8_t *keep, int64_t n, INDEX_T *index, float *value) {                                  \
        int64_t out = 0;                                                                                          \
        for (int64_t i = 0; i < n; i++) {                                                                         \
            index[out] = index[i];                                                                                \
            value[out] = value[i];                                                                                \
            out += keep[i] != 0;                                                                                  \
        }                                                                                                         \
        return out;                                                                                               \
    }

DEFINE_COMPACT(compact_i32, int32_t)
DEFINE_COMPACT(compact_i64, int64_t)
