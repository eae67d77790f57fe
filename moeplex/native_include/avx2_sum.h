/* The sum of a float vector's 8 lanes with AVX2, shared by moeplex's C kernels that accumulate in __m256. */
#ifndef MOEPLEX_AVX2_SUM_H
#define MOEPLEX_AVX2_SUM_H

#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline float horizontal_sum(__m256 v) {
    __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    pair = _mm_add_ss(pair, _mm_movehdup_ps(pair));
    return _mm_cvtss_f32(pair);
}

#endif
