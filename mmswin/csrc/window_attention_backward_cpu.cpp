// Backward of the fused window attention (window_attention_cpu.cpp) for CPU bf16 training. Per window and
// head, with dO the output's gradient (B*nW, N, C) bf16, it recomputes the logits from q and k and the
// weights P = 2^(logit * log2(e) - lse) from the forward's lse, then
//   dP = dO v^T,  dS = P * (dP - rowsum(P * dP))   (the gradient of the logits, bias and mask),
//   dv = P^T dO,  dq = scale dS k,  dk = scale dS^T q   (V1).
// V2 (cosine), with rq_i = 1 / max(|q_i|, eps), rk_j likewise and x_ij = scale rq_i rk_j q_i.k_j:
//   dq_i = scale rq_i sum_j dS_ij rk_j k_j - a_i rq_i^2 q_i,  a_i = sum_j dS_ij x_ij,
//   dk_j = scale rk_j sum_i dS_ij rq_i q_i - b_j rk_j^2 k_j,  b_j = sum_i dS_ij x_ij,
//   dscale = sum_i a_i / scale,
// without the second terms where the length is clamped to eps (as F.normalize's gradient). The products run
// on bf16 with fp32 accumulation as in the forward; P and dS are rounded to bf16 for them.
//
// The gradients of the bias (nH, N, N) and of the scale (nH,) are sums over windows: the windows are split
// into a fixed number of blocks, each summed by one task in fp32, and the blocks' sums are added in order, so
// that they are the same on any number of threads. The q, k, v gradients are written into the layout of the
// qkv projection, (B*nW, N, 3C) bf16.
//
// window_attention_rows_backward is the backward of window_attention_rows_with_lse (window_attention_cpu.cpp):
// each window's positions are gathered through slots (a padding position takes pad, no output gradient and
// an lse of +inf, so that its weights and its row of dS are zero), and the gradients of the real tokens'
// q, k and v go to their rows of the (B, R, 3C) projection, while those of the padding positions' k and v,
// which pad supplied, are summed in fp32 over blocks of windows like the bias's, into the (3C,) gradient of
// pad (the projection's bias). A window without padding whose slots are consecutive rows (in the models'
// window order, all but the map's last row and column of windows) is read and written in place, as
// window_attention_backward does, without the gather: the same values.
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using mmswin::LineVector;

// Blocks of windows whose bias and scale gradients are summed apart: tasks enough for a CPU's threads (times
// the heads), and few enough partial sums (blocks, nH, N, N) to stay in the caches (64 took 12 % longer).
constexpr int64_t kBlocks = 16;

#ifdef MMSWIN_X86

using namespace mmswin::simd;

constexpr int kRows = 4;  // rows per register block (even: two rows make the words of a transposed pair)
// Rows per register block of the products dv, dk and dq: 8 rows of d = 32 channels (two vectors) keep 16
// accumulators in flight, enough to hide the dot-product instruction's latency (8 are not).
constexpr int kGradRows = 8;

// Per-task scratch; npad = N rounded up to 16, pairs = ceil(N / 2).
struct Scratch {
  LineVector<uint32_t> keys, values;               // k and v as columns, (d/2, npad)
  LineVector<uint32_t> q_pairs, k_pairs, g_pairs;  // q, k and dO as pairs of rows, (pairs, d)
  LineVector<uint32_t> probs_w, grads_w;           // P and dS rq as words of pairs of rows, (pairs, npad)
  LineVector<uint16_t> grads;                      // dS rk, (N, npad) bf16
  LineVector<float> logits, dp, probs;             // kRows rows of npad, fp32
  LineVector<float> q_scale, k_scale, q_corr, k_corr, row_a, col_b;  // cosine attention, per row and column
  // window_attention_rows_backward's window of one head, gathered: q, k, v (N, 3d), dO (N, d), lse (N), and
  // the gradients of q, k, v (N, 3d) before they go to their rows.
  LineVector<uint16_t> tokens, token_grads, dqkv;
  LineVector<float> token_lse;
  Scratch(int64_t n, int64_t npad, int64_t d)
      : keys(d / 2 * npad), values(d / 2 * npad), q_pairs((n + 1) / 2 * d), k_pairs((n + 1) / 2 * d),
        g_pairs((n + 1) / 2 * d), probs_w((n + 1) / 2 * npad), grads_w((n + 1) / 2 * npad), grads(n * npad),
        logits(kRows * npad), dp(kRows * npad), probs(kRows * npad), q_scale(n),
        k_scale(npad), q_corr(n), k_corr(n), row_a(n), col_b(npad), tokens(n * 3 * d), token_grads(n * d),
        dqkv(n * 3 * d), token_lse(n) {}
};

struct Task {
  const uint16_t* q;  // row i at q + i * stride; k at q + C, v at q + 2C
  const uint16_t* g;  // dO, row i at g + i * c
  const float* lse;   // row i's at lse[i * lse_stride]
  int64_t lse_stride;
  const float* bias;  // (N, N)
  const float* mask;  // (N, N) or null
  float scale;
  bool cosine;
  int64_t n, npad, d, c;
  uint16_t* dq;       // row i at dq + i * 3C; dk at dq + C, dv at dq + 2C
  float* dbias;       // (N, N) sums of this block, or null
};

// 16 bf16 pairs of rows lo and hi as words (lo in the low half).
MMSWIN_AVX512_BF16 inline __m512i pair_words(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32(round_bf16(lo));
  const __m512i h = _mm512_cvtepu16_epi32(round_bf16(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// Rows i0 .. i0+R-1 (i0 even) of the logits' gradient: P into probs_w and dS (times rq) into grads_w as
// words of pairs of rows, dS (times rk) into grads, and the bias gradient, the a_i and the b_j summed.
template <int R>
MMSWIN_AVX512_BF16 void logit_grads(const Task& t, int64_t i0, Scratch& s) {
  const int64_t npad = t.npad, stride = 3 * t.c;
  dot_all_columns<R>(reinterpret_cast<const uint32_t*>(t.q + i0 * stride), stride / 2, s.keys.data(), npad,
                     t.d / 2, s.logits.data());
  dot_all_columns<R>(reinterpret_cast<const uint32_t*>(t.g + i0 * t.c), t.c / 2, s.values.data(), npad, t.d / 2,
                     s.dp.data());
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  __m512 row_scale[R], shift[R], dot[R], a[R], rq[R];
  for (int r = 0; r < R; ++r) {
    const float q_scale = t.cosine ? s.q_scale[i0 + r] : 1.0f;
    row_scale[r] = _mm512_set1_ps(t.scale * q_scale);
    rq[r] = _mm512_set1_ps(q_scale);
    shift[r] = _mm512_set1_ps(t.lse[(i0 + r) * t.lse_stride]);
    dot[r] = _mm512_setzero_ps();
    a[r] = _mm512_setzero_ps();
  }
  const int64_t vecs = npad / 16;
  // x (the logits before bias and mask) stays in logits, P goes to probs; rowsum(P * dP).
  for (int64_t v = 0; v < vecs; ++v) {
    const __mmask16 m = first_lanes(t.n - v * 16);
    const __m512 key_scale = t.cosine ? _mm512_loadu_ps(s.k_scale.data() + v * 16) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) {
      float* x_at = s.logits.data() + r * npad + v * 16;
      const int64_t at = (i0 + r) * t.n + v * 16;
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(x_at), row_scale[r]);
      if (t.cosine) x = _mm512_mul_ps(x, key_scale);
      _mm512_storeu_ps(x_at, x);
      __m512 z = _mm512_add_ps(x, load_ps(t.bias + at, m));
      if (t.mask != nullptr) z = _mm512_add_ps(z, load_ps(t.mask + at, m));
      z = _mm512_mask_mov_ps(neg_inf, m, z);
      const __m512 p = exp2_ps(_mm512_fmsub_ps(z, log2e, shift[r]));
      _mm512_storeu_ps(s.probs.data() + r * npad + v * 16, p);
      dot[r] = _mm512_fmadd_ps(p, _mm512_loadu_ps(s.dp.data() + r * npad + v * 16), dot[r]);
    }
  }
  for (int r = 0; r < R; ++r) dot[r] = _mm512_set1_ps(_mm512_reduce_add_ps(dot[r]));
  for (int64_t v = 0; v < vecs; ++v) {
    const __mmask16 m = first_lanes(t.n - v * 16);
    const __m512 key_scale = t.cosine ? _mm512_loadu_ps(s.k_scale.data() + v * 16) : _mm512_set1_ps(1.0f);
    __m512 p[R], g[R];
    __m512 b = _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      p[r] = _mm512_loadu_ps(s.probs.data() + r * npad + v * 16);
      g[r] = _mm512_mul_ps(p[r], _mm512_sub_ps(_mm512_loadu_ps(s.dp.data() + r * npad + v * 16), dot[r]));
      if (t.dbias != nullptr) {
        float* at = t.dbias + (i0 + r) * t.n + v * 16;
        store_ps(at, m, _mm512_add_ps(load_ps(at, m), g[r]));
      }
      if (t.cosine) {
        const __m512 gx = _mm512_mul_ps(g[r], _mm512_loadu_ps(s.logits.data() + r * npad + v * 16));
        a[r] = _mm512_add_ps(a[r], gx);
        b = _mm512_add_ps(b, gx);
        store_bf16(s.grads.data() + (i0 + r) * npad + v * 16, _mm512_mul_ps(g[r], key_scale));
      } else {
        store_bf16(s.grads.data() + (i0 + r) * npad + v * 16, g[r]);
      }
    }
    if (t.cosine) {
      float* col = s.col_b.data() + v * 16;
      _mm512_storeu_ps(col, _mm512_add_ps(_mm512_loadu_ps(col), b));
    }
    // Rows 2k and 2k+1 as the words of pair i0 / 2 + k.
    for (int k = 0; 2 * k < R; ++k) {
      const __m512 zero = _mm512_setzero_ps();
      const __m512 p_hi = 2 * k + 1 < R ? p[2 * k + 1] : zero;
      __m512 g_lo = g[2 * k], g_hi = 2 * k + 1 < R ? g[2 * k + 1] : zero;
      if (t.cosine) {
        g_lo = _mm512_mul_ps(g_lo, rq[2 * k]);
        if (2 * k + 1 < R) g_hi = _mm512_mul_ps(g_hi, rq[2 * k + 1]);
      }
      const int64_t at = (i0 / 2 + k) * npad + v * 16;
      _mm512_storeu_si512(s.probs_w.data() + at, pair_words(p[2 * k], p_hi));
      _mm512_storeu_si512(s.grads_w.data() + at, pair_words(g_lo, g_hi));
    }
  }
  if (t.cosine)
    for (int r = 0; r < R; ++r) s.row_a[i0 + r] = _mm512_reduce_add_ps(a[r]);
}

// out[r, c0*16 : (c0+C)*16] = factor[r] * (a[r] . b) - corr[r] * x[r] in bf16 for R rows and C vectors of 16
// channels (no second term without corr); a (row stride a_stride, pair stride a_step) and b as in dot_block, b
// with row stride d.
template <int R, int C>
MMSWIN_AVX512_BF16 inline void row_grads(const uint32_t* a, int64_t a_stride, int64_t a_step, const uint32_t* b,
                                         int64_t d, int64_t pairs, int64_t c0, const float* factor, const float* corr,
                                         const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t out_stride) {
  __m512 acc[R][C];
  dot_block<R, C>(a, a_stride, b, d, pairs, c0, acc, a_step);
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(factor[r]);
    for (int cv = 0; cv < C; ++cv) {
      __m512 y = _mm512_mul_ps(acc[r][cv], f);
      if (corr != nullptr)
        y = _mm512_fnmadd_ps(_mm512_set1_ps(corr[r]), load_bf16(x + r * x_stride + (c0 + cv) * 16, 0xFFFF), y);
      store_bf16(out + r * out_stride + (c0 + cv) * 16, y);
    }
  }
}

template <int R>
MMSWIN_AVX512_BF16 void block_grads(const uint32_t* a, int64_t a_stride, int64_t a_step, const uint32_t* b,
                                    int64_t d, int64_t pairs, const float* factor, const float* corr,
                                    const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t out_stride) {
  int64_t c0 = 0;
  for (; c0 + 2 <= d / 16; c0 += 2)
    row_grads<R, 2>(a, a_stride, a_step, b, d, pairs, c0, factor, corr, x, x_stride, out, out_stride);
  if (c0 < d / 16)
    row_grads<R, 1>(a, a_stride, a_step, b, d, pairs, c0, factor, corr, x, x_stride, out, out_stride);
}

// block_grads over rows 0 .. n-1 of a in blocks of kGradRows (then 4, 2, 1); row i's factor and corr at
// factor[i], corr[i].
MMSWIN_AVX512_BF16 void all_grads(int64_t n, const uint32_t* a, int64_t a_stride, int64_t a_step, const uint32_t* b,
                                  int64_t d, int64_t pairs, const float* factor, const float* corr, const uint16_t* x,
                                  int64_t x_stride, uint16_t* out, int64_t out_stride) {
  auto at = [&](int64_t row) { return corr != nullptr ? corr + row : nullptr; };
  auto rows = [&](auto block, int64_t i) {
    block_grads<decltype(block)::value>(a + i * a_stride, a_stride, a_step, b, d, pairs, factor + i, at(i),
                                        x + i * x_stride, x_stride, out + i * out_stride, out_stride);
  };
  int64_t i = 0;
  for (; i + kGradRows <= n; i += kGradRows) rows(std::integral_constant<int, kGradRows>{}, i);
  if (i + 4 <= n) rows(std::integral_constant<int, 4>{}, i), i += 4;
  if (i + 2 <= n) rows(std::integral_constant<int, 2>{}, i), i += 2;
  if (i < n) rows(std::integral_constant<int, 1>{}, i);
}

// 1 / max(|x_i|, eps) of n rows into scales, and into corr that squared where |x_i| >= eps, else 0.
MMSWIN_AVX512_BF16 void row_scales(const uint16_t* x, int64_t stride, int64_t n, int64_t d, float* scales,
                                   float* corr) {
  for (int64_t i = 0; i < n; ++i) {
    const float length = std::sqrt(squared_length(x + i * stride, d));
    scales[i] = 1.0f / std::max(length, kNormEps);
    corr[i] = length >= kNormEps ? scales[i] * scales[i] : 0.0f;
  }
}

// The gradients of one window and head; returns sum_i a_i (cosine attention, else 0).
MMSWIN_AVX512_BF16 float head_grads(const Task& t, Scratch& s) {
  const int64_t n = t.n, npad = t.npad, d = t.d, c = t.c, stride = 3 * c, pairs = (n + 1) / 2;
  const uint16_t* k = t.q + c;
  const uint16_t* v = t.q + 2 * c;
  pack_columns(k, stride, n, npad, d, s.keys.data());
  pack_columns(v, stride, n, npad, d, s.values.data());
  pack_row_pairs(t.q, stride, n, d, s.q_pairs.data());
  pack_row_pairs(k, stride, n, d, s.k_pairs.data());
  pack_row_pairs(t.g, c, n, d, s.g_pairs.data());
  if (t.cosine) {
    row_scales(t.q, stride, n, d, s.q_scale.data(), s.q_corr.data());
    row_scales(k, stride, n, d, s.k_scale.data(), s.k_corr.data());
    std::fill(s.k_scale.begin() + n, s.k_scale.end(), 0.0f);
    std::fill(s.col_b.begin(), s.col_b.end(), 0.0f);
  }
  int64_t i = 0;
  for (; i + kRows <= n; i += kRows) logit_grads<kRows>(t, i, s);
  switch (n - i) {
    case 3: logit_grads<3>(t, i, s); break;
    case 2: logit_grads<2>(t, i, s); break;
    case 1: logit_grads<1>(t, i, s); break;
    default: break;
  }
  // Per-row factors and correction terms of the products, in the fp32 rows that are free now.
  float* q_factor = s.logits.data();  // kRows * npad >= n floats each
  float* k_factor = s.dp.data();
  float* unit = s.probs.data();
  float* q_corr = nullptr;
  float* k_corr = nullptr;
  float a_sum = 0.0f;
  for (int64_t r = 0; r < n; ++r) {
    q_factor[r] = t.scale * (t.cosine ? s.q_scale[r] : 1.0f);
    k_factor[r] = t.scale * (t.cosine ? s.k_scale[r] : 1.0f);
    unit[r] = 1.0f;
  }
  if (t.cosine) {
    for (int64_t r = 0; r < n; ++r) {
      a_sum += s.row_a[r];
      s.q_corr[r] *= s.row_a[r];
      s.k_corr[r] *= s.col_b[r];
    }
    q_corr = s.q_corr.data();
    k_corr = s.k_corr.data();
  }
  // dv = P^T dO, dk = scale (dS rq)^T q (- b rk^2 k), dq = scale (dS rk) k (- a rq^2 q). Row j of P^T and of
  // (dS rq)^T is column j of the words of pairs of rows: read in place, pair p at p * npad.
  all_grads(n, s.probs_w.data(), 1, npad, s.g_pairs.data(), d, pairs, unit, nullptr, nullptr, 0, t.dq + 2 * c,
            stride);
  all_grads(n, s.grads_w.data(), 1, npad, s.q_pairs.data(), d, pairs, k_factor, k_corr, k, stride, t.dq + c,
            stride);
  all_grads(n, reinterpret_cast<const uint32_t*>(s.grads.data()), npad / 2, 1, s.k_pairs.data(), d, pairs,
            q_factor, q_corr, t.q, stride, t.dq, stride);
  return a_sum;
}

// Head hd's gradients of one window of window_attention_rows_backward: qkv, grad and dqkv at the head's first
// channel of image's rows (3C, C and 3C apart), lse at its first (nH apart), pad at the head's channel,
// pad_sums (3C) at the head's channel; t holds the window's bias, mask, scale and sizes.
MMSWIN_AVX512_BF16 float window_rows_grads(Task t, const int64_t* slot, const uint16_t* qkv, const uint16_t* grad,
                                           const float* lse, int64_t heads, const uint16_t* pad, int64_t c,
                                           uint16_t* dqkv, float* pad_sums, Scratch& s) {
  const int64_t n = t.n, d = t.d;
  // No padding, the window's rows in order: the gradients from and to them in place.
  if (mmswin::consecutive_slots(slot, n)) {
    t.q = qkv + slot[0] * 3 * c;
    t.g = grad + slot[0] * c;
    t.lse = lse + slot[0] * heads;
    t.lse_stride = heads;
    t.c = c;
    t.dq = dqkv + slot[0] * 3 * c;
    return head_grads(t, s);
  }
  for (int64_t i = 0; i < n; ++i) {
    const bool real = slot[i] >= 0;
    const uint16_t* from = real ? qkv + slot[i] * 3 * c : pad;
    for (int part = 0; part < 3; ++part) copy_values(from + part * c, d, s.tokens.data() + (3 * i + part) * d);
    if (real) {
      copy_values(grad + slot[i] * c, d, s.token_grads.data() + i * d);
    } else {
      std::fill(s.token_grads.data() + i * d, s.token_grads.data() + (i + 1) * d, uint16_t{0});
    }
    s.token_lse[i] = real ? lse[slot[i] * heads] : std::numeric_limits<float>::infinity();
  }
  t.q = s.tokens.data();
  t.g = s.token_grads.data();
  t.lse = s.token_lse.data();
  t.lse_stride = 1;
  t.c = d;  // the gathered rows: q, k, v of the head side by side
  t.dq = s.dqkv.data();
  const float a_sum = head_grads(t, s);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* from = s.dqkv.data() + 3 * i * d;
    if (slot[i] >= 0) {
      for (int part = 0; part < 3; ++part) copy_values(from + part * d, d, dqkv + slot[i] * 3 * c + part * c);
      continue;
    }
    for (int part = 1; part < 3; ++part)  // a padding position's q gradient is zero: it has no output
      for (int64_t j = 0; j < d; ++j) {
        uint32_t bits = static_cast<uint32_t>(from[part * d + j]) << 16;
        float value;
        std::memcpy(&value, &bits, sizeof value);
        pad_sums[part * c + j] += value;
      }
  }
  return a_sum;
}

// The bias and scale gradients of w.bw windows as sums over `blocks` blocks of them, around the windows'
// gradients: window(t, b, hd, block, s) computes window b's for head hd (t holds its bias and mask rows, scale
// and block sums) and returns its sum_i a_i.
template <typename F>
std::tuple<at::Tensor, at::Tensor> over_blocks(const mmswin::WindowShapes& w, int64_t heads, const at::Tensor& bias,
                                               const c10::optional<at::Tensor>& mask, const at::Tensor& scale,
                                               bool cosine, bool need_bias, bool need_scale, int64_t blocks,
                                               F window) {
  const int64_t n = w.n;
  at::Tensor bias_sums = at::empty({need_bias ? blocks : 0, heads, n, n}, bias.options());
  at::Tensor scale_sums = at::empty({blocks, heads}, scale.options());
  const float* bias_data = bias.data_ptr<float>();
  const float* mask_data = w.nw > 0 ? mask->data_ptr<float>() : nullptr;
  const float* scales = scale.data_ptr<float>();
  float* bias_out = need_bias ? bias_sums.data_ptr<float>() : nullptr;
  float* scale_out = scale_sums.data_ptr<float>();
  const int64_t npad = (n + 15) / 16 * 16;
  at::parallel_for(0, blocks * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, npad, w.d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / heads, hd = task % heads;
      float a_sum = 0.0f;
      if (bias_out != nullptr) std::fill(bias_out + task * n * n, bias_out + (task + 1) * n * n, 0.0f);
      for (int64_t b = block * w.bw / blocks; b < (block + 1) * w.bw / blocks; ++b) {
        const Task t{nullptr, nullptr, nullptr, 1, bias_data + hd * n * n,
                     mask_data ? mask_data + (b % w.nw) * n * n : nullptr, scales[hd], cosine, n, npad, w.d, w.c,
                     nullptr, bias_out ? bias_out + task * n * n : nullptr};
        a_sum += window(t, b, hd, block, s);
      }
      scale_out[task] = scales[hd] > 0.0f ? a_sum / scales[hd] : 0.0f;
    }
  });
  return {need_bias ? mmswin::sum_blocks(bias_sums) : at::Tensor(),
          cosine && need_scale ? mmswin::sum_blocks(scale_sums) : at::Tensor()};
}

#endif  // MMSWIN_X86

}  // namespace

namespace mmswin {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_rows_backward(
    const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& lse, const at::Tensor& slots,
    const at::Tensor& pad, int64_t heads, const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
    const at::Tensor& scale, bool cosine, bool need_bias, bool need_scale) {
  const char* fn = "window_attention_rows_backward";
  const WindowShapes w = check_window_rows(fn, qkv, slots, pad, heads, bias, mask, scale);
  const int64_t n = w.n, c = w.c, d = w.d, rows = qkv.size(1), windows = slots.numel() / n;
  TORCH_CHECK(is_cpu_contiguous(grad, at::kBFloat16) && grad.sizes() == at::IntArrayRef({qkv.size(0), rows, c}),
              fn, ": grad must be a contiguous (B, R, C) = (", qkv.size(0), ", ", rows, ", ", c,
              ") bf16 CPU tensor, got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(is_cpu_contiguous(lse, at::kFloat) && lse.sizes() == at::IntArrayRef({qkv.size(0), rows, heads}),
              fn, ": lse must be the forward's contiguous (B, R, nH) = (", qkv.size(0), ", ", rows, ", ", heads,
              ") fp32 CPU tensor, got ", lse.sizes(), " ", lse.scalar_type());
  at::Tensor grad_qkv = at::empty_like(qkv);
  const int64_t blocks = std::max<int64_t>(1, std::min(kBlocks, w.bw));
  at::Tensor pad_sums = at::zeros({blocks, 3 * c}, scale.options());
  at::Tensor grad_bias, grad_scale;
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  const auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  const auto* pad_data = reinterpret_cast<const uint16_t*>(pad.data_ptr<at::BFloat16>());
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  auto* dst = reinterpret_cast<uint16_t*>(grad_qkv.data_ptr<at::BFloat16>());
  const float* lse_data = lse.data_ptr<float>();
  float* pad_out = pad_sums.data_ptr<float>();
  std::tie(grad_bias, grad_scale) = over_blocks(
      w, heads, bias, mask, scale, cosine, need_bias, need_scale, blocks,
      [&](const Task& t, int64_t b, int64_t hd, int64_t block, Scratch& s) {
        const int64_t image = b / windows;
        return window_rows_grads(t, slot_data + (b % windows) * n, src + image * rows * 3 * c + hd * d,
                                 g + image * rows * c + hd * d, lse_data + image * rows * heads + hd, heads,
                                 pad_data + hd * d, c, dst + image * rows * 3 * c + hd * d,
                                 pad_out + block * 3 * c + hd * d, s);
      });
#endif
  return {grad_qkv, sum_blocks(pad_sums), grad_bias, grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& lse, int64_t heads, const at::Tensor& bias,
    const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine, bool need_bias, bool need_scale) {
  const char* fn = "window_attention_backward";
  const WindowShapes w = check_window_attention(fn, qkv, heads, bias, mask, scale);
  const int64_t n = w.n, c = w.c, d = w.d;
  TORCH_CHECK(is_cpu_contiguous(grad, at::kBFloat16) && grad.sizes() == at::IntArrayRef({w.bw, n, c}),
              fn, ": grad must be a contiguous (B*nW, N, C) = (", w.bw, ", ", n, ", ", c,
              ") bf16 CPU tensor, got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(is_cpu_contiguous(lse, at::kFloat) && lse.sizes() == at::IntArrayRef({w.bw, heads, n}),
              fn, ": lse must be the forward's contiguous (B*nW, nH, N) = (", w.bw, ", ", heads, ", ", n,
              ") fp32 CPU tensor, got ", lse.sizes(), " ", lse.scalar_type());
  at::Tensor grad_qkv = at::empty_like(qkv);
  at::Tensor grad_bias, grad_scale;
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  const auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(grad_qkv.data_ptr<at::BFloat16>());
  const float* lse_data = lse.data_ptr<float>();
  std::tie(grad_bias, grad_scale) = over_blocks(
      w, heads, bias, mask, scale, cosine, need_bias, need_scale, std::max<int64_t>(1, std::min(kBlocks, w.bw)),
      [&](Task t, int64_t b, int64_t hd, int64_t, Scratch& s) {
        t.q = src + b * n * 3 * c + hd * d;
        t.g = g + b * n * c + hd * d;
        t.lse = lse_data + (b * heads + hd) * n;
        t.lse_stride = 1;
        t.dq = dst + b * n * 3 * c + hd * d;
        return head_grads(t, s);
      });
#endif
  return {grad_qkv, grad_bias, grad_scale};
}

}  // namespace mmswin
