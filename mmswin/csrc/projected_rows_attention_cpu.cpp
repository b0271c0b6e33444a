// The forward and backward passes of CPU bf16 training's window attention with its qkv projection, over chunks of
// windows of each image, the chunks shared out among the threads: each thread runs whole chunks instead of
// every step being split between all of them. The forward projects a chunk's real tokens (one product on one
// thread) and attends its windows, keeping the chunk's projection and log-sum-exp; the backward runs the
// attention's backward, then the projection's two products and bias sum. The values are those of the
// chunk-by-chunk passes: each chunk's weight and bias gradients are summed over the chunks in order in fp32
// after the parallel part, the same on any number of threads.
#include "kernels.h"

#include <cstdint>
#include <tuple>
#include <vector>

namespace mmswin {

namespace {

// Checks x (B, L, C) bf16, weight (3C, C) bf16, and the chunks' first rows `starts` and masks; returns the number
// of chunks.
int64_t check_chunks(const char* fn, const at::Tensor& x, const at::Tensor& weight,
                     const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots,
                     const std::vector<at::Tensor>& masks) {
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 3, fn,
              ": x must be a contiguous (B, L, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t tokens = x.size(1), c = x.size(2);
  TORCH_CHECK(is_cpu_contiguous(weight, at::kBFloat16) && weight.sizes() == at::IntArrayRef({3 * c, c}), fn,
              ": weight must be a contiguous (3C, C) = (", 3 * c, ", ", c, ") bf16 CPU tensor, got ", weight.sizes(),
              " ", weight.scalar_type());
  const int64_t chunks = static_cast<int64_t>(slots.size());
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == chunks + 1 && starts.front() == 0 && starts.back() == tokens,
              fn, ": starts must hold the first row of each of the ", chunks, " chunks and then x's ", tokens,
              " rows");
  for (int64_t k = 0; k < chunks; ++k)
    TORCH_CHECK(starts[k] <= starts[k + 1], fn, ": starts must not decrease, got ", starts[k], " then ",
                starts[k + 1]);
  TORCH_CHECK(masks.empty() || static_cast<int64_t>(masks.size()) == chunks, fn, ": masks must be empty or one per "
              "chunk (", chunks, "), got ", masks.size());
  return chunks;
}

c10::optional<at::Tensor> chunk_mask(const std::vector<at::Tensor>& masks, int64_t k) {
  return masks.empty() ? c10::nullopt : c10::optional<at::Tensor>(masks[k]);
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> projected_rows_attention_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& qkv_bias,
    const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots, const std::vector<at::Tensor>& masks,
    const at::Tensor& pad, int64_t heads, const at::Tensor& bias, const at::Tensor& scale, bool cosine,
    bool fused_bias) {
  const char* fn = "projected_rows_attention_forward";
  const int64_t chunks = check_chunks(fn, x, weight, starts, slots, masks);
  TORCH_CHECK(!qkv_bias.has_value() || (is_cpu_contiguous(*qkv_bias, at::kBFloat16) &&
                                        qkv_bias->sizes() == at::IntArrayRef({weight.size(0)})),
              fn, ": qkv_bias must be None or a contiguous (", weight.size(0), ",) bf16 CPU tensor");
  const int64_t images = x.size(0), tasks = images * chunks;
  at::Tensor out = at::empty_like(x);
  std::vector<at::Tensor> qkv(tasks), lse(tasks);
  for_each_chunk(tasks, [&](int64_t i) {
    const int64_t image = i / chunks, k = i % chunks, rows = starts[k + 1] - starts[k];
    qkv[i] = linear_rows(x[image].narrow(0, starts[k], rows), weight, qkv_bias, fused_bias).unsqueeze(0);
    auto [part, part_lse] = window_attention_rows_with_lse(qkv[i], slots[k], pad, heads, bias, chunk_mask(masks, k),
                                                           scale, cosine);
    out[image].narrow(0, starts[k], rows).copy_(part[0]);
    lse[i] = std::move(part_lse);
  });
  return {out, qkv, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> projected_rows_attention_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::vector<at::Tensor>& qkv,
    const std::vector<at::Tensor>& lse, const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots,
    const std::vector<at::Tensor>& masks, const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
    const at::Tensor& scale, bool cosine, bool need_x, bool need_weight, bool need_pad, bool need_bias,
    bool need_scale) {
  const char* fn = "projected_rows_attention_backward";
  const int64_t chunks = check_chunks(fn, x, weight, starts, slots, masks);
  TORCH_CHECK(is_cpu_contiguous(grad, at::kBFloat16) && grad.sizes() == x.sizes(), fn,
              ": grad must be a contiguous bf16 CPU tensor of x's shape ", x.sizes(), ", got ", grad.sizes(), " ",
              grad.scalar_type());
  const int64_t images = x.size(0), c = x.size(2);
  const int64_t tasks = images * chunks;
  TORCH_CHECK(static_cast<int64_t>(qkv.size()) == tasks && static_cast<int64_t>(lse.size()) == tasks, fn,
              ": qkv and lse must hold one tensor per image and chunk (", tasks, "), got ", qkv.size(), " and ",
              lse.size());

  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor parts_w = at::empty({need_weight ? tasks : 0, 3 * c, c}, x.options());
  std::vector<at::Tensor> sums_pad(need_pad ? tasks : 0), pads(need_pad ? tasks : 0);
  std::vector<at::Tensor> biases(need_bias ? tasks : 0), scales(need_scale && cosine ? tasks : 0);
  for_each_chunk(tasks, [&](int64_t i) {
    const int64_t image = i / chunks, k = i % chunks, rows = starts[k + 1] - starts[k];
    const at::Tensor g = grad[image].narrow(0, starts[k], rows).unsqueeze(0);
    auto [grad_qkv, grad_pad, part_bias, part_scale] = window_attention_rows_backward(
        g, qkv[i], lse[i], slots[k], pad, heads, bias, chunk_mask(masks, k), scale, cosine, need_bias, need_scale);
    const at::Tensor rows_grad = grad_qkv[0];  // (rows, 3C)
    if (need_x) {
      at::Tensor out = grad_x[image].narrow(0, starts[k], rows);
      at::mm_out(out, rows_grad, weight);
    }
    if (need_weight) {
      at::Tensor part = parts_w[i];
      at::mm_out(part, rows_grad.t(), x[image].narrow(0, starts[k], rows));
    }
    if (need_pad) {  // the projection's bias: the rows' gradients, and the padding positions' (zero tokens)
      sums_pad[i] = rows_grad.sum(0);
      pads[i] = grad_pad;
    }
    if (need_bias) biases[i] = part_bias;
    if (need_scale && cosine) scales[i] = part_scale;
  });
  at::Tensor grad_pad;
  for (int64_t i = 0; i < static_cast<int64_t>(sums_pad.size()); ++i) {
    if (i == 0)
      grad_pad = sums_pad[0].to(at::kFloat);
    else
      accumulate_(grad_pad, sums_pad[i]);
    grad_pad.add_(pads[i]);
  }
  return {grad_x, sum_chunks(parts_w), grad_pad, sum_in_order(biases), sum_in_order(scales)};
}

}  // namespace mmswin
