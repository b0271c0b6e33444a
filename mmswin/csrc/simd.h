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

#include <algorithm>
#include <cstdint>

namespace mmswin {
namespace simd {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEps = 1e-12f;  // F.normalize's, as in the official V2

// 2^t in fp32: t = n + f with |f| <= 1/2, 2^f = exp(f ln2) by its Taylor polynomial to degree 6 (relative
// error below 2e-7), times 2^n by scalef. Below fp32's smallest normal number (t < -126, -inf, NaN) it is 0,
// never a denormal: Intel's CPUs take a microcode assist for each instruction that makes or reads one (the
// padded lanes of a 7x7 window's softmax, -inf, made the attention kernels 1.6x slower there), and the bf16
// conversions and products that read the weights count a denormal as zero anyway.
MMSWIN_AVX512_BF16 inline __m512 exp2_ps(__m512 t) {
  const __m512 smallest = _mm512_set1_ps(-126.0f);
  const __mmask16 normal = _mm512_cmp_ps_mask(t, smallest, _CMP_GE_OQ);
  t = _mm512_max_ps(t, smallest);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));  // 2^-126 <= p 2^n where t >= -126
}

MMSWIN_AVX512_BF16 inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Phi(h), the standard normal distribution, = erfc(-h / sqrt(2)) / 2 with erfc by Abramowitz and Stegun's 7.1.26
// (the approximation PyTorch's vectorised erf takes, absolute error below 1.5e-7), and gauss = exp(-h^2 / 2).
MMSWIN_AVX512_BF16 inline __m512 normal_cdf(__m512 h, __m512& gauss) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(h), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f),
                                                                         _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  gauss = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-kLog2e)));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(p, gauss), _mm512_set1_ps(0.5f));  // Phi(-|h|)
  const __mmask16 negative = _mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), tail), negative, tail);
}

// The first `left` of 16 lanes (all of them from 16 on).
MMSWIN_AVX512_BF16 inline __mmask16 first_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

template <bool kMax>
MMSWIN_AVX512_BF16 inline __m512 max_or_add(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
}

// The sums (kMax false) or maxima of 16 vectors' lanes as one vector, lane r that of v[r]: a tree of 45
// instructions where 16 _mm512_reduce_add_ps take over 100, adding in their order (lanes i and i + 8, then 4
// apart, then 2, then 1), so the same sums. The tree leaves row kOrder[l] at lane l (an involution), so it takes
// its rows in that order.
template <bool kMax>
MMSWIN_AVX512_BF16 inline __m512 reduce_rows(const __m512 (&v)[16]) {
  constexpr int kOrder[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  const auto op = max_or_add<kMax>;
  __m512 half[8], quarter[4], pair[2];
  for (int r = 0; r < 8; ++r) {  // lanes i and i + 8: one row's 8 in lanes 0-7, another's in lanes 8-15
    const __m512 a = v[kOrder[r]], b = v[kOrder[r + 8]];
    half[r] = op(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int r = 0; r < 4; ++r)  // 4 apart: a row's 4 in each 128-bit lane
    quarter[r] = op(_mm512_shuffle_f32x4(half[r], half[r + 4], 0x88),
                    _mm512_shuffle_f32x4(half[r], half[r + 4], 0xDD));
  for (int r = 0; r < 2; ++r) {  // 2 apart: two rows' 2 in each 128-bit lane
    const __m512d a = _mm512_castps_pd(quarter[r]), b = _mm512_castps_pd(quarter[r + 2]);
    pair[r] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  return op(_mm512_shuffle_ps(pair[0], pair[1], 0x88), _mm512_shuffle_ps(pair[0], pair[1], 0xDD));
}

// Loads and stores of the lanes m of a vector. Whole vectors take the plain instructions: AMD's Zen CPUs run
// masked loads and stores several times slower than plain ones where the lines are not in L1 (a layer norm
// of 60800 rows of 96 channels took 3.6 ms with masked ones, 0.9 ms with plain ones, on 2 cores).
MMSWIN_AVX512_BF16 inline __m256i load_bf16_bits(const uint16_t* p, __mmask16 m) {
  return m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}

MMSWIN_AVX512_BF16 inline void store_bf16_bits(uint16_t* p, __mmask16 m, __m256i bits) {
  if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_mask_storeu_epi16(p, m, bits);
  }
}

MMSWIN_AVX512_BF16 inline __m512 load_ps(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

MMSWIN_AVX512_BF16 inline void store_ps(float* p, __mmask16 m, __m512 x) {
  if (m == 0xFFFF) {
    _mm512_storeu_ps(p, x);
  } else {
    _mm512_mask_storeu_ps(p, m, x);
  }
}

// bf16 bits as fp32 (exact).
MMSWIN_AVX512_BF16 inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// fp32 rounded to bf16 bits (to nearest even).
MMSWIN_AVX512_BF16 inline __m256i round_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

MMSWIN_AVX512_BF16 inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return widen_bf16(load_bf16_bits(p, m));
}

MMSWIN_AVX512_BF16 inline void store_bf16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(x));
}

MMSWIN_AVX512_BF16 inline void store_bf16(uint16_t* p, __mmask16 m, __m512 x) {
  store_bf16_bits(p, m, round_bf16(x));
}

// d bf16 values (a multiple of 16) from `from` to `to`.
MMSWIN_AVX512_BF16 inline void copy_values(const uint16_t* from, int64_t d, uint16_t* to) {
  for (int64_t c = 0; c < d; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + c),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + c)));
}

// Sum of squares of d bf16 values, in fp32.
MMSWIN_AVX512_BF16 inline float squared_length(const uint16_t* x, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    const __m512i v = _mm512_loadu_si512(x + c);
    acc = dot_pairs(acc, v, v);
  }
  if (c < d) {
    const __m512i v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << (d - c)) - 1), x + c);
    acc = dot_pairs(acc, v, v);
  }
  return _mm512_reduce_add_ps(acc);
}

// The register block of every product: acc[r][v] = sum over pairs p of a[r, p] . b[p, v0 + v] for R rows of
// a (bf16 pairs, row stride a_stride, pair stride a_step) and V vectors of 16 columns of b (bf16 pairs, row
// stride b_stride), in fp32. A left operand stored transposed (a_stride 1, a_step its row length) is read
// as it is: a word is broadcast from wherever it lies.
template <int R, int V>
MMSWIN_AVX512_BF16 inline void dot_block(const uint32_t* a, int64_t a_stride, const uint32_t* b,
                                         int64_t b_stride, int64_t pairs, int64_t v0, __m512 (&acc)[R][V],
                                         int64_t a_step = 1) {
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_si512(b + p * b_stride + (v0 + v) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a[r * a_stride + p * a_step]));
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

// A 16 x 16 matrix of 32-bit words, one row per register, transposed in place: four rounds of in-register
// shuffles. AMD's Zen CPUs run the scatter stores or the word-by-word copies that would do it instead many
// times slower.
MMSWIN_AVX512_BF16 inline void transpose16(__m512i (&a)[16]) {
  __m512i b[16];
  // In each 128-bit lane L: b[i], b[i+1] hold words 4L, 4L+1 and 4L+2, 4L+3 of rows i, i+1 interleaved.
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
  }
  // Lane L of a[i + k] (i = 0, 4, 8, 12): word 4L + k of rows i .. i+3.
  for (int i = 0; i < 16; i += 4) {
    a[i] = _mm512_unpacklo_epi64(b[i], b[i + 2]);
    a[i + 1] = _mm512_unpackhi_epi64(b[i], b[i + 2]);
    a[i + 2] = _mm512_unpacklo_epi64(b[i + 1], b[i + 3]);
    a[i + 3] = _mm512_unpackhi_epi64(b[i + 1], b[i + 3]);
  }
  // Row 4L + k of the transpose is lane L of a[k], a[4 + k], a[8 + k], a[12 + k]: a 4 x 4 transpose of
  // 128-bit lanes.
  for (int k = 0; k < 4; ++k) {
    const __m512i lo01 = _mm512_shuffle_i32x4(a[k], a[4 + k], 0x44);
    const __m512i hi01 = _mm512_shuffle_i32x4(a[k], a[4 + k], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(a[8 + k], a[12 + k], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(a[8 + k], a[12 + k], 0xEE);
    b[k] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    b[4 + k] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    b[8 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    b[12 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) a[i] = b[i];
}

// dst[j][i] = src[i][j] for a block of 16 x 16 32-bit words (row strides in words): rows i >= rows of src
// read as zeros, and only the first `words` words of each src row are read and the first `words` rows of dst
// written (16 words each).
MMSWIN_AVX512_BF16 inline void transpose_block(const uint32_t* src, int64_t src_stride, int64_t rows,
                                               int64_t words, uint32_t* dst, int64_t dst_stride) {
  const __mmask16 m = first_lanes(words);
  __m512i a[16];
  for (int i = 0; i < 16; ++i) {
    if (i >= rows) {
      a[i] = _mm512_setzero_si512();
    } else if (m == 0xFFFF) {
      a[i] = _mm512_loadu_si512(src + i * src_stride);
    } else {
      a[i] = _mm512_maskz_loadu_epi32(m, src + i * src_stride);
    }
  }
  transpose16(a);
  for (int j = 0; j < words; ++j) _mm512_storeu_si512(dst + j * dst_stride, a[j]);
}

// a[j][i] = src[i][j] for a block of at most 16 x 16 16-bit values (row stride in values): `rows` rows of
// `cols` values each, zero-extended to 32-bit words and transposed.
MMSWIN_AVX512_BF16 inline void load_transposed_u16(const uint16_t* src, int64_t src_stride, int64_t rows,
                                                   int64_t cols, __m512i (&a)[16]) {
  const __mmask16 m = first_lanes(cols);
  for (int i = 0; i < 16; ++i)
    a[i] = i < rows ? _mm512_cvtepu16_epi32(load_bf16_bits(src + i * src_stride, m)) : _mm512_setzero_si512();
  transpose16(a);
}

// dst[j][i] = src[i][j] for a block of at most 16 x 16 16-bit values (row strides in values).
MMSWIN_AVX512_BF16 inline void transpose_block_u16(const uint16_t* src, int64_t src_stride, int64_t rows,
                                                   int64_t cols, uint16_t* dst, int64_t dst_stride) {
  __m512i a[16];
  load_transposed_u16(src, src_stride, rows, cols, a);
  const __mmask16 out = first_lanes(rows);
  for (int j = 0; j < cols; ++j) store_bf16_bits(dst + j * dst_stride, out, _mm512_cvtepi32_epi16(a[j]));
}

// A (rows, words) matrix of 32-bit words (row stride src_stride) transposed into (words, cols) (row stride
// dst_stride, cols a multiple of 16 and at least rows), zeros in columns rows .. cols-1.
MMSWIN_AVX512_BF16 inline void transpose_words(const uint32_t* src, int64_t src_stride, int64_t rows,
                                               int64_t words, int64_t cols, uint32_t* dst, int64_t dst_stride) {
  for (int64_t i0 = 0; i0 < cols; i0 += 16)
    for (int64_t j0 = 0; j0 < words; j0 += 16)
      transpose_block(src + i0 * src_stride + j0, src_stride, std::max<int64_t>(0, rows - i0),
                      std::min<int64_t>(16, words - j0), dst + j0 * dst_stride + i0, dst_stride);
}

// n rows of d bf16 values (row stride `stride`, d even) as the columns of a right operand: (d/2, npad) words,
// word (p, j) = (x[j, 2p], x[j, 2p+1]), zero for j >= n.
MMSWIN_AVX512_BF16 inline void pack_columns(const uint16_t* x, int64_t stride, int64_t n, int64_t npad,
                                            int64_t d, uint32_t* dst) {
  transpose_words(reinterpret_cast<const uint32_t*>(x), stride / 2, n, d / 2, npad, dst, npad);
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
