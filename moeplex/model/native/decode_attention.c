/* moeplex's CPU attention for one query token of one sequence (a decode step), in one call from rotation to output.

   moeplex_rotate_write_attend rotates the token's q and k (rotary embedding), writes k and v into the sequence's
   cache and then computes, over the cache's keys and values,

   out[h, :] = sum_j p[h, j] v[h / group, j, :], p[h, :] = softmax_j(scale * q[h, :] . k[h / group, j, :])

   q [heads, D] and out [heads, D] bf16 bits, rows contiguous; keys and values [kv_heads, L, D] bf16 bits with
   rows of D contiguous and kv_head_stride elements from one kv head to the next (a layer of the KV cache,
   whose capacity exceeds L). group = heads / kv_heads query heads share a kv head (grouped-query attention).
   Every key is attended to (no mask). Computed in float32 from the exact widened bf16 values: the scores,
   their maximum, exp(score - max) divided by their sum, the sum of values weighted by those, rounded once to bf16.
   D a multiple of 8.

   Why: at batch 1 torch's SDPA (flash attention for the CPU) cost 65-76 us per call for 16 heads over 48 keys on
   the 2-core Zen 4 EPYC VM, most of it fixed cost, and the rotation and cache write ten more torch calls.
   How: one thread, AVX2 and FMA; eight channels of a dot product or of the weighted sum per instruction, each key
   and value row widened once for the query heads that share it. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "avx2_sum.h"
#include "bf16_bits.h"

#define TARGET "avx2,fma"
#define LANES 8

int moeplex_decode_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 8 bf16 values widened (exactly) to float. */
__attribute__((target(TARGET))) static inline __m256 widen(const uint16_t *bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)bits)), 16));
}

/* The `group` query heads of one kv head: queries [group, D] float, k and v [L, D] bf16 bits -> out [group, D]
   bf16 bits. scores [group, L] is scratch. Each key and value row is widened once for all the group's heads. */
__attribute__((target(TARGET))) static void attend_kv_head(const float *queries, const uint16_t *k, const uint16_t *v,
                                                          int64_t group, int64_t length, int64_t head_dim, float scale,
                                                          float *scores, float *sums, uint16_t *out) {
    for (int64_t j = 0; j < length; j++) {
        for (int64_t h = 0; h < group; h++) {
            __m256 dot = _mm256_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += LANES)
                dot = _mm256_fmadd_ps(_mm256_loadu_ps(queries + h * head_dim + d), widen(k + j * head_dim + d), dot);
            scores[h * length + j] = horizontal_sum(dot) * scale;
        }
    }
    for (int64_t h = 0; h < group; h++) {
        float *row = scores + h * length, largest = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < length; j++) largest = fmaxf(largest, row[j]);
        for (int64_t j = 0; j < length; j++) {
            row[j] = expf(row[j] - largest);
            total += row[j];
        }
        for (int64_t j = 0; j < length; j++) row[j] /= total;
    }
    for (int64_t i = 0; i < group * head_dim; i++) sums[i] = 0.0f;
    for (int64_t j = 0; j < length; j++)
        for (int64_t d = 0; d < head_dim; d += LANES) {
            __m256 value = widen(v + j * head_dim + d);
            for (int64_t h = 0; h < group; h++) {
                float *sum = sums + h * head_dim + d;
                _mm256_storeu_ps(sum, _mm256_fmadd_ps(_mm256_set1_ps(scores[h * length + j]), value, _mm256_loadu_ps(sum)));
            }
        }
    for (int64_t i = 0; i < group * head_dim; i++) out[i] = float_to_bf16(sums[i]);
}

/* The attention above over keys and values [kv_heads, length, D] into out. Returns 0; -1 when the arguments do not
   describe this layout or memory ran out (nothing written). */
static int decode_attention(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t heads,
                             int64_t kv_heads, int64_t length, int64_t head_dim, int64_t kv_head_stride, float scale,
                             uint16_t *out) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || length < 1 || head_dim < LANES || head_dim % LANES ||
        kv_head_stride < length * head_dim)
        return -1;
    int64_t group = heads / kv_heads;
    float *queries = malloc(sizeof(float) * (size_t)(heads * head_dim));
    float *scores = malloc(sizeof(float) * (size_t)(group * length));
    float *sums = malloc(sizeof(float) * (size_t)(group * head_dim));
    int status = queries && scores && sums ? 0 : -1;
    if (status == 0) {
        for (int64_t i = 0; i < heads * head_dim; i++) queries[i] = bf16_to_float(q[i]);
        for (int64_t kv = 0; kv < kv_heads; kv++)
            attend_kv_head(queries + kv * group * head_dim, keys + kv * kv_head_stride, values + kv * kv_head_stride, group,
                           length, head_dim, scale, scores, sums, out + kv * group * head_dim);
    }
    free(queries);
    free(scores);
    free(sums);
    return status;
}

/* v rounded to bf16 (nearest even; a NaN stays a NaN, quiet, as float_to_bf16 makes it), 8 lanes, as floats. */
__attribute__((target(TARGET))) static inline __m256 round_to_bf16(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    rounded = _mm256_and_si256(rounded, _mm256_set1_epi32((int)0xffff0000u));
    __m256 quiet_nan = _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), quiet_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* 8 floats that are bf16 values (round_to_bf16's) stored as bf16 bits. */
__attribute__((target(TARGET))) static inline void store_bf16(uint16_t *out, __m256 v) {
    __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    _mm_storeu_si128((__m128i *)out, _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
}

/* x [D] rotated by cos and signed sin [D] (rotate-half, as moeplex.model.rope.apply_rotary: x * cos + roll(x, D/2) *
   signed_sin), each product and the sum rounded to bf16 as torch's bf16 ops do, so the result is the same bits.
   8 channels at a time where D/2 is a multiple of 8, else one at a time. */
__attribute__((target(TARGET))) static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *signed_sin,
                                                  int64_t head_dim, uint16_t *out) {
    int64_t half = head_dim / 2, d = 0;
    if (half % LANES == 0)
        for (; d < head_dim; d += LANES) {
            __m256 direct = round_to_bf16(_mm256_mul_ps(widen(x + d), widen(cos + d)));
            __m256 rolled = round_to_bf16(_mm256_mul_ps(widen(x + (d + half) % head_dim), widen(signed_sin + d)));
            store_bf16(out + d, round_to_bf16(_mm256_add_ps(direct, rolled)));
        }
    for (; d < head_dim; d++) {
        float direct = bf16_to_float(float_to_bf16(bf16_to_float(x[d]) * bf16_to_float(cos[d])));
        float rolled = bf16_to_float(float_to_bf16(bf16_to_float(x[(d + half) % head_dim]) * bf16_to_float(signed_sin[d])));
        out[d] = float_to_bf16(direct + rolled);
    }
}

/* A decode token's whole attention after its projections: q [heads, D], k and v [kv_heads, D] (each contiguous) are
   rotated by cos / signed sin [D] (q and k), k and v written at `position` of the layer's cache (cache_keys and
   cache_values [kv_heads, capacity, D], kv_head_stride = capacity * D), then q attends over positions 0..position
   (decode_attention). Returns 0; -1 when the arguments do not describe this layout (nothing written) or memory ran
   out (out not written, the cache perhaps). */
int moeplex_rotate_write_attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                                const uint16_t *signed_sin, uint16_t *cache_keys, uint16_t *cache_values, int64_t kv_head_stride,
                                int64_t position, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, uint16_t *out) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || position < 0 || head_dim < LANES || head_dim % LANES ||
        kv_head_stride < (position + 1) * head_dim)
        return -1;
    uint16_t *rotated = malloc(sizeof(uint16_t) * (size_t)(heads * head_dim));
    if (!rotated) return -1;
    for (int64_t h = 0; h < heads; h++) rotate(q + h * head_dim, cos, signed_sin, head_dim, rotated + h * head_dim);
    for (int64_t kv = 0; kv < kv_heads; kv++) {
        int64_t slot = kv * kv_head_stride + position * head_dim;
        rotate(k + kv * head_dim, cos, signed_sin, head_dim, cache_keys + slot);
        memcpy(cache_values + slot, v + kv * head_dim, sizeof(uint16_t) * (size_t)head_dim);
    }
    int status = decode_attention(rotated, cache_keys, cache_values, heads, kv_heads, position + 1, head_dim,
                                          kv_head_stride, scale, out);
    free(rotated);
    return status;
}
