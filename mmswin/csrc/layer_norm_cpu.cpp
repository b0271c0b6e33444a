// Layer norm over the last axis for CPU bf16 inference: x (..., C) bf16 contiguous, weight and bias (C,)
// fp32 or none. Per row, the mean and then the mean squared deviation in fp32 (two passes over a row that
// stays in L1), and y = (x * rstd - mean * rstd) * weight + bias rounded to bf16 once, as PyTorch's
// mixed-precision layer norm computes it.
//
// The same rows serve the window chunks of a Swin block's inference, where tokens (B, L, C) are read and
// updated through an index of M rows (-1: a position that pads the map):
//   gather_rows:  out[b, m] = norm(x[b, index[m]]) (or the row as it is), zero where index[m] < 0;
//   add_rows_:    x[b, index[m]] += norm(src[b, m]) (or src[b, m]) where index[m] >= 0, the summand rounded
//                 to bf16 first, as adding a bf16 branch would.
// A backbone output (B, H, W, C) becomes its normalised (B, C, H, W) map in one pass:
//   layer_norm_channels_first: out[b, c, l] = norm(x[b, l])[c], tiles of 32 tokens normalised into a
//                 scratch and transposed from there by 16 x 16 blocks in registers (_with_stats: also the
//                 rows' means and 1 / stds, for layer_norm_backward).
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

#ifdef MMSWIN_X86

using namespace mmswin::simd;

// R rows at a time: their reductions are independent chains that the CPU overlaps (one row alone waits on
// the latency of its sums). Row r is read from x[r] and written to (or, with kAdd, added to) y[r]; with
// stats, its mean and 1 / std go to stats[2r], stats[2r + 1] (for the backward pass).
template <int R, bool kAdd>
MMSWIN_AVX512_BF16 void normalise_rows(const uint16_t* const* x, const float* weight, const float* bias,
                                       int64_t c, float eps, uint16_t* const* y, float* stats = nullptr) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = first_lanes(c - i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_add_ps(acc[r], load_bf16(x[r] + i, m));
  }
  __m512 centre[R];
  for (int r = 0; r < R; ++r) {
    centre[r] = _mm512_set1_ps(_mm512_reduce_add_ps(acc[r]) / static_cast<float>(c));
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = first_lanes(c - i);
    for (int r = 0; r < R; ++r) {
      const __m512 dev = _mm512_maskz_sub_ps(m, load_bf16(x[r] + i, m), centre[r]);
      acc[r] = _mm512_fmadd_ps(dev, dev, acc[r]);
    }
  }
  __m512 scale[R], shift[R];
  for (int r = 0; r < R; ++r) {
    const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc[r]) / static_cast<float>(c) + eps);
    scale[r] = _mm512_set1_ps(rstd);
    shift[r] = _mm512_mul_ps(centre[r], _mm512_set1_ps(-rstd));
    if (stats != nullptr) {
      stats[2 * r] = _mm512_cvtss_f32(centre[r]);
      stats[2 * r + 1] = rstd;
    }
  }
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = first_lanes(c - i);
    const __m512 w = weight != nullptr ? load_ps(weight + i, m) : _mm512_set1_ps(1.0f);
    const __m512 b = bias != nullptr ? load_ps(bias + i, m) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m256i v = round_bf16(
          _mm512_fmadd_ps(_mm512_fmadd_ps(load_bf16(x[r] + i, m), scale[r], shift[r]), w, b));
      if (kAdd) {
        const __m512 sum = _mm512_add_ps(widen_bf16(v),
                                         load_bf16(y[r] + i, m));
        v = round_bf16(sum);
      }
      store_bf16_bits(y[r] + i, m, v);
    }
  }
}

// y[r] += x[r] for one row of c bf16 values, summed in fp32 and rounded once.
MMSWIN_AVX512_BF16 void add_row(const uint16_t* x, int64_t c, uint16_t* y) {
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = first_lanes(c - i);
    const __m512 sum = _mm512_add_ps(load_bf16(x + i, m), load_bf16(y + i, m));
    store_bf16_bits(y + i, m, round_bf16(sum));
  }
}

constexpr int kRows = 4;

// Normalises the rows pushed (a source and a destination each) kRows at a time; flush() the rest.
template <bool kAdd>
class RowBlocks {
 public:
  RowBlocks(const float* weight, const float* bias, int64_t c, float eps)
      : weight_(weight), bias_(bias), c_(c), eps_(eps) {}

  MMSWIN_AVX512_BF16 void push(const uint16_t* x, uint16_t* y) {
    x_[count_] = x;
    y_[count_] = y;
    if (++count_ == kRows) flush();
  }

  MMSWIN_AVX512_BF16 void flush() {
    if (count_ == kRows) {
      normalise_rows<kRows, kAdd>(x_, weight_, bias_, c_, eps_, y_);
    } else {
      for (int r = 0; r < count_; ++r) normalise_rows<1, kAdd>(x_ + r, weight_, bias_, c_, eps_, y_ + r);
    }
    count_ = 0;
  }

 private:
  const float* weight_;
  const float* bias_;
  int64_t c_;
  float eps_;
  const uint16_t* x_[kRows];
  uint16_t* y_[kRows];
  int count_ = 0;
};

// Contiguous rows, kRows at a time; with stats, (rows, 2) means and 1 / stds.
MMSWIN_AVX512_BF16 void normalise(const uint16_t* x, const float* weight, const float* bias, int64_t c,
                                  float eps, uint16_t* y, int64_t rows, float* stats) {
  const uint16_t* xs[kRows];
  uint16_t* ys[kRows];
  int64_t r = 0;
  for (; r < rows; r += kRows) {
    const int count = static_cast<int>(std::min<int64_t>(kRows, rows - r));
    for (int i = 0; i < count; ++i) {
      xs[i] = x + (r + i) * c;
      ys[i] = y + (r + i) * c;
    }
    float* st = stats != nullptr ? stats + 2 * r : nullptr;
    if (count == kRows) {
      normalise_rows<kRows, false>(xs, weight, bias, c, eps, ys, st);
    } else {
      for (int i = 0; i < count; ++i)
        normalise_rows<1, false>(xs + i, weight, bias, c, eps, ys + i, st != nullptr ? st + 2 * i : nullptr);
    }
  }
}

constexpr int64_t kTileTokens = 32;  // tokens per tile of layer_norm_channels_first: 64 bytes of each channel

// rows (<= kTileTokens) of c bf16 values (row stride c) transposed into (c, rows) at dst (row stride
// dst_stride). A whole tile whose output rows start on cache lines writes each one's line with a
// non-temporal store: the outputs are the backbone's, which nothing reads before it returns, and plain
// stores would first read each line from memory (96 and more output rows at once defeat the prefetchers).
MMSWIN_AVX512_BF16 void transpose_tile(const uint16_t* src, int64_t rows, int64_t c, uint16_t* dst,
                                       int64_t dst_stride) {
  const bool lines = rows == 32 && reinterpret_cast<uintptr_t>(dst) % 64 == 0 && dst_stride % 32 == 0;
  for (int64_t c0 = 0; c0 < c; c0 += 16) {
    const int64_t cols = std::min<int64_t>(16, c - c0);
    if (lines) {
      __m512i lo[16], hi[16];
      load_transposed_u16(src + c0, c, 16, cols, lo);
      load_transposed_u16(src + 16 * c + c0, c, 16, cols, hi);
      for (int j = 0; j < cols; ++j) {
        const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo[j])),
                                                _mm512_cvtepi32_epi16(hi[j]), 1);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + (c0 + j) * dst_stride), line);
      }
      continue;
    }
    for (int64_t t0 = 0; t0 < rows; t0 += 16)
      transpose_block_u16(src + t0 * c + c0, c, std::min<int64_t>(16, rows - t0), cols,
                          dst + c0 * dst_stride + t0, dst_stride);
  }
}

// The gradient of R rows: with xhat = (x - mean) * rstd and g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// and dy * xhat, dy added to the weight and bias gradients' sums (fp32, C each) where those are wanted.
template <int R>
MMSWIN_AVX512_BF16 void backward_rows(const uint16_t* dy, const uint16_t* x, const float* stats,
                                      const float* weight, int64_t c, uint16_t* dx, float* dw, float* db) {
  __m512 mean[R], rstd[R], sum_g[R], sum_gx[R];
  for (int r = 0; r < R; ++r) {
    mean[r] = _mm512_set1_ps(stats[2 * r]);
    rstd[r] = _mm512_set1_ps(stats[2 * r + 1]);
    sum_g[r] = _mm512_setzero_ps();
    sum_gx[r] = _mm512_setzero_ps();
  }
  if (dx != nullptr) {
    for (int64_t i = 0; i < c; i += 16) {
      const __mmask16 m = first_lanes(c - i);
      const __m512 w = weight != nullptr ? load_ps(weight + i, m) : _mm512_set1_ps(1.0f);
      for (int r = 0; r < R; ++r) {
        const __m512 g = _mm512_mul_ps(load_bf16(dy + r * c + i, m), w);
        const __m512 xhat = _mm512_mul_ps(_mm512_maskz_sub_ps(m, load_bf16(x + r * c + i, m), mean[r]), rstd[r]);
        sum_g[r] = _mm512_add_ps(sum_g[r], g);
        sum_gx[r] = _mm512_fmadd_ps(g, xhat, sum_gx[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      sum_g[r] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g[r]) / static_cast<float>(c));
      sum_gx[r] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx[r]) / static_cast<float>(c));
    }
  }
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = first_lanes(c - i);
    const __m512 w = weight != nullptr ? load_ps(weight + i, m) : _mm512_set1_ps(1.0f);
    __m512 grad_w = dw != nullptr ? load_ps(dw + i, m) : _mm512_setzero_ps();
    __m512 grad_b = db != nullptr ? load_ps(db + i, m) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 d = load_bf16(dy + r * c + i, m);
      const __m512 xhat = _mm512_mul_ps(_mm512_maskz_sub_ps(m, load_bf16(x + r * c + i, m), mean[r]), rstd[r]);
      grad_w = _mm512_fmadd_ps(d, xhat, grad_w);
      grad_b = _mm512_add_ps(grad_b, d);
      if (dx != nullptr) {
        const __m512 g = _mm512_mul_ps(d, w);
        const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(g, sum_g[r]), _mm512_mul_ps(xhat, sum_gx[r])),
                                       rstd[r]);
        store_bf16_bits(dx + r * c + i, m, round_bf16(v));
      }
    }
    if (dw != nullptr) store_ps(dw + i, m, grad_w);
    if (db != nullptr) store_ps(db + i, m, grad_b);
  }
}

#endif  // MMSWIN_X86

const float* affine_data(const c10::optional<at::Tensor>& t, int64_t c, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(mmswin::is_cpu_contiguous(*t, at::kFloat) && t->dim() == 1 && t->size(0) == c,
              "layer_norm: ", name, " must be a contiguous (C,) = (", c, ",) fp32 CPU tensor, got ", t->sizes(),
              " ", t->scalar_type());
  return t->data_ptr<float>();
}

// The arguments of gather_rows and add_rows_, checked: tokens (B, L, C) bf16, index (M,) int64 of rows
// below L, and the norm's (when normalise).
struct RowArgs {
  int64_t b, l, c, m;
  const float* weight;
  const float* bias;
  float eps;
};

RowArgs row_args(const char* fn, const at::Tensor& x, const at::Tensor& index,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                 bool normalise) {
  TORCH_CHECK(mmswin::kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(mmswin::is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 3 && x.size(2) >= 1,
              fn, ": x must be a contiguous (B, L, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                  index.is_contiguous(),
              fn, ": index must be a contiguous (M,) int64 CPU tensor, got ", index.sizes(), " ",
              index.scalar_type());
  TORCH_CHECK(eps >= 0, fn, ": eps must not be negative, got ", eps);
  const int64_t l = x.size(1), c = x.size(2);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t m = 0; m < index.numel(); ++m)
    TORCH_CHECK(idx[m] < l, fn, ": index[", m, "] = ", idx[m], " is not a row of x's ", l);
  return {x.size(0), l, c, index.numel(), normalise ? affine_data(weight, c, "weight") : nullptr,
          normalise ? affine_data(bias, c, "bias") : nullptr, static_cast<float>(eps)};
}

}  // namespace

namespace mmswin {

void layer_norm_rows(const at::BFloat16* x, int64_t rows, int64_t c, const float* weight, const float* bias,
                     float eps, at::BFloat16* y, float* stats) {
#ifdef MMSWIN_X86
  normalise(reinterpret_cast<const uint16_t*>(x), weight, bias, c, eps, reinterpret_cast<uint16_t*>(y), rows, stats);
#endif
}

void layer_norm_backward_rows(const at::BFloat16* dy, const at::BFloat16* x, const float* stats, const float* weight,
                              int64_t rows, int64_t c, at::BFloat16* dx, float* dw, float* db) {
#ifdef MMSWIN_X86
  const auto* g = reinterpret_cast<const uint16_t*>(dy);
  const auto* src = reinterpret_cast<const uint16_t*>(x);
  auto* out = reinterpret_cast<uint16_t*>(dx);
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    backward_rows<kRows>(g + r * c, src + r * c, stats + 2 * r, weight, c, out ? out + r * c : nullptr, dw, db);
  for (; r < rows; ++r)
    backward_rows<1>(g + r * c, src + r * c, stats + 2 * r, weight, c, out ? out + r * c : nullptr, dw, db);
#endif
}

at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(kernels_available(), "layer_norm needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() >= 1,
              "layer_norm: x must be a contiguous (..., C) bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t c = x.size(-1);
  TORCH_CHECK(c >= 1, "layer_norm: x has no channels");
  TORCH_CHECK(eps >= 0, "layer_norm: eps must not be negative, got ", eps);
  const float* w = affine_data(weight, c, "weight");
  const float* b = affine_data(bias, c, "bias");
  at::Tensor out = at::empty_like(x);
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float e = static_cast<float>(eps);
  const int64_t rows = x.numel() / c;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    normalise(src + begin * c, w, b, c, e, dst + begin * c, end - begin, nullptr);
  });
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> layer_norm_with_stats(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(kernels_available(), "layer_norm_with_stats needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() >= 1 && x.size(-1) >= 1,
              "layer_norm_with_stats: x must be a contiguous (..., C) bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(eps >= 0, "layer_norm_with_stats: eps must not be negative, got ", eps);
  const int64_t c = x.size(-1), rows = x.numel() / c;
  const float* w = affine_data(weight, c, "weight");
  const float* b = affine_data(bias, c, "bias");
  at::Tensor out = at::empty_like(x);
  at::Tensor stats = at::empty({rows, 2}, x.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* st = stats.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    normalise(src + begin * c, w, b, c, e, dst + begin * c, end - begin, st + 2 * begin);
  });
#endif
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& stats,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   bool need_x, bool need_weight, bool need_bias) {
  TORCH_CHECK(kernels_available(), "layer_norm_backward needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() >= 1 && x.size(-1) >= 1,
              "layer_norm_backward: x must be a contiguous (..., C) bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  check_gradient_of("layer_norm_backward", grad, x, "x");
  const int64_t c = x.size(-1), rows = x.numel() / c;
  TORCH_CHECK(is_cpu_contiguous(stats, at::kFloat) && stats.sizes() == at::IntArrayRef({rows, 2}),
              "layer_norm_backward: stats must be the contiguous (", rows, ", 2) fp32 means and 1 / stds, got ",
              stats.sizes(), " ", stats.scalar_type());
  const float* w = affine_data(weight, c, "weight");
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  // Weight and bias gradients: fp32 sums over fixed blocks of rows, then over the blocks in order (the
  // same numbers on any number of threads).
  const int64_t blocks = std::min<int64_t>(rows, 64);
  const int64_t per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);
  const bool sums = need_weight || need_bias;
  at::Tensor partial = at::zeros({sums ? blocks : 0, 2, c}, x.options().dtype(at::kFloat));
  const at::BFloat16* dy = grad.data_ptr<at::BFloat16>();
  const at::BFloat16* src = x.data_ptr<at::BFloat16>();
  at::BFloat16* dx = need_x ? grad_x.data_ptr<at::BFloat16>() : nullptr;
  const float* st = stats.data_ptr<float>();
  float* part = sums ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * per_block, end = std::min(rows, begin + per_block);
      float* dw = sums ? part + blk * 2 * c : nullptr;
      float* db = sums ? dw + c : nullptr;
      layer_norm_backward_rows(dy + begin * c, src + begin * c, st + 2 * begin, w, end - begin, c,
                               dx ? dx + begin * c : nullptr, dw, db);
    }
  });
  at::Tensor total = sums ? sum_blocks(partial) : at::Tensor();
  at::Tensor grad_w = need_weight ? total[0] : at::Tensor();
  at::Tensor grad_b = need_bias ? total[1] : at::Tensor();
  return {grad_x, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor> layer_norm_channels_first_with_stats(const at::Tensor& x,
                                                                        const c10::optional<at::Tensor>& weight,
                                                                        const c10::optional<at::Tensor>& bias,
                                                                        double eps) {
  TORCH_CHECK(kernels_available(), "layer_norm_channels_first needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 3 && x.size(2) >= 1,
              "layer_norm_channels_first: x must be a contiguous (B, L, C) bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(eps >= 0, "layer_norm_channels_first: eps must not be negative, got ", eps);
  const int64_t l = x.size(1), c = x.size(2);
  const float* w = affine_data(weight, c, "weight");
  const float* b = affine_data(bias, c, "bias");
  at::Tensor out = at::empty({x.size(0), c, l}, x.options());
  at::Tensor stats = at::empty({x.size(0) * l, 2}, x.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* st = stats.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const int64_t tiles = (l + kTileTokens - 1) / kTileTokens;
  at::parallel_for(0, x.size(0) * tiles, std::max<int64_t>(1, 16384 / (c * kTileTokens)),
                   [&](int64_t begin, int64_t end) {
    LineVector<uint16_t> tile(kTileTokens * c);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / tiles, first = (t % tiles) * kTileTokens;
      const int64_t rows = std::min(kTileTokens, l - first);
      normalise(src + (image * l + first) * c, w, b, c, e, tile.data(), rows, st + 2 * (image * l + first));
      transpose_tile(tile.data(), rows, c, dst + image * c * l + first, l);
    }
    _mm_sfence();  // the non-temporal stores are seen before the tensor is returned
  });
#endif
  return {out, stats};
}

at::Tensor layer_norm_channels_first(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, double eps) {
  return std::get<0>(layer_norm_channels_first_with_stats(x, weight, bias, eps));
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double eps, bool normalise) {
  const RowArgs a = row_args("gather_rows", x, index, weight, bias, eps, normalise);
  const int64_t l = a.l, c = a.c, m = a.m;
  at::Tensor out = at::empty({a.b, m, c}, x.options());
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, a.b * m, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    RowBlocks<false> blocks(a.weight, a.bias, c, a.eps);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = idx[r % m];
      uint16_t* y = dst + r * c;
      if (row < 0) {
        std::fill(y, y + c, uint16_t{0});
      } else if (normalise) {
        blocks.push(src + ((r / m) * l + row) * c, y);
      } else {
        std::copy(src + ((r / m) * l + row) * c, src + ((r / m) * l + row + 1) * c, y);
      }
    }
    blocks.flush();
  });
#endif
  return out;
}

at::Tensor& add_rows_(at::Tensor& x, const at::Tensor& index, const at::Tensor& src,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool normalise) {
  const RowArgs a = row_args("add_rows_", x, index, weight, bias, eps, normalise);
  const int64_t l = a.l, c = a.c, m = a.m;
  TORCH_CHECK(is_cpu_contiguous(src, at::kBFloat16) && src.sizes() == at::IntArrayRef({a.b, m, c}),
              "add_rows_: src must be a contiguous (B, M, C) = (", a.b, ", ", m, ", ", c,
              ") bf16 CPU tensor, got ", src.sizes(), " ", src.scalar_type());
#ifdef MMSWIN_X86
  auto* dst = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* from = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  const int64_t* idx = index.data_ptr<int64_t>();
  // Rows that index names twice would race; Swin's window chunks name each token once.
  at::parallel_for(0, a.b * m, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    RowBlocks<true> blocks(a.weight, a.bias, c, a.eps);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = idx[r % m];
      if (row < 0) continue;
      uint16_t* y = dst + ((r / m) * l + row) * c;
      if (normalise) {
        blocks.push(from + r * c, y);
      } else {
        add_row(from + r * c, c, y);
      }
    }
    blocks.flush();
  });
#endif
  return x;
}

}  // namespace mmswin
