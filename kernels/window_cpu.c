/* Fused score + key-window compaction for core selection on the CPU: the rule of window_torch.window_torch (scores,
 * the key-window test, nonzero and gather) in one read of Δnew and Δold.
 *
 * For each element i: x = fp32(Δnew[i]), y = fp32(Δold[i]) — or, for the `terms` loops, which read two fine-tuned
 * checkpoints and the base they started from, x = fp32(new[i]) − fp32(base[i]) and y = fp32(old[i]) − fp32(base[i]),
 * each rounded once to fp32 as torch computes them; it is a candidate when x and y have opposite signs,
 * magnitudes below FLT_MIN counting as no sign; its key is the int32 bit pattern of |x − y| (0 for non-candidates).
 * Elements whose key lies in [lo, hi] are written, in index order, as (base + i, x · scale); the count is returned.
 * Those whose key is also below `sure` (the keys whose rank the final cut has to compare) are written a second time,
 * as (position in the first list, key), and *keyed counts them.
 * A NaN or inf in either input sets *nonfinite.
 *
 * Built by window_cpu.py through torch.utils.cpp_extension (as C99, no torch headers), strict IEEE arithmetic (no
 * -ffast-math, no contraction), so the keys and values are the bits torch computes. Each block of BLOCK elements is
 * scored in a vectorisable loop; then a bit mask per 32 elements marks the kept ones, and only those are visited
 * (count trailing zeros) and given their values.
 *
 * Every function that writes is handed the capacity of what it writes to and returns OVERFLOW, having written nothing
 * past it, where the input would need more.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define OVERFLOW (-1)
#define HIST_BINS 65536

/* One build serves every x86-64 processor: GCC compiles the loops for AVX-512, AVX2 and the baseline, and the loader
 * picks the widest the processor has (an ifunc), so a cached build never carries instructions its processor lacks. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORISED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTORISED
#endif

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

/* X and Y are expressions of the element index i (inputs x, y and, for the terms loops, b). index, value, pos and
 * key each have room for `capacity` entries. */
#define DEFINE_WINDOW(NAME, X, Y)                                                                                 \
    VECTORISED int64_t NAME(const void *x, const void *y, const void *b, int64_t n, int32_t base, int32_t lo,     \
                            int32_t hi, int32_t sure, float scale, int32_t *index, float *value, int32_t *pos,    \
                            int32_t *key, int64_t capacity, int64_t *keyed, int32_t *nonfinite) {                 \
        int64_t count = 0, with_key = 0;                                                                          \
        int32_t bad = 0;                                                                                          \
        int32_t k[BLOCK];                                                                                         \
        for (int64_t start = 0; start < n; start += BLOCK) {                                                      \
            int len = n - start < BLOCK ? (int)(n - start) : BLOCK;                                               \
            for (int j = 0; j < len; j++) {                                                                       \
                int64_t i = start + j;                                                                            \
                /* tests on the bit patterns (magnitudes order like the floats; a NaN's key may pass MAX_KEY,     \
                   outside every window, and the chunk is flagged): fewer instructions than float compares */     \
                float u = X, v = Y, d = fabsf(u - v);                                                             \
                int32_t bu, bv, bits;                                                                             \
                memcpy(&bu, &u, sizeof bu);                                                                       \
                memcpy(&bv, &v, sizeof bv);                                                                       \
                memcpy(&bits, &d, sizeof bits);                                                                   \
                int32_t au = bu & 0x7fffffff, av = bv & 0x7fffffff, small = au < av ? au : av;                    \
                bad |= (au > 0x7f7fffff) | (av > 0x7f7fffff); /* NaN or inf */                                    \
                k[j] = bits & -((small >= 0x00800000) & ((bu ^ bv) < 0)); /* both normal, signs opposite */       \
            }                                                                                                     \
            for (int g = 0; g < len; g += 32) {                                                                   \
                uint32_t kept = 0;                                                                                \
                int width = len - g < 32 ? len - g : 32;                                                          \
                for (int j = 0; j < width; j++)                                                                   \
                    kept |= (uint32_t)((k[g + j] >= lo) & (k[g + j] <= hi)) << j;                                 \
                if (__builtin_popcount(kept) > capacity - count) /* keyed ≤ count: one test covers all four */   \
                    return OVERFLOW;                                                                              \
                while (kept) {                                                                                    \
                    int j = g + __builtin_ctz(kept);                                                              \
                    int64_t i = start + j;                                                                        \
                    kept &= kept - 1;                                                                             \
                    index[count] = base + (int32_t)start + j;                                                     \
                    float kept_x = X; /* rounded to float first, as torch has it */                               \
                    value[count] = kept_x * scale; /* computed for kept elements only */                          \
                    pos[with_key] = (int32_t)count;                                                               \
                    key[with_key] = k[j];                                                                         \
                    with_key += k[j] < sure;                                                                      \
                    count++;                                                                                      \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        *keyed = with_key;                                                                                        \
        *nonfinite |= bad;                                                                                        \
        return count;                                                                                             \
    }

/* window_<Δnew dtype>_<Δold dtype> (b unused) */
#define DEFINE_ROW(X, LOAD_X)                                                                                     \
    DEFINE_WINDOW(window_##X##_f32, LOAD_X(x, i), load_f32(y, i))                                                 \
    DEFINE_WINDOW(window_##X##_f64, LOAD_X(x, i), load_f64(y, i))                                                 \
    DEFINE_WINDOW(window_##X##_bf16, LOAD_X(x, i), load_bf16(y, i))                                               \
    DEFINE_WINDOW(window_##X##_f16, LOAD_X(x, i), load_f16(y, i))

DEFINE_ROW(f32, load_f32)
DEFINE_ROW(f64, load_f64)
DEFINE_ROW(bf16, load_bf16)
DEFINE_ROW(f16, load_f16)

/* terms_<checkpoints' dtype>_<base dtype>: x and y are the new and old checkpoints, b the base */
#define DEFINE_TERMS(T, LOAD_T, B, LOAD_B)                                                                        \
    DEFINE_WINDOW(terms_##T##_##B, LOAD_T(x, i) - LOAD_B(b, i), LOAD_T(y, i) - LOAD_B(b, i))
#define DEFINE_TERMS_ROW(T, LOAD_T)                                                                               \
    DEFINE_TERMS(T, LOAD_T, f32, load_f32)                                                                        \
    DEFINE_TERMS(T, LOAD_T, bf16, load_bf16)                                                                      \
    DEFINE_TERMS(T, LOAD_T, f16, load_f16)

DEFINE_TERMS_ROW(f32, load_f32)
DEFINE_TERMS_ROW(bf16, load_bf16)
DEFINE_TERMS_ROW(f16, load_f16)

/* Append the pieces of a window call to a module's entries in one call, on the calling thread: indices (plus `shift`)
 * from index[n], values from value[n], keys from key[nkeyed] and, where pos is not NULL, the positions made relative to
 * the storage (plus the entries before their piece). INDEX_T is the storage's index type; the pieces' are int32.
 * index and value have room for `room` entries, key and pos for `keyed_room`: returns OVERFLOW before writing anything
 * where the pieces do not fit, else 0. */
#define DEFINE_APPEND(NAME, INDEX_T)                                                                              \
    int64_t NAME(int64_t pieces, const int32_t *const *src_index, const float *const *src_value,                  \
                 const int32_t *const *src_pos, const int32_t *const *src_key, const int64_t *count,              \
                 const int64_t *keyed, INDEX_T *index, float *value, INDEX_T *pos, int32_t *key, int64_t n,       \
                 int64_t nkeyed, int64_t shift, int64_t room, int64_t keyed_room) {                               \
        int64_t total = 0, total_keyed = 0;                                                                       \
        for (int64_t p = 0; p < pieces; p++) {                                                                    \
            if (count[p] < 0 || keyed[p] < 0 || keyed[p] > count[p])                                              \
                return OVERFLOW;                                                                                  \
            total += count[p];                                                                                    \
            total_keyed += keyed[p];                                                                              \
        }                                                                                                         \
        if (n < 0 || nkeyed < 0 || total > room - n || total_keyed > keyed_room - nkeyed)                         \
            return OVERFLOW;                                                                                      \
        for (int64_t p = 0; p < pieces; p++) {                                                                    \
            for (int64_t j = 0; j < count[p]; j++)                                                                \
                index[n + j] = (INDEX_T)(src_index[p][j] + shift);                                                \
            if (count[p]) /* an empty storage may have no address */                                              \
                memcpy(value + n, src_value[p], (size_t)count[p] * sizeof *value);                                \
            if (pos)                                                                                              \
                for (int64_t j = 0; j < keyed[p]; j++)                                                            \
                    pos[nkeyed + j] = (INDEX_T)(src_pos[p][j] + n);                                               \
            if (keyed[p])                                                                                         \
                memcpy(key + nkeyed, src_key[p], (size_t)keyed[p] * sizeof *key);                                 \
            n += count[p];                                                                                        \
            nkeyed += keyed[p];                                                                                   \
        }                                                                                                         \
        return 0;                                                                                                 \
    }

DEFINE_APPEND(append_i32, int32_t)
DEFINE_APPEND(append_i64, int64_t)

/* Stable in-place compaction of an (index, value) buffer: entries with keep[i] move to the front, in order; returns
 * how many were kept (the final cut of core selection, where nearly every entry is kept). Entry i is only ever moved to
 * a position ≤ i, so nothing is written past the first n entries; index and value have room for `room` entries:
 * OVERFLOW, nothing written, where n exceeds it. */
#define DEFINE_COMPACT(NAME, INDEX_T)                                                                             \
    int64_t NAME(const uint8_t *keep, int64_t n, INDEX_T *index, float *value, int64_t room) {                    \
        if (n > room)                                                                                             \
            return OVERFLOW;                                                                                      \
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

/* The k-th largest key over `parts` (1 ≤ k ≤ their total; keys ≥ 0) and, in *above, how many keys exceed it: the
 * exact threshold of the buffer's cut as two histogram passes over the keys' 16-bit halves, instead of a selection
 * that moves them. `hist` is room for `bins` counts: OVERFLOW, nothing written, unless bins ≥ HIST_BINS. */
int32_t kth_largest(const int32_t *const *parts, const int64_t *sizes, int64_t nparts, int64_t k, int64_t *hist,
                    int64_t bins, int64_t *above) {
    if (bins < HIST_BINS)
        return OVERFLOW;
    int64_t before = 0, b = HIST_BINS - 1;
    memset(hist, 0, HIST_BINS * sizeof *hist);
    for (int64_t p = 0; p < nparts; p++)
        for (int64_t i = 0; i < sizes[p]; i++)
            hist[(uint32_t)parts[p][i] >> 16]++;
    while (b > 0 && before + hist[b] < k)
        before += hist[b--];
    uint32_t high = (uint32_t)b;
    memset(hist, 0, HIST_BINS * sizeof *hist);
    for (int64_t p = 0; p < nparts; p++)
        for (int64_t i = 0; i < sizes[p]; i++) {
            uint32_t key = (uint32_t)parts[p][i];
            if (key >> 16 == high)
                hist[key & 0xffffu]++;
        }
    b = HIST_BINS - 1;
    while (b > 0 && before + hist[b] < k)
        before += hist[b--];
    *above = before;
    return (int32_t)(high << 16 | (uint32_t)b);
}
