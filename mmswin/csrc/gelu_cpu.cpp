// The exact (erf) GELU in the backward of CPU bf16 training's MLP, which keeps fc1's output h and recomputes
// the activation there: one pass over h (rows, H) and the activation's gradient g (rows, H), both bf16, gives
//   act    = h Phi(h)                     (for fc2's weight gradient),
//   grad_h = g (Phi(h) + h phi(h))        (fc1's output gradient),
// rounded to bf16 once from fp32, and optionally the fp32 column sums of grad_h (fc1's bias gradient) over a
// fixed number of blocks of rows, added in order: the same on any number of threads. Phi is the standard
// normal distribution, Phi(x) = erfc(-x / sqrt(2)) / 2 with erfc by Abramowitz and Stegun's 7.1.26 (the
// approximation PyTorch's vectorised erf takes, absolute error below 1.5e-7), phi its density.
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kBlocks = 64;

#ifdef MMSWIN_X86

using namespace mmswin::simd;

// act and grad_h of 16 values (see the top of the file).
MMSWIN_AVX512_BF16 inline void gelu_and_grad(__m512 h, __m512 g, __m512& act, __m512& grad) {
  __m512 gauss;
  const __m512 cdf = normal_cdf(h, gauss);
  act = _mm512_mul_ps(h, cdf);
  const __m512 density = _mm512_mul_ps(gauss, _mm512_set1_ps(0.3989422804014327f));  // 1 / sqrt(2 pi)
  grad = _mm512_mul_ps(g, _mm512_fmadd_ps(h, density, cdf));
}

// V vectors of 16 columns from column i0 (lanes `last` of the last one) of rows begin .. end-1: act and grad_h,
// and the columns' sums of grad_h added to col (unless null). The sums stay in registers over the rows (summed
// in row order, as a sum over the rows of grad_h would take them), not loaded and stored back row by row.
template <int V>
MMSWIN_AVX512_BF16 void gelu_columns(const uint16_t* h, const uint16_t* grad, int64_t begin, int64_t end,
                                     int64_t width, int64_t i0, __mmask16 last, uint16_t* act, uint16_t* grad_h,
                                     float* col) {
  __m512 sums[V];
  for (int v = 0; v < V; ++v) sums[v] = _mm512_setzero_ps();
  for (int64_t r = begin; r < end; ++r) {
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? last : static_cast<__mmask16>(0xFFFF);
      const int64_t at = r * width + i0 + 16 * v;
      __m512 a, g;
      gelu_and_grad(load_bf16(h + at, m), load_bf16(grad + at, m), a, g);
      const __m256i g_bits = round_bf16(g);
      store_bf16_bits(act + at, m, round_bf16(a));
      store_bf16_bits(grad_h + at, m, g_bits);
      sums[v] = _mm512_add_ps(sums[v], widen_bf16(g_bits));  // the bf16 gradient's sum
    }
  }
  if (col == nullptr) return;
  for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? last : static_cast<__mmask16>(0xFFFF);
    float* at = col + i0 + 16 * v;
    store_ps(at, m, _mm512_add_ps(load_ps(at, m), sums[v]));
  }
}

// Rows begin .. end-1 of act and grad_h, and their column sums of grad_h added to col (unless null), 64
// columns at a time.
MMSWIN_AVX512_BF16 void gelu_rows(const uint16_t* h, const uint16_t* grad, int64_t begin, int64_t end,
                                  int64_t width, uint16_t* act, uint16_t* grad_h, float* col) {
  constexpr int kVecs = 4;
  int64_t i0 = 0;
  for (; i0 + 16 * kVecs <= width; i0 += 16 * kVecs)
    gelu_columns<kVecs>(h, grad, begin, end, width, i0, 0xFFFF, act, grad_h, col);
  const int64_t left = (width - i0 + 15) / 16;
  const __mmask16 last = first_lanes(width - i0 - 16 * (left - 1));
  switch (left) {
    case 3: gelu_columns<3>(h, grad, begin, end, width, i0, last, act, grad_h, col); break;
    case 2: gelu_columns<2>(h, grad, begin, end, width, i0, last, act, grad_h, col); break;
    case 1: gelu_columns<1>(h, grad, begin, end, width, i0, last, act, grad_h, col); break;
    default: break;
  }
}

#endif  // MMSWIN_X86

}  // namespace

namespace mmswin {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_backward(const at::Tensor& grad, const at::Tensor& h,
                                                             bool column_sums) {
  TORCH_CHECK(kernels_available(), "gelu_backward needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(h, at::kBFloat16) && h.dim() == 2,
              "gelu_backward: h must be a contiguous (rows, H) bf16 CPU tensor, got ", h.sizes(), " ",
              h.scalar_type());
  check_gradient_of("gelu_backward", grad, h, "h");
  const int64_t rows = h.size(0), width = h.size(1);
  at::Tensor act = at::empty_like(h), grad_h = at::empty_like(h);
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, kBlocks));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  at::Tensor partial = at::empty({column_sums ? blocks : 0, width}, h.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  const auto* dy = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  auto* a_out = reinterpret_cast<uint16_t*>(act.data_ptr<at::BFloat16>());
  auto* g_out = reinterpret_cast<uint16_t*>(grad_h.data_ptr<at::BFloat16>());
  float* sums = column_sums ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      float* col = sums ? sums + blk * width : nullptr;
      if (col != nullptr) std::fill(col, col + width, 0.0f);
      gelu_rows(src, dy, blk * per_block, std::min(rows, (blk + 1) * per_block), width, a_out, g_out, col);
    }
  });
#endif
  return {act, grad_h, column_sums ? mmswin::sum_blocks(partial) : at::Tensor()};
}

}  // namespace mmswin
