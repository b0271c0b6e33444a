// The backward pass of CPU bf16 training's MLP, fc2(gelu(fc1(x))), over the chunks of tokens that the forward
// kept fc1's output h in, the chunks shared out among the threads: each thread runs whole chunks (the four
// products, each on one thread, and the GELU's gradient) instead of every product being split between all of
// them. On two cores oneDNN scales these products 1.6-1.8x from one thread to two; whole chunks per thread
// scale them as far as the chunks balance. The values are those of the chunk-by-chunk pass: each chunk's
// weight gradients are its bf16 products, summed over the chunks in order in fp32 after the parallel part,
// the same on any number of threads.
#include "kernels.h"

#include <cstdint>
#include <tuple>
#include <vector>

namespace mmswin {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& hidden, const at::Tensor& w1,
    const at::Tensor& w2, bool need_x, bool need_w1, bool need_b1, bool need_w2) {
  TORCH_CHECK(kernels_available(), "gelu_mlp_backward needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 2,
              "gelu_mlp_backward: x must be a contiguous (tokens, C) bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t tokens = x.size(0), c = x.size(1);
  TORCH_CHECK(is_cpu_contiguous(grad_out, at::kBFloat16) && grad_out.sizes() == x.sizes(),
              "gelu_mlp_backward: grad_out must be a contiguous bf16 CPU tensor of x's shape ", x.sizes(), ", got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(is_cpu_contiguous(w1, at::kBFloat16) && w1.dim() == 2 && w1.size(1) == c,
              "gelu_mlp_backward: w1 must be a contiguous (H, ", c, ") bf16 CPU tensor, got ", w1.sizes(), " ",
              w1.scalar_type());
  const int64_t width = w1.size(0);
  TORCH_CHECK(is_cpu_contiguous(w2, at::kBFloat16) && w2.sizes() == at::IntArrayRef({c, width}),
              "gelu_mlp_backward: w2 must be a contiguous (", c, ", ", width, ") bf16 CPU tensor, got ", w2.sizes(),
              " ", w2.scalar_type());
  const int64_t chunks = static_cast<int64_t>(hidden.size());
  std::vector<int64_t> starts(chunks + 1, 0);
  for (int64_t i = 0; i < chunks; ++i) {
    const at::Tensor& h = hidden[i];
    TORCH_CHECK(is_cpu_contiguous(h, at::kBFloat16) && h.dim() == 2 && h.size(1) == width,
                "gelu_mlp_backward: hidden[", i, "] must be a contiguous (rows, ", width,
                ") bf16 CPU tensor, got ", h.sizes(), " ", h.scalar_type());
    starts[i + 1] = starts[i] + h.size(0);
  }
  TORCH_CHECK(starts[chunks] == tokens, "gelu_mlp_backward: the hidden chunks hold ", starts[chunks],
              " rows, x has ", tokens);

  const at::TensorOptions bf16 = x.options();
  at::Tensor grad_x = need_x ? at::empty({tokens, c}, bf16) : at::Tensor();
  at::Tensor parts_w1 = at::empty({need_w1 ? chunks : 0, width, c}, bf16);
  at::Tensor parts_w2 = at::empty({need_w2 ? chunks : 0, c, width}, bf16);
  std::vector<at::Tensor> sums_b1(need_b1 ? chunks : 0);
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t rows = starts[i + 1] - starts[i];
    const at::Tensor g = grad_out.narrow(0, starts[i], rows);
    auto [act, grad_h, sum_h] = gelu_backward(at::mm(g, w2), hidden[i], need_b1);
    if (need_w2) {
      at::Tensor part = parts_w2[i];
      at::mm_out(part, g.t(), act);
    }
    if (need_w1) {
      at::Tensor part = parts_w1[i];
      at::mm_out(part, grad_h.t(), x.narrow(0, starts[i], rows));
    }
    if (need_b1) sums_b1[i] = sum_h;
    if (need_x) {
      at::Tensor rows_x = grad_x.narrow(0, starts[i], rows);
      at::mm_out(rows_x, grad_h, w1);
    }
  });
  return {grad_x, sum_chunks(parts_w1), sum_in_order(sums_b1), sum_chunks(parts_w2)};
}

}  // namespace mmswin
