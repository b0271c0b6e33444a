// Layer norm over the last axis for CPU bf16 inference: x (..., C) bf16 contiguous, weight and bias (C,)
// fp32 or none. Per row, the mean and then the mean squared deviation in fp32 (two passes over a row that
// stays in L1), and y = (x * rstd - mean * rstd) * weight + bias rounded to bf16 once, as PyTorch's
// mixed-precision layer norm computes it.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef MMSWIN_X86
#include <immintrin.h>
#endif

namespace {

#ifdef MMSWIN_X86

MMSWIN_AVX512_BF16 inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

MMSWIN_AVX512_BF16 inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// R rows at a time: their reductions are independent chains that the CPU overlaps (one row alone waits on
// the latency of its sums).
template <int R>
MMSWIN_AVX512_BF16 void normalise_rows(const uint16_t* x, const float* weight, const float* bias, int64_t c,
                                       float eps, uint16_t* y) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = lanes(c - i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_add_ps(acc[r], load_bf16(x + r * c + i, m));
  }
  __m512 centre[R];
  for (int r = 0; r < R; ++r) {
    centre[r] = _mm512_set1_ps(_mm512_reduce_add_ps(acc[r]) / static_cast<float>(c));
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = lanes(c - i);
    for (int r = 0; r < R; ++r) {
      const __m512 dev = _mm512_maskz_sub_ps(m, load_bf16(x + r * c + i, m), centre[r]);
      acc[r] = _mm512_fmadd_ps(dev, dev, acc[r]);
    }
  }
  __m512 scale[R], shift[R];
  for (int r = 0; r < R; ++r) {
    const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc[r]) / static_cast<float>(c) + eps);
    scale[r] = _mm512_set1_ps(rstd);
    shift[r] = _mm512_mul_ps(centre[r], _mm512_set1_ps(-rstd));
  }
  for (int64_t i = 0; i < c; i += 16) {
    const __mmask16 m = lanes(c - i);
    const __m512 w = weight != nullptr ? _mm512_maskz_loadu_ps(m, weight + i) : _mm512_set1_ps(1.0f);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + i) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_fmadd_ps(_mm512_fmadd_ps(load_bf16(x + r * c + i, m), scale[r], shift[r]), w, b);
      _mm256_mask_storeu_epi16(y + r * c + i, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

constexpr int kRows = 4;

MMSWIN_AVX512_BF16 void normalise(const uint16_t* x, const float* weight, const float* bias, int64_t c,
                                  float eps, uint16_t* y, int64_t rows) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) normalise_rows<kRows>(x + r * c, weight, bias, c, eps, y + r * c);
  for (; r < rows; ++r) normalise_rows<1>(x + r * c, weight, bias, c, eps, y + r * c);
}

#endif  // MMSWIN_X86

const float* affine_data(const c10::optional<at::Tensor>& t, int64_t c, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 &&
                  t->size(0) == c,
              "layer_norm: ", name, " must be a contiguous (C,) = (", c, ",) fp32 CPU tensor, got ", t->sizes(),
              " ", t->scalar_type());
  return t->data_ptr<float>();
}

}  // namespace

namespace mmswin {

at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(kernels_available(), "layer_norm needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.is_contiguous(),
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
    normalise(src + begin * c, w, b, c, e, dst + begin * c, end - begin);
  });
#endif
  return out;
}

}  // namespace mmswin
