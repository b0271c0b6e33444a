// Fused window attention for CPU bf16 inference: per window and head, the logits of q k^T, their softmax
// and the weighted sum of v, the logits and weights kept in registers and a few cache lines (no
// (B*nW, nH, N, N) tensor), the products taken with the AVX512-BF16 dot-product instruction and fp32
// accumulation, the logits kept in fp32 up to the softmax.
//
// It reads q, k and v straight from the qkv projection, qkv (B*nW, N, 3C) bf16 with C = nH * d, and writes
// (B*nW, N, C) bf16, the layout the output projection reads. The logits are
//   V1: scale[h] * q.k + bias[h] + mask[b % nW],
//   V2 (cosine): scale[h] * q.k / (max(|q|, eps) max(|k|, eps)) + bias[h] + mask[b % nW],
// with bias (nH, N, N) fp32, mask (nW, N, N) fp32 or none, scale (nH,) fp32. d must be a multiple of 16.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef MMSWIN_X86
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxTokens = 1024;
constexpr float kNormEps = 1e-12f;  // F.normalize's, as in the official V2

#ifdef MMSWIN_X86

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

// Per-task scratch: the keys as (d/2, Npad) bf16 pairs (column j of pair p holds k[j, 2p], k[j, 2p+1]),
// the values as (ceil(N/2), d) pairs of rows, the keys' scales (cosine attention), and R rows of logits
// (fp32), weights (bf16, unnormalised) and their sums' reciprocals.
struct Scratch {
  std::vector<uint32_t> keys, values;
  std::vector<float> key_scales, logits, inv_sums;
  std::vector<uint16_t> weights;
  Scratch(int64_t n, int64_t npad, int64_t d, int64_t rows)
      : keys(d / 2 * npad), values((n + 1) / 2 * d), key_scales(npad), logits(rows * npad),
        inv_sums(rows), weights(rows * npad) {}
};

constexpr int kRows = 4;  // query rows per register block

// The register block of both products: acc[r][v] = sum over pairs p of a[r, p] . b[p, v0 + v] for R rows of
// a (bf16 pairs, row stride a_stride) and V vectors of 16 columns of b (bf16 pairs, row stride b_stride),
// in fp32. q k^T takes the query rows and the packed keys, weights @ v the weight rows and packed values.
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

// logits[r, g0*16 : (g0+G)*16] = q[row r] . k for R rows and G vectors of 16 keys.
template <int R, int G>
MMSWIN_AVX512_BF16 inline void row_logits(const uint32_t* q, int64_t q_stride, const uint32_t* keys,
                                          int64_t npad, int64_t pairs, int64_t g0, float* logits) {
  __m512 acc[R][G];
  dot_block<R, G>(q, q_stride, keys, npad, pairs, g0, acc);
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(logits + r * npad + (g0 + g) * 16, acc[r][g]);
}

template <int R>
MMSWIN_AVX512_BF16 void block_logits(const uint32_t* q, int64_t q_stride, const uint32_t* keys,
                                     int64_t npad, int64_t pairs, float* logits) {
  const int64_t vecs = npad / 16;
  int64_t g0 = 0;
  for (; g0 + 4 <= vecs; g0 += 4) row_logits<R, 4>(q, q_stride, keys, npad, pairs, g0, logits);
  switch (vecs - g0) {
    case 3: row_logits<R, 3>(q, q_stride, keys, npad, pairs, g0, logits); break;
    case 2: row_logits<R, 2>(q, q_stride, keys, npad, pairs, g0, logits); break;
    case 1: row_logits<R, 1>(q, q_stride, keys, npad, pairs, g0, logits); break;
    default: break;
  }
}

// out[r, c0*16 : (c0+C)*16] = inv_sums[r] * weights[r] @ v for R rows and C vectors of 16 channels, in bf16.
template <int R, int C>
MMSWIN_AVX512_BF16 inline void row_outputs(const uint32_t* weights, int64_t w_stride, const float* inv_sums,
                                           const uint32_t* values, int64_t d, int64_t pairs, int64_t c0,
                                           uint16_t* out, int64_t out_stride) {
  __m512 acc[R][C];
  dot_block<R, C>(weights, w_stride, values, d, pairs, c0, acc);
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sums[r]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + (c0 + c) * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], inv)));
  }
}

template <int R>
MMSWIN_AVX512_BF16 void block_outputs(const uint32_t* weights, int64_t w_stride, const float* inv_sums,
                                      const uint32_t* values, int64_t d, int64_t pairs, uint16_t* out,
                                      int64_t out_stride) {
  const int64_t vecs = d / 16;
  int64_t c0 = 0;
  for (; c0 + 2 <= vecs; c0 += 2)
    row_outputs<R, 2>(weights, w_stride, inv_sums, values, d, pairs, c0, out, out_stride);
  if (c0 < vecs) row_outputs<R, 1>(weights, w_stride, inv_sums, values, d, pairs, c0, out, out_stride);
}

// Keys (N rows of d, row stride `stride`) into (d/2, Npad) pairs, zero beyond N, and for cosine attention
// their scales 1 / max(|k|, eps); values into (ceil(N/2), d) pairs of rows.
MMSWIN_AVX512_BF16 void pack(const uint16_t* k, const uint16_t* v, int64_t stride, int64_t n, int64_t npad,
                             int64_t d, bool cosine, Scratch& s) {
  const int64_t pairs = d / 2;
  const uint32_t* kw = reinterpret_cast<const uint32_t*>(k);
  const int64_t kw_stride = stride / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* dst = s.keys.data() + p * npad;
    for (int64_t j = 0; j < n; ++j) dst[j] = kw[j * kw_stride + p];
    for (int64_t j = n; j < npad; ++j) dst[j] = 0;
  }
  if (cosine) {
    for (int64_t j0 = 0; j0 < npad; j0 += 16) {
      __m512 squares = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512i kv = _mm512_loadu_si512(s.keys.data() + p * npad + j0);
        squares = dot_pairs(squares, kv, kv);
      }
      const __m512 length = _mm512_max_ps(_mm512_sqrt_ps(squares), _mm512_set1_ps(kNormEps));
      _mm512_storeu_ps(s.key_scales.data() + j0, _mm512_div_ps(_mm512_set1_ps(1.0f), length));
    }
  }
  const int64_t vpairs = (n + 1) / 2;
  for (int64_t p = 0; p < vpairs; ++p) {
    const uint16_t* even = v + 2 * p * stride;
    for (int64_t c = 0; c < d; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c)));
      __m512i hi = _mm512_setzero_si512();
      if (2 * p + 1 < n)
        hi = _mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + stride + c)));
      _mm512_storeu_si512(s.values.data() + p * d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}


struct Head {
  const uint16_t* q;  // row i at q + i * stride
  int64_t stride;     // elements between tokens in qkv and out (3C and C)
  const float* bias;  // (N, N)
  const float* mask;  // (N, N) or null
  float scale;
  bool cosine;
  int64_t n, npad, d;
  uint16_t* out;      // row i at out + i * out_stride
  int64_t out_stride;
};

// The softmax of R rows of logits: logits * row scale (* key scales) + bias (+ mask), exponentiated
// relative to each row's maximum into bf16 weights (0 from lane N on), and the reciprocals of their fp32
// sums. The rows are interleaved: each one's reductions are a chain of dependent steps that the CPU
// overlaps with the others'.
template <int R>
MMSWIN_AVX512_BF16 void softmax_rows(const Head& h, int64_t i0, Scratch& s) {
  const int64_t vecs = h.npad / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (h.n - (vecs - 1) * 16)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 scale[R], top[R], sum[R];
  for (int r = 0; r < R; ++r) {
    float row_scale = h.scale;
    if (h.cosine)
      row_scale /= std::max(std::sqrt(squared_length(h.q + (i0 + r) * h.stride, h.d)), kNormEps);
    scale[r] = _mm512_set1_ps(row_scale);
    top[r] = neg_inf;
    sum[r] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < vecs; ++t) {
    const __mmask16 m = t + 1 < vecs ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 key_scale = h.cosine ? _mm512_loadu_ps(s.key_scales.data() + t * 16) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) {
      float* logits = s.logits.data() + r * h.npad + t * 16;
      const int64_t at = (i0 + r) * h.n + t * 16;
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(logits), scale[r]);
      if (h.cosine) x = _mm512_mul_ps(x, key_scale);
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, h.bias + at));
      if (h.mask != nullptr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, h.mask + at));
      x = _mm512_mask_mov_ps(neg_inf, m, x);
      _mm512_storeu_ps(logits, x);
      top[r] = _mm512_max_ps(top[r], x);
    }
  }
  const __m512 log2e = _mm512_set1_ps(1.4426950408889634f);
  __m512 shift[R];
  for (int r = 0; r < R; ++r) shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]) * 1.4426950408889634f);
  for (int64_t t = 0; t < vecs; ++t) {
    for (int r = 0; r < R; ++r) {
      const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s.logits.data() + r * h.npad + t * 16), log2e,
                                               shift[r]));
      sum[r] = _mm512_add_ps(sum[r], e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.weights.data() + r * h.npad + t * 16),
                          (__m256i)_mm512_cvtneps_pbh(e));
    }
  }
  for (int r = 0; r < R; ++r) s.inv_sums[r] = 1.0f / _mm512_reduce_add_ps(sum[r]);
}

template <int R>
MMSWIN_AVX512_BF16 void attend_rows(const Head& h, int64_t i0, Scratch& s) {
  block_logits<R>(reinterpret_cast<const uint32_t*>(h.q + i0 * h.stride), h.stride / 2, s.keys.data(),
                  h.npad, h.d / 2, s.logits.data());
  softmax_rows<R>(h, i0, s);
  block_outputs<R>(reinterpret_cast<const uint32_t*>(s.weights.data()), h.npad / 2, s.inv_sums.data(),
                   s.values.data(), h.d, (h.n + 1) / 2, h.out + i0 * h.out_stride, h.out_stride);
}

MMSWIN_AVX512_BF16 void attend_head(const Head& h, const uint16_t* k, const uint16_t* v, Scratch& s) {
  pack(k, v, h.stride, h.n, h.npad, h.d, h.cosine, s);
  int64_t i = 0;
  for (; i + kRows <= h.n; i += kRows) attend_rows<kRows>(h, i, s);
  switch (h.n - i) {
    case 3: attend_rows<3>(h, i, s); break;
    case 2: attend_rows<2>(h, i, s); break;
    case 1: attend_rows<1>(h, i, s); break;
    default: break;
  }
}

#endif  // MMSWIN_X86

}  // namespace

namespace mmswin {

at::Tensor window_attention(const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine) {
  TORCH_CHECK(kernels_available(), "window_attention needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kBFloat16 && qkv.dim() == 3 &&
                  qkv.is_contiguous(),
              "window_attention: qkv must be a contiguous (B*nW, N, 3C) bf16 CPU tensor, got ", qkv.sizes(),
              " ", qkv.scalar_type());
  const int64_t bw = qkv.size(0), n = qkv.size(1);
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, "window_attention: qkv's last axis (",
              qkv.size(2), ") is not 3 * heads * d for heads=", heads);
  const int64_t c = qkv.size(2) / 3, d = c / heads;
  TORCH_CHECK(d % 16 == 0, "window_attention: the head width must be a multiple of 16, got ", d);
  TORCH_CHECK(n >= 1 && n <= kMaxTokens, "window_attention: windows of 1 to ", kMaxTokens, " tokens, got ", n);
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.sizes() == at::IntArrayRef({heads, n, n}),
              "window_attention: bias must be a contiguous (nH, N, N) = (", heads, ", ", n, ", ", n,
              ") fp32 CPU tensor, got ", bias.sizes(), " ", bias.scalar_type());
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == heads,
              "window_attention: scale must hold one fp32 number per head (", heads, "), got ", scale.sizes(),
              " ", scale.scalar_type());
  int64_t nw = 1;
  const float* mask_data = nullptr;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 3 &&
                    m.size(0) >= 1 && m.size(1) == n && m.size(2) == n,
                "window_attention: mask must be a contiguous (nW, N, N) fp32 CPU tensor with N=", n,
                ", got ", m.sizes(), " ", m.scalar_type());
    TORCH_CHECK(bw % m.size(0) == 0, "window_attention: ", bw, " windows are not whole images of ",
                m.size(0), " mask windows");
    nw = m.size(0);
    mask_data = m.data_ptr<float>();
  }
  at::Tensor out = at::empty({bw, n, c}, qkv.options());
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bias_data = bias.data_ptr<float>();
  const float* scales = scale.data_ptr<float>();
  const int64_t npad = (n + 15) / 16 * 16;
  at::parallel_for(0, bw * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, npad, d, kRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, hd = task % heads;
      const uint16_t* q = src + b * n * 3 * c + hd * d;
      const Head h{q, 3 * c, bias_data + hd * n * n, mask_data ? mask_data + (b % nw) * n * n : nullptr,
                   scales[hd], cosine, n, npad, d, dst + b * n * c + hd * d, c};
      attend_head(h, q + c, q + 2 * c, s);
    }
  });
#endif
  return out;
}

}  // namespace mmswin
