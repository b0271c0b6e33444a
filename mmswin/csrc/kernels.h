// mmswin's CPU kernels: what the Python module (module.cpp) exposes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMSWIN_X86 1
#define MMSWIN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace mmswin {

// Whether this CPU runs the kernels (x86 with AVX512-BF16).
bool kernels_available();

at::Tensor window_attention(const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine);

at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor> layer_norm_with_stats(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& stats,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   bool need_x, bool need_weight, bool need_bias);

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double eps, bool normalise);

at::Tensor& add_rows_(at::Tensor& x, const at::Tensor& index, const at::Tensor& src,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool normalise);

}  // namespace mmswin
