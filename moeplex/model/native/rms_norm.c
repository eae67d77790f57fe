/* moeplex's CPU RMSNorm for the few bf16 rows of a decode step, in one call instead of torch's eight.

   out[r, k] = bf16(weight[r or 0, k] * bf16(x[r, k] * (1 / sqrt(mean_k x[r, k]^2 + eps))))

   x and out [rows, hidden] bf16 bits, rows contiguous; weight [hidden] (weight_stride 0) or one row per x row
   (weight_stride = hidden). The order of operations and roundings is transformers' (and moeplex.model.ops.rms_norm's):
   the variance in float32, the normalized row rounded to bf16, then scaled by the weight in float32 and rounded
   again. Only the order of the sum of squares differs from torch's (16 running partial sums), which can move the
   variance by a float32 rounding. Plain C, no intrinsics: the compiler vectorizes what it can. */

#include <math.h>
#include <stdint.h>
#include "bf16_bits.h"

#define PARTIAL_SUMS 16

int moeplex_rms_norm_supported(void) { return 1; }

void moeplex_rms_norm(const uint16_t *x, const uint16_t *weight, int64_t weight_stride, int64_t rows, int64_t hidden,
                      float eps, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * hidden, *scale = weight + r * weight_stride;
        float partial[PARTIAL_SUMS] = {0};
        int64_t k = 0;
        for (; k + PARTIAL_SUMS <= hidden; k += PARTIAL_SUMS)
            for (int j = 0; j < PARTIAL_SUMS; j++) {
                float v = bf16_to_float(row[k + j]);
                partial[j] += v * v;
            }
        for (int j = 0; k < hidden; k++, j++) {
            float v = bf16_to_float(row[k]);
            partial[j] += v * v;
        }
        float squares = 0.0f;
        for (int j = 0; j < PARTIAL_SUMS; j++) squares += partial[j];
        float inverse_rms = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (k = 0; k < hidden; k++) {
            float normalized = bf16_to_float(float_to_bf16(bf16_to_float(row[k]) * inverse_rms));
            out[r * hidden + k] = float_to_bf16(bf16_to_float(scale[k]) * normalized);
        }
    }
}
