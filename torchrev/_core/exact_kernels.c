/* Exact reversal's level-0 passes over a stream, one pass each: the reference is the eager
 * code in exact.py (Correction.between, Correction.apply_), which these reproduce bit for bit
 * (tests/test_exact.py). Built and loaded by native.py; see its docstring for the trade-off.
 *
 * Codes: a difference d = bits(x) - bits(x') (wrapping, as the integer type's subtraction)
 * whose magnitude is below half = 2^(w-1) is stored as its low w bits; any other as the
 * reserved code -half, and it escapes to the next level, which receives its position and d.
 * Below 8 bits, codes are packed 8/w to a byte in runs: the byte b holds, in field j (bits
 * j*w to j*w+w-1), the code of element j*run + b. Runs are walked in order, so escapes are
 * found in order. (Coding branch-free and searching the escapes in a second pass measured
 * slower: escapes are a few percent, so most tiles hold one.) */
#include <stdint.h>
#include <string.h>

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* One run's loop over elements lo + b, b in [0, count): R(i) gives bits(x') at element i,
 * STORE stores the code of element lo + b at c[b]. */
#define CODE_RUN(T, U, R, STORE)                                                               \
    for (int64_t b = 0; b < count; ++b) {                                                       \
        const int64_t i = lo + b;                                                               \
        const T d = (T)((U)x[i] - (U)(R(i)));                                                   \
        const int escaped = (d <= -half) | (d >= half);                                         \
        const T code = escaped ? (T)-half : d;                                                  \
        STORE;                                                                                  \
        if (escaped) {                                                                          \
            if (k < cap) {                                                                      \
                pos[k] = i;                                                                     \
                val[k] = d;                                                                     \
            }                                                                                   \
            ++k;                                                                                \
        }                                                                                       \
    }

/* NAME(x, <the rebuilt input's arguments>, n, run, width, codes, pos, val, cap): level 0 of
 * bits(x) - bits(x'), the codes, and the positions and differences of the escapes in order
 * (the first cap of them); returns how many escaped. */
#define ENCODER(NAME, T, U, R, ...)                                                            \
    int64_t NAME(const T *restrict x, __VA_ARGS__, int64_t n, int64_t run, int width,          \
                 void *restrict codes, int64_t *restrict pos, T *restrict val, int64_t cap) {  \
        const T half = (T)((T)1 << (width - 1));                                               \
        int64_t k = 0, lo = 0, count = n;                                                       \
        if (width == 16) {                                                                      \
            int16_t *c = (int16_t *)codes;                                                      \
            CODE_RUN(T, U, R, c[b] = (int16_t)code)                                             \
            return k;                                                                           \
        }                                                                                       \
        if (width == 8) {                                                                       \
            int8_t *c = (int8_t *)codes;                                                        \
            CODE_RUN(T, U, R, c[b] = (int8_t)code)                                              \
            return k;                                                                           \
        }                                                                                       \
        const U mask = (U)((1u << width) - 1u);                                                 \
        uint8_t *c = (uint8_t *)codes;                                                          \
        for (int64_t j = 0; j * run < n; ++j) {                                                 \
            const int shift = (int)j * width;                                                   \
            lo = j * run;                                                                       \
            count = MIN(n - lo, run);                                                           \
            if (j == 0) {                                                                       \
                CODE_RUN(T, U, R, c[b] = (uint8_t)((U)code & mask))                             \
            } else {                                                                            \
                CODE_RUN(T, U, R, c[b] |= (uint8_t)(((U)code & mask) << shift))                 \
            }                                                                                   \
        }                                                                                       \
        return k;                                                                               \
    }

/* x' given as bits. */
#define STORED(i) r[i]
ENCODER(encode_int16_t, int16_t, uint16_t, STORED, const int16_t *restrict r)
ENCODER(encode_int32_t, int32_t, uint32_t, STORED, const int32_t *restrict r)
ENCODER(encode_int64_t, int64_t, uint64_t, STORED, const int64_t *restrict r)

/* x' = y - h, computed while coding (a step whose inverse is that one subtraction), so that
 * x' is never written out: one IEEE subtraction, rounded as torch rounds it (no fast-math). */
static inline int32_t bits_of_float(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}
static inline int64_t bits_of_double(double f) {
    int64_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}
#define FLOAT_DIFFERENCE(i) bits_of_float(y[i] - h[i])
#define DOUBLE_DIFFERENCE(i) bits_of_double(y[i] - h[i])
ENCODER(encode_sub_float, int32_t, uint32_t, FLOAT_DIFFERENCE, const float *restrict y,
        const float *restrict h)
ENCODER(encode_sub_double, int64_t, uint64_t, DOUBLE_DIFFERENCE, const double *restrict y,
        const double *restrict h)

/* bits += the sign-extended codes packed below 8 bits (wrapping). */
#define ADDER(T, U)                                                                            \
    void add_codes_##T(T *restrict bits, const uint8_t *restrict packed, int64_t n,            \
                       int64_t run, int width) {                                               \
        for (int64_t j = 0; j * run < n; ++j) {                                                 \
            const int64_t lo = j * run, hi = MIN(n, lo + run);                                  \
            const int up = 8 - ((int)j + 1) * width, down = 8 - width;                          \
            for (int64_t i = lo; i < hi; ++i) {                                                 \
                const int8_t code = (int8_t)((int8_t)(uint8_t)(packed[i - lo] << up) >> down);  \
                bits[i] = (T)((U)bits[i] + (U)(T)code);                                         \
            }                                                                                   \
        }                                                                                       \
    }
ADDER(int16_t, uint16_t)
ADDER(int32_t, uint32_t)
ADDER(int64_t, uint64_t)

/* The positions of the reserved code among n codes packed below 8 bits, in order, in `room`
 * slots padded with 0; returns how many there are. */
int64_t sentinels(const uint8_t *packed, int64_t n, int64_t run, int width, int64_t *pos,
                  int64_t room) {
    const uint8_t mask = (uint8_t)((1u << width) - 1u), half = (uint8_t)(1u << (width - 1));
    int64_t k = 0;
    for (int64_t j = 0; j * run < n; ++j) {
        const int64_t lo = j * run, hi = MIN(n, lo + run);
        const int shift = (int)j * width;
        for (int64_t i = lo; i < hi; ++i) {
            if (((packed[i - lo] >> shift) & mask) == half) {
                if (k < room) pos[k] = i;
                ++k;
            }
        }
    }
    for (int64_t i = k; i < room; ++i) pos[i] = 0;
    return k;
}

/* out = y - h (out may be y): the subtraction the encoders above compute, for the backward to
 * rebuild the very x' the forward coded against (NaNs included, whose bits torch's own
 * kernels may set otherwise). */
void subtract_float(const float *y, const float *h, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = y[i] - h[i];
}
void subtract_double(const double *y, const double *h, double *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = y[i] - h[i];
}
