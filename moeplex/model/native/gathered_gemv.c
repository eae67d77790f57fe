/* moeplex's CPU kernel for small bf16 matmuls where each row has its own matrix, on x86-64 with AVX512-BF16.

   y[r, :] = W[index[r]] @ x[r, :] for r < rows, where
     x      [rows, K] bf16 bits, rows contiguous; K a multiple of 32,
     W      [N, out, K] bf16 bits, contiguous (a stack of matrices; N = 1 for a plain weight),
     index  [rows] int64, each in 0..N-1,
     y      [rows, out], float32 or bf16 bits (rounded to nearest even).

   Why: a decode step multiplies a few rows by many small matrices (one per variant for the backbone, one
   per token and choice for the experts). oneDNN pays a fixed cost per call, and the batched forms
   that make one call of them copy or pad; here each row reads its own matrix in place.

   How: consecutive rows with the same matrix run together, 4, 2 or 1 at a time. 16 float accumulators
   (16 outputs of 1 row, 8 of 2 or 4 of 4) take one `vdpbf16ps` per 32 inputs (each lane sums two
   products in float32), so each weight load feeds every row of the group; a transposing add tree turns
   the 16 accumulators into their 16 sums at once. Output blocks are split across OpenMP threads
   (torch's libgomp, by soname) when there is enough work. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "bf16_bits.h"

#define TARGET "avx512f,avx512bw,avx512vl,avx512bf16"
#define OUTPUTS_PER_BLOCK 16
#define INPUTS_PER_STEP 32
#define PARALLEL_MIN_WEIGHTS (1 << 18) /* weights per row run below which one thread does the run */
/* Each weight load prefetches this far ahead in its row, into L2: on the Zen 4 EPYC VM, 16 experts' [4096, 1024] and
   [1024, 2048] matrices at one row streamed 21-31 GB/s without it and 25-34 GB/s with it (two threads, five runs each);
   the int4 kernel's prefetch (native/int4_matmul.c) says why L2. */
#define PREFETCH_BYTES 8192

int moeplex_gathered_gemv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* Lane i of the result: the sum of the 16 lanes of v[i]. */
__attribute__((target(TARGET))) static inline __m512 transpose_sum(const __m512 *v) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: v[2i] partials at 0 and 2, v[2i+1] at 1 and 3 */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: one partial of each of four vectors */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++) /* 128-bit lanes 0-1: partials of quads[2i]; 2-3: of quads[2i+1] */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88), _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

__attribute__((target(TARGET))) static inline __m512 dot_row(const uint16_t *w, const uint16_t *x, int64_t k) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += INPUTS_PER_STEP)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    return acc;
}

/* The outputs past the last whole block, one at a time. */
__attribute__((target(TARGET))) static void output_tail(const uint16_t *x, const uint16_t *w, void *y, int64_t count,
                                                       int64_t first, int64_t out, int64_t k, int bf16_out) {
    for (int64_t r = 0; r < count; r++)
        for (int64_t o = first; o < out; o++) {
            float sum = _mm512_reduce_add_ps(dot_row(w + o * k, x + r * k, k));
            if (bf16_out) ((uint16_t *)y)[r * out + o] = float_to_bf16(sum);
            else ((float *)y)[r * out + o] = sum;
        }
}

/* Outputs first..first+16/m-1 of m rows (m = 1, 2 or 4) that share the matrix w [out, k]: 16 accumulators,
   acc[r * 16/m + j] for row r and output first + j, so each weight load feeds m rows. */
__attribute__((target(TARGET), always_inline)) static inline void output_block(const uint16_t *x, const uint16_t *w, void *y,
                                                                             int m, int64_t first, int64_t out, int64_t k,
                                                                             int bf16_out) {
    const int per_row = OUTPUTS_PER_BLOCK / m;
    __m512 acc[OUTPUTS_PER_BLOCK];
    for (int j = 0; j < OUTPUTS_PER_BLOCK; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += INPUTS_PER_STEP) {
        __m512bh inputs[4];
#pragma GCC unroll 4
        for (int r = 0; r < m; r++) inputs[r] = (__m512bh)_mm512_loadu_si512(x + r * k + i);
#pragma GCC unroll 16
        for (int j = 0; j < per_row; j++) {
            _mm_prefetch((const char *)(w + (first + j) * k + i) + PREFETCH_BYTES, _MM_HINT_T2);
            __m512bh weights = (__m512bh)_mm512_loadu_si512(w + (first + j) * k + i);
#pragma GCC unroll 4
            for (int r = 0; r < m; r++) acc[r * per_row + j] = _mm512_dpbf16_ps(acc[r * per_row + j], weights, inputs[r]);
        }
    }
    __m512 sums = transpose_sum(acc);
    __mmask16 lanes = (__mmask16)((1u << per_row) - 1);
    for (int r = 0; r < m; r++) {
        __m512 row_sums = _mm512_maskz_compress_ps((__mmask16)(lanes << (r * per_row)), sums);
        if (bf16_out)
            _mm256_mask_storeu_epi16((uint16_t *)y + r * out + first, lanes, (__m256i)_mm512_cvtneps_pbh(row_sums));
        else
            _mm512_mask_storeu_ps((float *)y + r * out + first, lanes, row_sums);
    }
}

/* Every whole output block of `count` rows sharing w, in groups of 4, then 2, then 1 row. */
__attribute__((target(TARGET))) static void output_blocks(const uint16_t *x, const uint16_t *w, void *y, size_t y_item,
                                                         int64_t count, int64_t out, int64_t k, int bf16_out, int threads) {
    int parallel = threads > 1 && count * out * k >= PARALLEL_MIN_WEIGHTS;
    for (int64_t r = 0; r < count;) {
        int m = count - r >= 4 ? 4 : count - r >= 2 ? 2 : 1;
        int64_t per_row = OUTPUTS_PER_BLOCK / m, blocks = out / per_row;
        const uint16_t *rows_x = x + r * k;
        void *rows_y = (char *)y + (size_t)(r * out) * y_item;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (m == 4) output_block(rows_x, w, rows_y, 4, b * per_row, out, k, bf16_out);
            else if (m == 2) output_block(rows_x, w, rows_y, 2, b * per_row, out, k, bf16_out);
            else output_block(rows_x, w, rows_y, 1, b * per_row, out, k, bf16_out);
        }
        output_tail(rows_x, w, rows_y, m, blocks * per_row, out, k, bf16_out);
        r += m;
    }
}

/* Returns 0; 1 when k is not a multiple of 32, 2 when an index is not in 0..matrices-1 (nothing written). */
__attribute__((target(TARGET))) int moeplex_gathered_gemv(const uint16_t *x, const uint16_t *w, int64_t matrices, const int64_t *index,
                                                         void *y, int64_t rows, int64_t out, int64_t k, int bf16_out, int threads) {
    if (k % INPUTS_PER_STEP) return 1;
    for (int64_t r = 0; r < rows; r++)
        if (index[r] < 0 || index[r] >= matrices) return 2;
    size_t y_item = bf16_out ? sizeof(uint16_t) : sizeof(float);
    for (int64_t r = 0; r < rows;) {
        int64_t count = 1;
        while (r + count < rows && index[r + count] == index[r]) count++;
        output_blocks(x + r * k, w + index[r] * out * k, (char *)y + (size_t)(r * out) * y_item, y_item, count, out, k,
                      bf16_out, threads);
        r += count;
    }
    return 0;
}
