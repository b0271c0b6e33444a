// CPU bf16 window attention with its qkv projection over chunks of windows of each image, the chunks shared out
// among the threads: each thread runs whole chunks (each product on one thread) instead of every step being split
// between all of them.
// - Training's forward projects a chunk's real tokens and attends its windows, keeping the chunk's projection and
//   log-sum-exp; the backward runs the attention's backward, then the projection's two products and bias sum.
//   Each chunk's weight and bias gradients are summed over the chunks in order in fp32 after the parallel part.
// - Inference's attention half of a block runs in place on the map's tokens: a chunk's rows gathered (and
//   normalised), projected, attended, projected again and added back (normalised), the chunks' rows disjoint.
// The values are those of the chunk-by-chunk passes, the same on any number of threads.
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

// Checks a projection's weight (out, in) and bias (out,) or none: contiguous bf16 CPU tensors, or (where packed
// may be) the weight packed by pack_tile_pairs.
void check_projection(const char* fn, const char* weight_name, const char* bias_name, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, int64_t out, int64_t in, bool packed = false) {
  if (packed && weight.scalar_type() == at::kInt) {
    TORCH_CHECK(amx_available(), fn, ": a packed ", weight_name, " needs a CPU with AMX-BF16");
    TORCH_CHECK(is_cpu_contiguous(weight, at::kInt) && out % 32 == 0 && in % 32 == 0 &&
                    weight.sizes() == at::IntArrayRef({out / 16, in / 32, 16, 16}),
                fn, ": ", weight_name, " packed by pack_tile_pairs must be the contiguous (", out / 16, ", ", in / 32,
                ", 16, 16) int32 packing of an (", out, ", ", in, ") weight (both multiples of 32), got ",
                weight.sizes());
  } else {
    TORCH_CHECK(is_cpu_contiguous(weight, at::kBFloat16) && weight.sizes() == at::IntArrayRef({out, in}), fn, ": ",
                weight_name, " must be a contiguous (", out, ", ", in, ") bf16 CPU tensor", packed ? " or its "
                "packing by pack_tile_pairs" : "", ", got ", weight.sizes(), " ", weight.scalar_type());
  }
  TORCH_CHECK(!bias.has_value() || (is_cpu_contiguous(*bias, at::kBFloat16) && bias->sizes() == at::IntArrayRef({out})),
              fn, ": ", bias_name, " must be None or a contiguous (", out, ",) bf16 CPU tensor");
}

}  // namespace

at::Tensor& window_attention_rows_(at::Tensor& x, const std::vector<at::Tensor>& rows,
                                   const std::vector<at::Tensor>& slots, const std::vector<at::Tensor>& masks,
                                   const c10::optional<at::Tensor>& norm_weight,
                                   const c10::optional<at::Tensor>& norm_bias, double eps, bool post_norm,
                                   const at::Tensor& qkv_weight, const c10::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
                                   const at::Tensor& scale, bool cosine, const at::Tensor& proj_weight,
                                   const c10::optional<at::Tensor>& proj_bias) {
  const char* fn = "window_attention_rows_";
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 3, fn,
              ": x must be a contiguous (B, L, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t images = x.size(0), tokens = x.size(1), c = x.size(2);
  check_norm(fn, norm_weight, norm_bias, eps, c);
  check_projection(fn, "qkv_weight", "qkv_bias", qkv_weight, qkv_bias, 3 * c, c, true);
  check_projection(fn, "proj_weight", "proj_bias", proj_weight, proj_bias, c, c, true);
  const int64_t chunks = static_cast<int64_t>(slots.size());
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == chunks, fn, ": rows and slots must hold one tensor per chunk, got ",
              rows.size(), " and ", chunks);
  TORCH_CHECK(masks.empty() || static_cast<int64_t>(masks.size()) == chunks, fn, ": masks must be empty or one per "
              "chunk (", chunks, "), got ", masks.size());
  // Every check before any row is written: the chunks update x in parallel, each only its own rows.
  std::vector<char> named(tokens, 0);
  for (int64_t k = 0; k < chunks; ++k) {
    const at::Tensor& index = rows[k];
    TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                    index.is_contiguous(),
                fn, ": rows[", k, "] must be a contiguous (R,) int64 CPU tensor, got ", index.sizes(), " ",
                index.scalar_type());
    const int64_t* idx = index.data_ptr<int64_t>();
    for (int64_t m = 0; m < index.numel(); ++m) {
      TORCH_CHECK(idx[m] >= 0 && idx[m] < tokens, fn, ": rows[", k, "][", m, "] = ", idx[m], " is not a row of x's ",
                  tokens);
      TORCH_CHECK(!named[idx[m]], fn, ": rows name row ", idx[m], " of x twice (again in chunk ", k, ")");
      named[idx[m]] = 1;
    }
    check_window_slots(fn, images, index.numel(), 3 * c, slots[k], pad, heads, bias, chunk_mask(masks, k), scale);
  }
  for_each_chunk(chunks, [&](int64_t k) {
    const int64_t r = rows[k].numel();
    const at::Tensor gathered = gather_rows(x, rows[k], norm_weight, norm_bias, eps, !post_norm);
    const at::Tensor qkv =
        inference_linear(gathered.view({images * r, c}), qkv_weight, qkv_bias).view({images, r, 3 * c});
    const at::Tensor out = window_attention_rows(qkv, slots[k], pad, heads, bias, chunk_mask(masks, k), scale, cosine);
    const at::Tensor branch = inference_linear(out.view({images * r, c}), proj_weight, proj_bias);
    add_rows_(x, rows[k], branch.view({images, r, c}), norm_weight, norm_bias, eps, post_norm);
  });
  return x;
}

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
    const at::Tensor rows_out = out[image].narrow(0, starts[k], rows).unsqueeze(0);  // written in place
    lse[i] = std::get<1>(window_attention_rows_with_lse(qkv[i], slots[k], pad, heads, bias, chunk_mask(masks, k),
                                                        scale, cosine, rows_out));
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
