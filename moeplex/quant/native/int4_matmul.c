/* moeplex's CPU kernel for int4 weight-only matmuls on x86-64 with AVX2 and FMA (and a faster path with AVX-512 VNNI).

   out[M, N] = x[M, K] @ W.T, where W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k / group.

   Layout (moeplex.quant.native_int4 packs it):
     packed  [N, K/2] bytes: per row, blocks of 32 input channels in 16 bytes; byte i of a block holds
             channel i in its low nibble and channel 16 + i in its high nibble.
     scales_zeros [N, K/group, 2] bf16 bits: (scale, zero) per row and group.
     x [M, K] and out [M, N]: float32 or bf16 bits, rows contiguous.

   How: each activation row enters as 16-bit fixed point per group (x = x16 * x_scale, x_scale = max |x|
   / 32767, an error far below bf16's rounding of the same activations). A weight block is widened
   once to 16-bit lanes (low nibbles = channels 0..15, high = 16..31: one zero-extension, one mask, one
   shift) and multiplied into up to four activation rows with integer multiply-adds that are exact in
   32 bits over a group. Per group, sum_k W x = scale * x_scale * sum_k q x16 + (zero - 8 scale) *
   sum_k x, accumulated in float vectors (one horizontal sum per output): seven vector instructions per 32 weights
   and row, no float conversion in the inner loop. Four weight rows run side by side at one activation row (two at
   two), so each activation block is loaded once for them. Blocks of four rows of W are split across OpenMP
   threads (the same libgomp that torch uses, by soname). Where the CPU has AVX512-BW, VL and VNNI and groups are
   a multiple of 64 channels, the AVX-512 path below runs instead. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "avx2_sum.h"
#include "bf16_bits.h"

#define BLOCK 32
#define ROWS_PER_PASS 4
#define INT16_LIMIT 32767.0f
#define WIDE_TARGET "avx512f,avx512bw,avx512vl,avx512vnni"
#define WIDE_STEP (2 * BLOCK)
#define WEIGHT_ROWS_PER_PASS 4
#define PREFETCH_BYTES 8192 /* how far ahead of each weight load both paths prefetch */
/* Into L2, not L1: on the Zen 4 EPYC VM a prefetch into L1 (_MM_HINT_T0) held the kernel to about 17 GB/s with two
   threads and 9 GB/s with one, as if every load still waited on memory; into L2 it streamed 22-29 GB/s and 17-19
   GB/s (the AVX2 path alike), 4-32 KiB ahead all within the runs' noise. */
#define PREFETCH_HINT _MM_HINT_T2

int moeplex_int4_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Per activation row and group: the 16-bit values, their scale and the plain sum of the group. */
typedef struct {
    int16_t *values;     /* [M, K] */
    float *scales;       /* [M, groups] */
    float *sums;         /* [M, groups] */
} FixedPointRows;

/* Where channel k of a group goes in the AVX-512 path's order: within each 64-channel chunk, channels 0..15,
   32..47, 16..31, 48..63, the order in which two widened 32-channel blocks hold them. */
static inline int64_t wide_slot(int64_t k) {
    int64_t chunk = k & ~(int64_t)(WIDE_STEP - 1), c = k & (WIDE_STEP - 1);
    int64_t block = c / BLOCK, half = (c % BLOCK) / (BLOCK / 2), j = c % (BLOCK / 2);
    return chunk + half * BLOCK + block * (BLOCK / 2) + j;
}

/* A NaN or infinity in a group makes its outputs NaN, as a float matmul's would be: its values are 0, its scale NaN. */
static inline int fixed_point_finite(float largest, float sum) { return isfinite(sum) && isfinite(largest); }

static inline double fixed_point_inverse(float largest, float sum) {
    return fixed_point_finite(largest, sum) && largest > 0.0f ? INT16_LIMIT / (double)largest : 0.0;
}

/* One group in channel order, 8 channels per instruction (AVX2): each value x * (32767 / largest) computed in double
   and rounded to nearest even (the conversion's default mode), the group's plain sum into sum_out. Returns the group's
   largest |x|. */
__attribute__((target("avx2,fma"))) static float narrow_group_to_fixed_point(const float *xg, int64_t group, int16_t *values,
                                                                            float *sum_out) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 largest = _mm256_setzero_ps(), sums = _mm256_setzero_ps();
    for (int64_t k = 0; k < group; k += 8) {
        __m256 v = _mm256_loadu_ps(xg + k);
        largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
        sums = _mm256_add_ps(sums, v);
    }
    float lanes[8], most = 0.0f;
    _mm256_storeu_ps(lanes, largest);
    for (int i = 0; i < 8; i++) most = fmaxf(most, lanes[i]);
    float sum = horizontal_sum(sums);
    *sum_out = sum;
    if (!fixed_point_finite(most, sum)) {
        memset(values, 0, sizeof(int16_t) * (size_t)group);
        return most;
    }
    __m256d inverse = _mm256_set1_pd(fixed_point_inverse(most, sum));
    for (int64_t k = 0; k < group; k += 8) {
        __m128i low = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(xg + k)), inverse));
        __m128i high = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(xg + k + 4)), inverse));
        _mm_storeu_si128((__m128i *)(values + k), _mm_packs_epi32(low, high));
    }
    return most;
}

/* One group in the AVX-512 path's order, 16 / 8 channels per instruction: each value x * (32767 / largest) computed in
   double and rounded to nearest even, as narrow_group_to_fixed_point's, the sum in another order. Returns the group's
   largest |x|. */
__attribute__((target(WIDE_TARGET))) static float wide_group_to_fixed_point(const float *xg, int64_t group, int16_t *values,
                                                                            float *sum_out) {
    __m512 largest = _mm512_setzero_ps(), sums = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k += 16) {
        __m512 v = _mm512_loadu_ps(xg + k);
        largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
        sums = _mm512_add_ps(sums, v);
    }
    float most = _mm512_reduce_max_ps(largest), sum = _mm512_reduce_add_ps(sums);
    *sum_out = sum;
    if (!fixed_point_finite(most, sum)) {
        memset(values, 0, sizeof(int16_t) * (size_t)group); /* the group's slots are the group's own range */
        return most;
    }
    __m512d inverse = _mm512_set1_pd(fixed_point_inverse(most, sum));
    for (int64_t k = 0; k < group; k += 8) { /* runs of 8 channels stay together in wide_slot's order */
        __m256i rounded = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xg + k)), inverse));
        _mm_storeu_si128((__m128i *)(values + wide_slot(k)), _mm256_cvtepi32_epi16(rounded));
    }
    return most;
}

/* Every row of x in 16-bit fixed point per group; interleaved: in the AVX-512 path's order (wide_slot), computed with AVX-512. */
static int to_fixed_point(const float *x, int64_t m, int64_t in_features, int64_t group, int interleaved, FixedPointRows *rows) {
    int64_t groups = in_features / group;
    rows->values = malloc(sizeof(int16_t) * (size_t)(m * in_features + 1));
    rows->scales = malloc(sizeof(float) * (size_t)(m * groups + 1));
    rows->sums = malloc(sizeof(float) * (size_t)(m * groups + 1));
    if (!rows->values || !rows->scales || !rows->sums) return -1;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + r * in_features + g * group;
            int16_t *values = rows->values + r * in_features + g * group;
            float sum;
            float largest = interleaved ? wide_group_to_fixed_point(xg, group, values, &sum)
                                        : narrow_group_to_fixed_point(xg, group, values, &sum);
            rows->scales[r * groups + g] = fixed_point_finite(largest, sum) ? largest / INT16_LIMIT : NAN;
            rows->sums[r * groups + g] = sum;
        }
    return 0;
}

static void free_fixed_point(FixedPointRows *rows) {
    free(rows->values);
    free(rows->scales);
    free(rows->sums);
}

/* `weights` consecutive weight rows against `rows` activation rows (weights * rows <= 4, constants after inlining).
   Each activation block is loaded once for all the weight rows, and the weight rows accumulate in independent
   registers; each weight load prefetches PREFETCH_BYTES ahead (without it, two threads streamed about half the
   bytes per second on the AVX2 EPYC VM). */
__attribute__((target("avx2,fma"), always_inline)) static inline void narrow_rows_times_activations(
    const uint8_t *weight_rows, const uint16_t *scales_zeros_rows, const int16_t *x16, const float *x_scales,
    const float *x_sums, int64_t in_features, int64_t group, int64_t groups, int weights, int rows, float *out, int64_t n) {
    const __m256i low_nibble = _mm256_set1_epi16(0x0F);
    __m256 totals[ROWS_PER_PASS];
    float zero_terms[ROWS_PER_PASS];
    for (int i = 0; i < weights * rows; i++) {
        totals[i] = _mm256_setzero_ps();
        zero_terms[i] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
        __m256i in_group[ROWS_PER_PASS];
        for (int i = 0; i < weights * rows; i++) in_group[i] = _mm256_setzero_si256();
        for (int64_t k = g * group; k < (g + 1) * group; k += BLOCK) {
#pragma GCC unroll 4
            for (int w = 0; w < weights; w++) {
                const uint8_t *packed = weight_rows + w * (in_features / 2) + k / 2;
                _mm_prefetch((const char *)packed + PREFETCH_BYTES, PREFETCH_HINT);
                __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)packed));
                __m256i low = _mm256_and_si256(bytes, low_nibble); /* channels k .. k + 15 */
                __m256i high = _mm256_srli_epi16(bytes, 4);       /* channels k + 16 .. k + 31 */
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    const int16_t *xr = x16 + r * in_features + k;
                    int i = w * rows + r;
                    in_group[i] = _mm256_add_epi32(in_group[i], _mm256_madd_epi16(low, _mm256_loadu_si256((const __m256i *)xr)));
                    in_group[i] = _mm256_add_epi32(in_group[i], _mm256_madd_epi16(high, _mm256_loadu_si256((const __m256i *)(xr + 16))));
                }
            }
        }
        /* Lane sums stay below 2^24 for groups of up to 128 (15 * 32767 * 4 per block), so the
           conversion to float is exact; no horizontal sum until the row ends. */
        for (int w = 0; w < weights; w++) {
            const uint16_t *scale_zero = scales_zeros_rows + w * groups * 2 + 2 * g;
            float scale = bf16_to_float(scale_zero[0]), zero = bf16_to_float(scale_zero[1]);
            for (int r = 0; r < rows; r++) {
                int i = w * rows + r;
                totals[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(in_group[i]), _mm256_set1_ps(scale * x_scales[r * groups + g]), totals[i]);
                zero_terms[i] += (zero - 8.0f * scale) * x_sums[r * groups + g];
            }
        }
    }
    for (int w = 0; w < weights; w++)
        for (int r = 0; r < rows; r++) out[r * n + w] = horizontal_sum(totals[w * rows + r]) + zero_terms[w * rows + r];
}

/* The passes over weight rows first..first+count-1 (count <= 4) and every activation row: 4, 2 or 1 weight rows
   at a time for 1, 2 or more activation rows at a time. PASS(WEIGHTS, ROWS, ROW, WEIGHT) runs one, so both paths
   split the work the same way. */
#define EACH_PASS(PASS)                                                                                         \
    for (int64_t r = 0; r < m;) {                                                                               \
        int64_t rows = m - r >= 4 ? 4 : m - r;                                                                  \
        if (rows == 1 && count == WEIGHT_ROWS_PER_PASS) PASS(4, 1, r, first);                                   \
        else if (rows == 2 && count == WEIGHT_ROWS_PER_PASS) {                                                  \
            PASS(2, 2, r, first);                                                                               \
            PASS(2, 2, r, first + 2);                                                                           \
        } else                                                                                                  \
            for (int64_t w = first; w < first + count; w++) switch (rows) {                                     \
                case 4: PASS(1, 4, r, w); break;                                                                \
                case 3: PASS(1, 3, r, w); break;                                                                \
                case 2: PASS(1, 2, r, w); break;                                                                \
                default: PASS(1, 1, r, w); break;                                                               \
                }                                                                                               \
        r += rows;                                                                                              \
    }

/* The arguments of one pass of either path (inside a function with the parameters of the block functions below). */
#define PASS_ARGUMENTS(WEIGHTS, ROWS, ROW, WEIGHT)                                                              \
    packed + (WEIGHT) * (in_features / 2), scales_zeros + (WEIGHT) * groups * 2, x->values + (ROW) * in_features, \
        x->scales + (ROW) * groups, x->sums + (ROW) * groups, in_features, group, groups, WEIGHTS, ROWS,        \
        out + (ROW) * n + (WEIGHT), n

__attribute__((target("avx2,fma"))) static void narrow_block_times_all_activations(
    const uint8_t *packed, const uint16_t *scales_zeros, const FixedPointRows *x, int64_t m, int64_t in_features,
    int64_t group, int64_t groups, int64_t first, int64_t count, float *out, int64_t n) {
#define NARROW_PASS(WEIGHTS, ROWS, ROW, WEIGHT) narrow_rows_times_activations(PASS_ARGUMENTS(WEIGHTS, ROWS, ROW, WEIGHT))
    EACH_PASS(NARROW_PASS)
#undef NARROW_PASS
}

/* The AVX-512 path (AVX512-BW, VL and VNNI; groups a multiple of 64 channels). Two packed blocks are widened
   at once to 32 16-bit lanes: low nibbles = channels 0..15 and 32..47 of a 64-channel chunk, high = 16..31 and
   48..63, the order `wide_slot` gives the activations. `vpdpwssd` multiplies and adds into 32-bit lanes
   in one instruction; low and high nibbles sum into separate registers, and W weight rows run side by side,
   so 2W independent chains hide its latency. Each weight load prefetches PREFETCH_BYTES ahead: the few short
   rows a pass reads side by side seem not to wake the hardware prefetcher (4-8 KiB measured best on the
   Xeon VM). Lane sums stay below 2^24 for groups of up to 128 (8 products of at most 15 * 32767 per lane),
   so the conversion to float is exact. */

/* Whether matmuls of this group size take the AVX-512 path here (when allowed): the one place that decides. */
int moeplex_int4_runs_avx512(int64_t group) {
    __builtin_cpu_init();
    return group % WIDE_STEP == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* For one weight row and one activation row, 16 groups per step: each group's scale times the activations'
   scale (into group_scales), and the sum over groups of (zero - 8 scale) * sum(x), returned. A (scale, zero)
   pair of bf16 is one 32-bit lane: shifted up, the scale's float; masked, the zero's. */
__attribute__((target(WIDE_TARGET))) static inline float wide_group_scales(const uint16_t *scales_zeros_row, const float *x_scales,
                                                                          const float *x_sums, int64_t groups, float *group_scales) {
    __m512 zero_terms = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 lanes = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512i pairs = _mm512_maskz_loadu_epi32(lanes, scales_zeros_row + 2 * g);
        __m512 scales = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        __m512 zeros = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000u)));
        _mm512_mask_storeu_ps(group_scales + g, lanes, _mm512_mul_ps(scales, _mm512_maskz_loadu_ps(lanes, x_scales + g)));
        __m512 offsets = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scales, zeros); /* zero - 8 scale */
        zero_terms = _mm512_fmadd_ps(offsets, _mm512_maskz_loadu_ps(lanes, x_sums + g), zero_terms);
    }
    return _mm512_reduce_add_ps(zero_terms);
}

/* `weights` consecutive weight rows against `rows` activation rows (weights * rows <= 4, constants after inlining). */
__attribute__((target(WIDE_TARGET), always_inline)) static inline void wide_rows_times_activations(
    const uint8_t *weight_rows, const uint16_t *scales_zeros_rows, const int16_t *x16, const float *x_scales,
    const float *x_sums, int64_t in_features, int64_t group, int64_t groups, int weights, int rows, float *out, int64_t n) {
    const __m512i low_nibble = _mm512_set1_epi16(0x0F);
    float group_scales[WEIGHT_ROWS_PER_PASS * groups + 1]; /* + 1: no empty array when K = 0 */
    __m512 totals[WEIGHT_ROWS_PER_PASS];
    float zero_terms[WEIGHT_ROWS_PER_PASS];
    for (int w = 0; w < weights; w++)
        for (int r = 0; r < rows; r++) {
            int i = w * rows + r;
            totals[i] = _mm512_setzero_ps();
            zero_terms[i] = wide_group_scales(scales_zeros_rows + w * groups * 2, x_scales + r * groups, x_sums + r * groups,
                                              groups, group_scales + i * groups);
        }
    for (int64_t g = 0; g < groups; g++) {
        __m512i low_sums[WEIGHT_ROWS_PER_PASS], high_sums[WEIGHT_ROWS_PER_PASS];
        for (int i = 0; i < weights * rows; i++) low_sums[i] = high_sums[i] = _mm512_setzero_si512();
        for (int64_t k = g * group; k < (g + 1) * group; k += WIDE_STEP) {
#pragma GCC unroll 4
            for (int w = 0; w < weights; w++) {
                const uint8_t *packed = weight_rows + w * (in_features / 2) + k / 2;
                _mm_prefetch((const char *)packed + PREFETCH_BYTES, PREFETCH_HINT);
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)packed));
                __m512i low = _mm512_and_si512(bytes, low_nibble);
                __m512i high = _mm512_srli_epi16(bytes, 4);
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    const int16_t *xr = x16 + r * in_features + k;
                    int i = w * rows + r;
                    low_sums[i] = _mm512_dpwssd_epi32(low_sums[i], low, _mm512_loadu_si512(xr));
                    high_sums[i] = _mm512_dpwssd_epi32(high_sums[i], high, _mm512_loadu_si512(xr + BLOCK));
                }
            }
        }
        for (int i = 0; i < weights * rows; i++)
            totals[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(low_sums[i], high_sums[i])),
                                        _mm512_set1_ps(group_scales[i * groups + g]), totals[i]);
    }
    for (int w = 0; w < weights; w++)
        for (int r = 0; r < rows; r++) out[r * n + w] = _mm512_reduce_add_ps(totals[w * rows + r]) + zero_terms[w * rows + r];
}

__attribute__((target(WIDE_TARGET))) static void wide_block_times_all_activations(
    const uint8_t *packed, const uint16_t *scales_zeros, const FixedPointRows *x, int64_t m, int64_t in_features,
    int64_t group, int64_t groups, int64_t first, int64_t count, float *out, int64_t n) {
#define WIDE_PASS(WEIGHTS, ROWS, ROW, WEIGHT) wide_rows_times_activations(PASS_ARGUMENTS(WEIGHTS, ROWS, ROW, WEIGHT))
    EACH_PASS(WIDE_PASS)
#undef WIDE_PASS
}

/* out = x @ W.T with x and out float32 (see the top of this file). Returns 0, or -1 when the arguments do not describe
   this layout (or memory ran out). */
static int matmul_float(const float *x, int64_t m, int64_t in_features, const uint8_t *packed, const uint16_t *scales_zeros,
                        int64_t n, int64_t group, float *out, int threads, int allow_avx512) {
    if (m < 0 || n < 0 || group < BLOCK || group % BLOCK || in_features % group) return -1;
    int64_t groups = in_features / group;
    int wide = allow_avx512 && moeplex_int4_runs_avx512(group);
    FixedPointRows rows;
    if (to_fixed_point(x, m, in_features, group, wide, &rows) != 0) {
        free_fixed_point(&rows);
        return -1;
    }
    int parallel = threads > 1 && n * in_features * (m < ROWS_PER_PASS ? m : ROWS_PER_PASS) >= (1 << 17);
    int64_t blocks = (n + WEIGHT_ROWS_PER_PASS - 1) / WEIGHT_ROWS_PER_PASS;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * WEIGHT_ROWS_PER_PASS, count = n - first < WEIGHT_ROWS_PER_PASS ? n - first : WEIGHT_ROWS_PER_PASS;
        if (wide)
            wide_block_times_all_activations(packed, scales_zeros, &rows, m, in_features, group, groups, first, count, out, n);
        else
            narrow_block_times_all_activations(packed, scales_zeros, &rows, m, in_features, group, groups, first, count, out, n);
    }
    free_fixed_point(&rows);
    return 0;
}

/* The entry point: x [M, K] and out [M, N] each float32, or bf16 bits where x_bf16 / out_bf16 (widened exactly on the
   way in, rounded to nearest even on the way out, as torch's casts do), so callers in bf16 need no casts of their own.
   Returns 0, or -1 when the arguments do not describe this layout (or memory ran out). allow_avx512 = 0 keeps the
   AVX2 path; otherwise the AVX-512 one runs where the CPU has it and the group is a multiple of 64 channels. */
int moeplex_int4_matmul(const void *x, int x_bf16, int64_t m, int64_t in_features, const uint8_t *packed,
                        const uint16_t *scales_zeros, int64_t n, int64_t group, void *out, int out_bf16, int threads,
                        int allow_avx512) {
    if (m < 0 || n < 0 || in_features < 0) return -1;
    float *x_float = x_bf16 ? malloc(sizeof(float) * (size_t)(m * in_features + 1)) : (float *)x;
    float *out_float = out_bf16 ? malloc(sizeof(float) * (size_t)(m * n + 1)) : (float *)out;
    int status = -1;
    if (x_float && out_float) {
        if (x_bf16)
            for (int64_t i = 0; i < m * in_features; i++) x_float[i] = bf16_to_float(((const uint16_t *)x)[i]);
        status = matmul_float(x_float, m, in_features, packed, scales_zeros, n, group, out_float, threads, allow_avx512);
        if (status == 0 && out_bf16)
            for (int64_t i = 0; i < m * n; i++) ((uint16_t *)out)[i] = float_to_bf16(out_float[i]);
    }
    if (x_bf16) free(x_float);
    if (out_bf16) free(out_float);
    return status;
}

/* v rounded to bf16 and widened back, 16 lanes (nearest even; NaN stays NaN, as float_to_bf16). */
__attribute__((target(WIDE_TARGET))) static inline __m512 wide_round_to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    rounded = _mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), nan, v);
}

/* exp(v), 16 lanes: 2^n * p(r) with v = n ln2 + r, |r| <= ln2 / 2, p Cephes' degree-7 polynomial (about 1 float ulp). */
__attribute__((target(WIDE_TARGET))) static inline __m512 wide_exp(__m512 v) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* 2^n exactly, to inf or 0 beyond float's range */
}

/* product[i] = bf16(bf16(silu(bf16(gates[i]))) * bf16(ups[i])) for the first multiple of 16 of count; returns how many. */
__attribute__((target(WIDE_TARGET))) static int64_t wide_silu_times_up(const float *gates, const float *ups, int64_t count,
                                                                        float *product) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m512 gate = wide_round_to_bf16(_mm512_loadu_ps(gates + i));
        __m512 silu = wide_round_to_bf16(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), wide_exp(_mm512_sub_ps(_mm512_setzero_ps(), gate)))));
        _mm512_storeu_ps(product + i, wide_round_to_bf16(_mm512_mul_ps(silu, wide_round_to_bf16(_mm512_loadu_ps(ups + i)))));
    }
    return i;
}

/* One SwiGLU expert on bf16 rows: out = down(silu(gate) * up) with [gate; up] = gate_up(x), x [M, H] and out [M, H]
   bf16 bits, gate_up [2I, H] and down [H, I] in this layout. Rounds to bf16 where torch's composition of the same
   kernels does (the gate_up output, silu, the product, the down output; silu as x / (1 + exp(-x)) in float), so a
   step takes one call instead of seven torch calls. Returns 0, or -1 as moeplex_int4_matmul does. */
int moeplex_int4_swiglu(const uint16_t *x, int64_t m, int64_t hidden, int64_t inter, const uint8_t *gate_up,
                        const uint16_t *gate_up_scales, const uint8_t *down, const uint16_t *down_scales, int64_t group,
                        uint16_t *out, int threads, int allow_avx512) {
    if (m < 0 || hidden < 0 || inter < 0) return -1;
    float *x_float = malloc(sizeof(float) * (size_t)(m * hidden + 1));
    float *gate_up_out = malloc(sizeof(float) * (size_t)(m * 2 * inter + 1));
    float *product = malloc(sizeof(float) * (size_t)(m * inter + 1));
    float *out_float = malloc(sizeof(float) * (size_t)(m * hidden + 1));
    int status = -1;
    if (x_float && gate_up_out && product && out_float) {
        for (int64_t i = 0; i < m * hidden; i++) x_float[i] = bf16_to_float(x[i]);
        status = matmul_float(x_float, m, hidden, gate_up, gate_up_scales, 2 * inter, group, gate_up_out, threads, allow_avx512);
        if (status == 0) {
            int wide = allow_avx512 && moeplex_int4_runs_avx512(group);
            for (int64_t r = 0; r < m; r++) {
                const float *gates = gate_up_out + r * 2 * inter, *ups = gates + inter;
                int64_t i = wide ? wide_silu_times_up(gates, ups, inter, product + r * inter) : 0;
                for (; i < inter; i++) {
                    float gate = bf16_to_float(float_to_bf16(gates[i]));
                    float silu = bf16_to_float(float_to_bf16(gate / (1.0f + expf(-gate))));
                    product[r * inter + i] = bf16_to_float(float_to_bf16(silu * bf16_to_float(float_to_bf16(ups[i]))));
                }
            }
            status = matmul_float(product, m, inter, down, down_scales, hidden, group, out_float, threads, allow_avx512);
        }
        if (status == 0)
            for (int64_t i = 0; i < m * hidden; i++) out[i] = float_to_bf16(out_float[i]);
    }
    free(x_float);
    free(gate_up_out);
    free(product);
    free(out_float);
    return status;
}

/* One token through `count` int4 SwiGLU experts (each as moeplex_int4_swiglu, x [1, H]), their outputs weighted and
   summed into out [1, H]: each output times its weight rounded to bf16, then added to the sum in turn with a bf16
   rounding, as torch's mul_ and add_ on bf16 tensors do (QuantizedExperts.one_token), so a decode step runs a
   layer's chosen experts in one call. Returns 0, or -1 as moeplex_int4_swiglu does (or without experts). */
int moeplex_int4_swiglu_mixture(const uint16_t *x, int64_t hidden, int64_t inter, int64_t count, const uint8_t *const *gate_ups,
                                const uint16_t *const *gate_up_scales, const uint8_t *const *downs,
                                const uint16_t *const *down_scales, const float *weights, int64_t group, uint16_t *out,
                                int threads, int allow_avx512) {
    if (count < 1 || hidden < 0) return -1;
    uint16_t *y = malloc(sizeof(uint16_t) * (size_t)(hidden + 1));
    int status = y ? 0 : -1;
    for (int64_t e = 0; e < count && status == 0; e++) {
        status = moeplex_int4_swiglu(x, 1, hidden, inter, gate_ups[e], gate_up_scales[e], downs[e], down_scales[e], group, y,
                                     threads, allow_avx512);
        for (int64_t i = 0; status == 0 && i < hidden; i++) {
            uint16_t weighted = float_to_bf16(bf16_to_float(y[i]) * weights[e]);
            out[i] = e == 0 ? weighted : float_to_bf16(bf16_to_float(out[i]) + bf16_to_float(weighted));
        }
    }
    free(y);
    return status;
}
