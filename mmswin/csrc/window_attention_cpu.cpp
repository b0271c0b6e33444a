// Fused window attention for CPU bf16 (inference, and the forward of training): per window and head, the
// logits of q k^T, their softmax and the weighted sum of v, the logits and weights kept in registers and a
// few cache lines (no (B*nW, nH, N, N) tensor), the products taken with the AVX512-BF16 dot-product
// instruction and fp32 accumulation, the logits kept in fp32 up to the softmax.
//
// It reads q, k and v straight from the qkv projection, qkv (B*nW, N, 3C) bf16 with C = nH * d, and writes
// (B*nW, N, C) bf16, the layout the output projection reads. The logits are
//   V1: scale[h] * q.k + bias[h] + mask[b % nW],
//   V2 (cosine): scale[h] * q.k / (max(|q|, eps) max(|k|, eps)) + bias[h] + mask[b % nW],
// with bias (nH, N, N) fp32, mask (nW, N, N) fp32 or none, scale (nH,) fp32. d must be a multiple of 16.
// For training, window_attention_with_lse also returns each row's lse = log2(sum_j 2^(logit_j * log2(e)))
// in fp32, from which the backward (window_attention_backward_cpu.cpp) recomputes the weights.
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kMaxTokens = 1024;

#ifdef MMSWIN_X86

using namespace mmswin::simd;

// Per-task scratch: the queries as (N, d) rows, the keys as (d/2, Npad) bf16 pairs (column j of pair p holds
// k[j, 2p], k[j, 2p+1]),
// the values as (ceil(N/2), d) pairs of rows, the keys' scales (cosine attention), and R rows of logits
// (fp32), weights (bf16, unnormalised) and their sums' reciprocals.
struct Scratch {
  std::vector<uint32_t> keys, values;
  std::vector<float> key_scales, logits, inv_sums;
  std::vector<uint16_t> queries, weights;
  Scratch(int64_t n, int64_t npad, int64_t d, int64_t rows)
      : keys(d / 2 * npad), values((n + 1) / 2 * d), key_scales(npad), logits(rows * npad),
        inv_sums(rows), queries(n * d), weights(rows * npad) {}
};

constexpr int kRows = 4;  // query rows per register block

// out[r, c0*16 : (c0+C)*16] = inv_sums[r] * weights[r] @ v for R rows and C vectors of 16 channels, in bf16.
template <int R, int C>
MMSWIN_AVX512_BF16 inline void row_outputs(const uint32_t* weights, int64_t w_stride, const float* inv_sums,
                                           const uint32_t* values, int64_t d, int64_t pairs, int64_t c0,
                                           uint16_t* out, int64_t out_stride) {
  __m512 acc[R][C];
  dot_block<R, C>(weights, w_stride, values, d, pairs, c0, acc);
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sums[r]);
    for (int c = 0; c < C; ++c) store_bf16(out + r * out_stride + (c0 + c) * 16, _mm512_mul_ps(acc[r][c], inv));
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

// The keys' scales 1 / max(|k|, eps) of cosine attention, from the keys packed as columns.
MMSWIN_AVX512_BF16 void key_scales(const uint32_t* keys, int64_t npad, int64_t d, float* scales) {
  for (int64_t j0 = 0; j0 < npad; j0 += 16) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; ++p) {
      const __m512i kv = _mm512_loadu_si512(keys + p * npad + j0);
      squares = dot_pairs(squares, kv, kv);
    }
    const __m512 length = _mm512_max_ps(_mm512_sqrt_ps(squares), _mm512_set1_ps(kNormEps));
    _mm512_storeu_ps(scales + j0, _mm512_div_ps(_mm512_set1_ps(1.0f), length));
  }
}

struct Head {
  const uint16_t* q;  // row i at q + i * stride
  int64_t stride;     // elements between the rows of q (3C in qkv, d in the scratch copy)
  const float* bias;  // (N, N)
  const float* mask;  // (N, N) or null
  float scale;
  bool cosine;
  int64_t n, npad, d;
  uint16_t* out;      // row i at out + i * out_stride
  int64_t out_stride;
  float* lse;         // row i's log2 of the sum of 2^(logit * log2(e)), at lse[i]; or null
};

// The softmax of R rows of logits: logits * row scale (* key scales) + bias (+ mask), exponentiated
// relative to each row's maximum into bf16 weights (0 from lane N on), and the reciprocals of their fp32
// sums. The rows are interleaved: each one's reductions are a chain of dependent steps that the CPU
// overlaps with the others'.
template <int R>
MMSWIN_AVX512_BF16 void softmax_rows(const Head& h, int64_t i0, Scratch& s) {
  const int64_t vecs = h.npad / 16;
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
    const __mmask16 m = first_lanes(h.n - t * 16);
    const __m512 key_scale = h.cosine ? _mm512_loadu_ps(s.key_scales.data() + t * 16) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) {
      float* logits = s.logits.data() + r * h.npad + t * 16;
      const int64_t at = (i0 + r) * h.n + t * 16;
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(logits), scale[r]);
      if (h.cosine) x = _mm512_mul_ps(x, key_scale);
      x = _mm512_add_ps(x, load_ps(h.bias + at, m));
      if (h.mask != nullptr) x = _mm512_add_ps(x, load_ps(h.mask + at, m));
      x = _mm512_mask_mov_ps(neg_inf, m, x);
      _mm512_storeu_ps(logits, x);
      top[r] = _mm512_max_ps(top[r], x);
    }
  }
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  __m512 shift[R];
  for (int r = 0; r < R; ++r) shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]) * kLog2e);
  for (int64_t t = 0; t < vecs; ++t) {
    for (int r = 0; r < R; ++r) {
      const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s.logits.data() + r * h.npad + t * 16), log2e,
                                               shift[r]));
      sum[r] = _mm512_add_ps(sum[r], e);
      store_bf16(s.weights.data() + r * h.npad + t * 16, e);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float total = _mm512_reduce_add_ps(sum[r]);
    s.inv_sums[r] = 1.0f / total;
    if (h.lse != nullptr) h.lse[i0 + r] = _mm512_cvtss_f32(shift[r]) + std::log2(total);
  }
}

template <int R>
MMSWIN_AVX512_BF16 void attend_rows(const Head& h, int64_t i0, Scratch& s) {
  dot_all_columns<R>(reinterpret_cast<const uint32_t*>(h.q + i0 * h.stride), h.stride / 2, s.keys.data(),
                     h.npad, h.d / 2, s.logits.data());
  softmax_rows<R>(h, i0, s);
  block_outputs<R>(reinterpret_cast<const uint32_t*>(s.weights.data()), h.npad / 2, s.inv_sums.data(),
                   s.values.data(), h.d, (h.n + 1) / 2, h.out + i0 * h.out_stride, h.out_stride);
}

// The head's n query rows of d values (row stride `stride`) into (n, d) rows: all of their cache lines are
// requested at once here, where the products that read them row by row would each wait on a miss.
MMSWIN_AVX512_BF16 void copy_queries(const uint16_t* q, int64_t stride, int64_t n, int64_t d, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * d + c),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * stride + c)));
}

MMSWIN_AVX512_BF16 void attend_head(const Head& head, const uint16_t* k, const uint16_t* v, Scratch& s) {
  pack_columns(k, head.stride, head.n, head.npad, head.d, s.keys.data());
  if (head.cosine) key_scales(s.keys.data(), head.npad, head.d, s.key_scales.data());
  pack_row_pairs(v, head.stride, head.n, head.d, s.values.data());
  copy_queries(head.q, head.stride, head.n, head.d, s.queries.data());
  Head h = head;
  h.q = s.queries.data();
  h.stride = h.d;
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

// The forward of both entry points: the output and, with_lse, each row's lse (B*nW, nH, N) fp32.
std::tuple<at::Tensor, at::Tensor> attend(const char* fn, const at::Tensor& qkv, int64_t heads,
                                          const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& scale, bool cosine, bool with_lse) {
  const mmswin::WindowShapes w = mmswin::check_window_attention(fn, qkv, heads, bias, mask, scale);
  at::Tensor out = at::empty({w.bw, w.n, w.c}, qkv.options());
  at::Tensor lse;
  if (with_lse) lse = at::empty({w.bw, heads, w.n}, qkv.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bias_data = bias.data_ptr<float>();
  const float* mask_data = w.nw > 0 ? mask->data_ptr<float>() : nullptr;
  const float* scales = scale.data_ptr<float>();
  float* lse_data = lse.defined() ? lse.data_ptr<float>() : nullptr;
  const int64_t n = w.n, c = w.c, d = w.d, npad = (n + 15) / 16 * 16;
  at::parallel_for(0, w.bw * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, npad, d, kRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, hd = task % heads;
      const uint16_t* q = src + b * n * 3 * c + hd * d;
      const Head h{q, 3 * c, bias_data + hd * n * n, mask_data ? mask_data + (b % w.nw) * n * n : nullptr,
                   scales[hd], cosine, n, npad, d, dst + b * n * c + hd * d, c,
                   lse_data ? lse_data + task * n : nullptr};
      attend_head(h, q + c, q + 2 * c, s);
    }
  });
#endif
  return {out, lse};
}

}  // namespace

namespace mmswin {

WindowShapes check_window_attention(const char* fn, const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                                    const c10::optional<at::Tensor>& mask, const at::Tensor& scale) {
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(qkv, at::kBFloat16) && qkv.dim() == 3,
              fn, ": qkv must be a contiguous (B*nW, N, 3C) bf16 CPU tensor, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  WindowShapes w;
  w.bw = qkv.size(0);
  w.n = qkv.size(1);
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, fn, ": qkv's last axis (", qkv.size(2),
              ") is not 3 * heads * d for heads=", heads);
  w.c = qkv.size(2) / 3;
  w.d = w.c / heads;
  const int64_t n = w.n;
  TORCH_CHECK(w.d % 16 == 0, fn, ": the head width must be a multiple of 16, got ", w.d);
  TORCH_CHECK(n >= 1 && n <= kMaxTokens, fn, ": windows of 1 to ", kMaxTokens, " tokens, got ", n);
  TORCH_CHECK(is_cpu_contiguous(bias, at::kFloat) && bias.sizes() == at::IntArrayRef({heads, n, n}),
              fn, ": bias must be a contiguous (nH, N, N) = (", heads, ", ", n, ", ", n,
              ") fp32 CPU tensor, got ", bias.sizes(), " ", bias.scalar_type());
  TORCH_CHECK(is_cpu_contiguous(scale, at::kFloat) && scale.numel() == heads,
              fn, ": scale must hold one fp32 number per head (", heads, "), got ", scale.sizes(), " ",
              scale.scalar_type());
  w.nw = 0;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(is_cpu_contiguous(m, at::kFloat) && m.dim() == 3 && m.size(0) >= 1 && m.size(1) == n && m.size(2) == n,
                fn, ": mask must be a contiguous (nW, N, N) fp32 CPU tensor with N=", n, ", got ", m.sizes(), " ",
                m.scalar_type());
    TORCH_CHECK(w.bw % m.size(0) == 0, fn, ": ", w.bw, " windows are not whole images of ", m.size(0),
                " mask windows");
    w.nw = m.size(0);
  }
  return w;
}

at::Tensor window_attention(const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine) {
  return std::get<0>(attend("window_attention", qkv, heads, bias, mask, scale, cosine, false));
}

std::tuple<at::Tensor, at::Tensor> window_attention_with_lse(const at::Tensor& qkv, int64_t heads,
                                                             const at::Tensor& bias,
                                                             const c10::optional<at::Tensor>& mask,
                                                             const at::Tensor& scale, bool cosine) {
  return attend("window_attention_with_lse", qkv, heads, bias, mask, scale, cosine, true);
}

}  // namespace mmswin
