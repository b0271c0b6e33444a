// AVX-512 building blocks of the kernels: bf16 loads and stores, the fp32 exponential, and for the window
// attention (forward: window_attention_cpu.cpp, backward: window_attention_backward_cpu.cpp) products of bf16
// pairs with fp32 accumulation by the AVX512-BF16 dot-product instruction and the packing of rows of bf16
// into the products' layouts.
//
// A product takes R rows of its left operand as bf16 pairs along the reduction axis (uint32 words, row stride
// in words) and its right operand packed with each word holding a pair along the reduction axis for one
// output column, 16 columns per vector. Rows of d values (keys for q k^T) become columns by pack_columns;
// rows that are themselves the reduction axis (values for weights @ v) become pairs of rows by
// pack_row_pairs.
#pragma once

#include "kernels.h"

#ifdef MMSWIN_X86

#include <immintrin.h>

#include <cstdint>

namespace mmswin {
namespace simd {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEps = 1e-12f;  // F.normalize's, as in the official V2

// 2^t in fp32: t = n + f with |f| <= 1/2, 2^f = exp(f ln2) by its Taylor polynomial to degree 6 (relative
// error below 2e-7), times 2^n by scalef. t is clamped at -200, where 2^t is 0 in fp32 (also for -inf).
MMSWIN_AVX512_BF16 inline __m512 exp2_ps(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-200.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

MMSWIN_AVX512_BF16 inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// The first `left` of 16 lanes (all of them from 16 on).
MMSWIN_AVX512_BF16 inline __mmask16 first_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

MMSWIN_AVX512_BF16 inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

MMSWIN_AVX512_BF16 inline void store_bf16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// Sum of squares of d bf16 values, in fp32.
MMSWIN_AVX512_BF16 inline float squared_length(const uint16_t* x, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 32) {
    const __mmask32 m = d - c >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (d - c)) - 1);
    const __m512i v = _mm512_maskz_loadu_epi16(m, x + c);
    acc = dot_pairs(acc, v, v);
  }
  return _mm512_reduce_add_ps(acc);
}

// The register block of every product: acc[r][v] = sum over pairs p of a[r, p] . b[p, v0 + v] for R rows of
// a (bf16 pairs, row stride a_stride) and V vectors of 16 columns of b (bf16 pairs, row stride b_stride),
// in fp32.
template <int R, int V>
MMSWIN_AVX512_BF16 inline void dot_block(const uint32_t* a, int64_t a_stride, const uint32_t* b,
                                         int64_t b_stride, int64_t pairs, int64_t v0, __m512 (&acc)[R][V]) {
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_si512(b + p * b_stride + (v0 + v) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a[r * a_stride + p]));
      for (int v = 0; v < V; ++v) acc[r][v] = dot_pairs(acc[r][v], ar, bv[v]);
    }
  }
}

// out[r, g0*16 : (g0+G)*16] = a[row r] . b for R rows and G vectors of 16 columns, fp32 (row stride ncols).
template <int R, int G>
MMSWIN_AVX512_BF16 inline void dot_rows(const uint32_t* a, int64_t a_stride, const uint32_t* b, int64_t ncols,
                                        int64_t pairs, int64_t g0, float* out) {
  __m512 acc[R][G];
  dot_block<R, G>(a, a_stride, b, ncols, pairs, g0, acc);
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + r * ncols + (g0 + g) * 16, acc[r][g]);
}

// All ncols (a multiple of 16) columns of R rows of a . b into out (fp32, row stride ncols).
template <int R>
MMSWIN_AVX512_BF16 void dot_all_columns(const uint32_t* a, int64_t a_stride, const uint32_t* b, int64_t ncols,
                                        int64_t pairs, float* out) {
  const int64_t vecs = ncols / 16;
  int64_t g0 = 0;
  for (; g0 + 4 <= vecs; g0 += 4) dot_rows<R, 4>(a, a_stride, b, ncols, pairs, g0, out);
  switch (vecs - g0) {
    case 3: dot_rows<R, 3>(a, a_stride, b, ncols, pairs, g0, out); break;
    case 2: dot_rows<R, 2>(a, a_stride, b, ncols, pairs, g0, out); break;
    case 1: dot_rows<R, 1>(a, a_stride, b, ncols, pairs, g0, out); break;
    default: break;
  }
}

// n rows of d bf16 values (row stride `stride`, d even) as the columns of a right operand: (d/2, npad) words,
// word (p, j) = (x[j, 2p], x[j, 2p+1]), zero for j >= n.
MMSWIN_AVX512_BF16 inline void pack_columns(const uint16_t* x, int64_t stride, int64_t n, int64_t npad,
                                            int64_t d, uint32_t* dst) {
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);
  const int64_t xw_stride = stride / 2;
  for (int64_t p = 0; p < d / 2; ++p) {
    uint32_t* col = dst + p * npad;
    for (int64_t j = 0; j < n; ++j) col[j] = xw[j * xw_stride + p];
    for (int64_t j = n; j < npad; ++j) col[j] = 0;
  }
}

// n rows of d bf16 values (row stride `stride`, d a multiple of 16) as pairs of rows of a right operand whose
// reduction runs over the rows: (ceil(n/2), d) words, word (p, c) = (x[2p, c], x[2p+1, c]), x[n, c] = 0.
MMSWIN_AVX512_BF16 inline void pack_row_pairs(const uint16_t* x, int64_t stride, int64_t n, int64_t d,
                                              uint32_t* dst) {
  for (int64_t p = 0; p < (n + 1) / 2; ++p) {
    const uint16_t* even = x + 2 * p * stride;
    for (int64_t c = 0; c < d; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c)));
      __m512i hi = _mm512_setzero_si512();
      if (2 * p + 1 < n)
        hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + stride + c)));
      _mm512_storeu_si512(dst + p * d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

}  // namespace simd
}  // namespace mmswin

#endif  // MMSWIN_X86
