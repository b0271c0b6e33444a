// The MLP's passes over chunks of tokens, the chunks shared out among the threads: each thread runs whole chunks
// (each product on one thread) instead of every product being split between all of them. On two cores oneDNN
// scales these products 1.6-1.8x from one thread to two; whole chunks per thread scale them as far as the chunks
// balance.
// - CPU bf16 training's forward and backward of fc2(gelu(fc1(x))): the forward's two products and GELU, the
//   backward's four products and the GELU's gradient. The forward keeps fc1's output as its chunks. Each chunk's
//   weight gradients are its bf16 products, summed over the chunks in order in fp32 after the parallel part.
// - CPU bf16 training's MLP half of a block, with its norm and residual sum, forward and backward: per chunk, the
//   norm (its input recomputed in the backward from the kept means and 1 / stds), the MLP and the residual sum or
//   their gradients, where the separate passes would write and read back three more (tokens, C) maps each way.
// - CPU bf16 inference's MLP half of a block, with its norm and residual sum, in place.
// The values are those of the chunk-by-chunk passes, the same on any number of threads.
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace mmswin {

namespace {

// Checks x (tokens, C) and the MLP's weights w1 (H, C) and w2 (C_out, H) and biases (or none), all contiguous bf16
// CPU tensors, C_out = C where in_place, and chunk > 0, naming fn and the argument in its errors.
void check_mlp(const char* fn, const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
               const at::Tensor& w2, const c10::optional<at::Tensor>& b2, int64_t chunk, bool in_place) {
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 2, fn,
              ": x must be a contiguous (tokens, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t c = x.size(1);
  TORCH_CHECK(is_cpu_contiguous(w1, at::kBFloat16) && w1.dim() == 2 && w1.size(1) == c, fn,
              ": w1 must be a contiguous (H, ", c, ") bf16 CPU tensor, got ", w1.sizes(), " ", w1.scalar_type());
  const int64_t width = w1.size(0);
  TORCH_CHECK(is_cpu_contiguous(w2, at::kBFloat16) && w2.dim() == 2 && w2.size(1) == width, fn,
              ": w2 must be a contiguous (C_out, ", width, ") bf16 CPU tensor, got ", w2.sizes(), " ",
              w2.scalar_type());
  TORCH_CHECK(!in_place || w2.size(0) == c, fn, ": w2 must have x's ", c,
              " rows (the output is added to x), got ", w2.sizes());
  TORCH_CHECK(!b1.has_value() || (is_cpu_contiguous(*b1, at::kBFloat16) && b1->sizes() == at::IntArrayRef({width})),
              fn, ": b1 must be None or a contiguous (", width, ",) bf16 CPU tensor");
  TORCH_CHECK(!b2.has_value() || (is_cpu_contiguous(*b2, at::kBFloat16) &&
                                  b2->sizes() == at::IntArrayRef({w2.size(0)})),
              fn, ": b2 must be None or a contiguous (", w2.size(0), ",) bf16 CPU tensor");
  TORCH_CHECK(chunk > 0, fn, ": chunk must be positive, got ", chunk);
}

// The data of an fp32 affine parameter of the norm, or null for none.
const float* affine_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// Checks the kept chunks of one pass: each a contiguous (rows, width) bf16 CPU tensor, named name[i] in fn's errors;
// returns their first rows and then their total.
std::vector<int64_t> chunk_starts(const char* fn, const char* name, const std::vector<at::Tensor>& parts,
                                  int64_t width) {
  std::vector<int64_t> starts(parts.size() + 1, 0);
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& h = parts[i];
    TORCH_CHECK(is_cpu_contiguous(h, at::kBFloat16) && h.dim() == 2 && h.size(1) == width, fn, ": ", name, "[", i,
                "] must be a contiguous (rows, ", width, ") bf16 CPU tensor, got ", h.sizes(), " ", h.scalar_type());
    starts[i + 1] = starts[i] + h.size(0);
  }
  return starts;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> norm_gelu_mlp_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
    double eps, bool post_norm, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, int64_t chunk, bool fused_bias) {
  const char* fn = "norm_gelu_mlp_forward";
  check_mlp(fn, x, w1, b1, w2, b2, chunk, true);
  const int64_t tokens = x.size(0), c = x.size(1);
  check_norm(fn, norm_weight, norm_bias, eps, c);
  const float* weight = affine_or_null(norm_weight);
  const float* bias = affine_or_null(norm_bias);
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  at::Tensor y = at::empty_like(x);
  at::Tensor stats = at::empty({tokens, 2}, x.options().dtype(at::kFloat));
  std::vector<at::Tensor> hidden(chunks), branch(post_norm ? chunks : 0);
  const at::Tensor w2t = w2.t();
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t first = i * chunk, rows = std::min(chunk, tokens - first);
    const at::Tensor part = x.narrow(0, first, rows);
    float* st = stats.data_ptr<float>() + 2 * first;
    at::Tensor in = part;
    if (!post_norm) {
      in = at::empty_like(part);
      layer_norm_rows(part.data_ptr<at::BFloat16>(), rows, c, weight, bias, static_cast<float>(eps),
                      in.data_ptr<at::BFloat16>(), st);
    }
    at::Tensor h = linear_rows(in, w1, b1, fused_bias);
    const at::Tensor act = at::gelu(h);
    at::Tensor out = b2.has_value() ? at::addmm(*b2, act, w2t) : at::mm(act, w2t);
    if (post_norm) {
      at::Tensor normed = at::empty_like(out);
      layer_norm_rows(out.data_ptr<at::BFloat16>(), rows, c, weight, bias, static_cast<float>(eps),
                      normed.data_ptr<at::BFloat16>(), st);
      branch[i] = std::move(out);
      out = std::move(normed);
    }
    at::Tensor y_rows = y.narrow(0, first, rows);
    at::add_out(y_rows, part, out);
    hidden[i] = std::move(h);
  });
  return {y, stats, hidden, branch};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_gelu_mlp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, const std::vector<at::Tensor>& hidden,
    const std::vector<at::Tensor>& branch, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, double eps, bool post_norm, const at::Tensor& w1, const at::Tensor& w2,
    bool need_x, bool need_norm_weight, bool need_norm_bias, bool need_w1, bool need_b1, bool need_w2, bool need_b2) {
  const char* fn = "norm_gelu_mlp_backward";
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 2, fn,
              ": x must be a contiguous (tokens, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  check_gradient_of(fn, grad, x, "x");
  const int64_t tokens = x.size(0), c = x.size(1);
  TORCH_CHECK(is_cpu_contiguous(stats, at::kFloat) && stats.sizes() == at::IntArrayRef({tokens, 2}), fn,
              ": stats must be the contiguous (", tokens, ", 2) fp32 means and 1 / stds, got ", stats.sizes(), " ",
              stats.scalar_type());
  check_norm(fn, norm_weight, norm_bias, eps, c);
  TORCH_CHECK(is_cpu_contiguous(w1, at::kBFloat16) && w1.dim() == 2 && w1.size(1) == c, fn,
              ": w1 must be a contiguous (H, ", c, ") bf16 CPU tensor, got ", w1.sizes(), " ", w1.scalar_type());
  const int64_t width = w1.size(0);
  TORCH_CHECK(is_cpu_contiguous(w2, at::kBFloat16) && w2.sizes() == at::IntArrayRef({c, width}), fn,
              ": w2 must be a contiguous (", c, ", ", width, ") bf16 CPU tensor, got ", w2.sizes(), " ",
              w2.scalar_type());
  const std::vector<int64_t> starts = chunk_starts(fn, "hidden", hidden, width);
  const int64_t chunks = static_cast<int64_t>(hidden.size());
  TORCH_CHECK(starts[chunks] == tokens, fn, ": the hidden chunks hold ", starts[chunks], " rows, x has ", tokens);
  if (post_norm) {
    TORCH_CHECK(static_cast<int64_t>(branch.size()) == chunks, fn, ": branch must hold one chunk per hidden chunk (",
                chunks, "), got ", branch.size());
    TORCH_CHECK(chunk_starts(fn, "branch", branch, c) == starts, fn, ": branch's chunks must have hidden's rows");
  } else {
    TORCH_CHECK(branch.empty(), fn, ": branch must be empty without post_norm, got ", branch.size(), " chunks");
  }
  const float* weight = affine_or_null(norm_weight);
  const float* bias = affine_or_null(norm_bias);
  need_norm_weight = need_norm_weight && weight != nullptr;
  need_norm_bias = need_norm_bias && bias != nullptr;

  const at::TensorOptions bf16 = x.options();
  at::Tensor grad_x = need_x ? at::empty({tokens, c}, bf16) : at::Tensor();
  at::Tensor parts_w1 = at::empty({need_w1 ? chunks : 0, width, c}, bf16);
  at::Tensor parts_w2 = at::empty({need_w2 ? chunks : 0, c, width}, bf16);
  std::vector<at::Tensor> sums_b1(need_b1 ? chunks : 0), sums_b2(need_b2 ? chunks : 0);
  const bool norm_sums = need_norm_weight || need_norm_bias;
  at::Tensor parts_norm = at::zeros({norm_sums ? chunks : 0, 2, c}, x.options().dtype(at::kFloat));
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t first = starts[i], rows = starts[i + 1] - first;
    const at::Tensor g = grad.narrow(0, first, rows);
    const at::Tensor part = x.narrow(0, first, rows);
    const float* st = stats.data_ptr<float>() + 2 * first;
    float* dw = need_norm_weight ? parts_norm.data_ptr<float>() + i * 2 * c : nullptr;
    float* db = need_norm_bias ? parts_norm.data_ptr<float>() + (i * 2 + 1) * c : nullptr;
    at::Tensor d = g;  // the MLP output's gradient
    if (post_norm) {
      d = at::empty_like(g);
      layer_norm_backward_rows(g.data_ptr<at::BFloat16>(), branch[i].data_ptr<at::BFloat16>(), st, weight, rows, c,
                               d.data_ptr<at::BFloat16>(), dw, db);
    }
    auto [act, grad_h, sum_h] = gelu_backward(at::mm(d, w2), hidden[i], need_b1);
    if (need_w2) {
      at::Tensor part_w2 = parts_w2[i];
      at::mm_out(part_w2, d.t(), act);
    }
    if (need_b2) sums_b2[i] = at::sum(d, {0}, false, at::kFloat);
    if (need_b1) sums_b1[i] = sum_h;
    at::Tensor in = part;  // fc1's input
    if (!post_norm) {
      in = at::empty_like(part);
      layer_norm_rows(part.data_ptr<at::BFloat16>(), rows, c, weight, bias, static_cast<float>(eps),
                      in.data_ptr<at::BFloat16>(), nullptr);
    }
    if (need_w1) {
      at::Tensor part_w1 = parts_w1[i];
      at::mm_out(part_w1, grad_h.t(), in);
    }
    if (!need_x && (post_norm || !norm_sums)) return;
    at::Tensor grad_in = at::mm(grad_h, w1);
    if (!post_norm) {
      at::Tensor grad_part = need_x ? at::empty_like(part) : at::Tensor();
      layer_norm_backward_rows(grad_in.data_ptr<at::BFloat16>(), part.data_ptr<at::BFloat16>(), st, weight, rows, c,
                               need_x ? grad_part.data_ptr<at::BFloat16>() : nullptr, dw, db);
      grad_in = grad_part;
    }
    if (need_x) {
      at::Tensor rows_x = grad_x.narrow(0, first, rows);
      at::add_out(rows_x, g, grad_in);
    }
  });
  at::Tensor norm_total = norm_sums ? sum_blocks(parts_norm) : at::Tensor();
  return {grad_x,
          need_norm_weight ? norm_total[0] : at::Tensor(),
          need_norm_bias ? norm_total[1] : at::Tensor(),
          sum_chunks(parts_w1),
          sum_in_order(sums_b1),
          sum_chunks(parts_w2),
          sum_in_order(sums_b2)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> gelu_mlp_forward(const at::Tensor& x, const at::Tensor& w1,
                                                                 const c10::optional<at::Tensor>& b1,
                                                                 const at::Tensor& w2,
                                                                 const c10::optional<at::Tensor>& b2, int64_t chunk,
                                                                 bool fused_bias) {
  check_mlp("gelu_mlp_forward", x, w1, b1, w2, b2, chunk, false);
  const int64_t tokens = x.size(0);
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  at::Tensor out = at::empty({tokens, w2.size(0)}, x.options());
  std::vector<at::Tensor> hidden(chunks);
  const at::Tensor w2t = w2.t();
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t first = i * chunk, rows = std::min(chunk, tokens - first);
    const at::Tensor part = x.narrow(0, first, rows);
    at::Tensor h = linear_rows(part, w1, b1, fused_bias);
    at::Tensor rows_out = out.narrow(0, first, rows);
    const at::Tensor act = at::gelu(h);
    if (b2.has_value())
      at::addmm_out(rows_out, *b2, act, w2t);
    else
      at::mm_out(rows_out, act, w2t);
    hidden[i] = std::move(h);
  });
  return {out, hidden};
}

at::Tensor& gelu_mlp_rows_(at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                           const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                           double eps, bool post_norm, int64_t chunk) {
  const char* fn = "gelu_mlp_rows_";
  if (w1.scalar_type() == at::kInt)  // packed by pack_tile_pairs: both products on AMX tiles
    return gelu_mlp_tiles_(x, w1, b1, w2, b2, norm_weight, norm_bias, eps, post_norm, chunk);
  check_mlp(fn, x, w1, b1, w2, b2, chunk, true);
  const int64_t tokens = x.size(0), c = x.size(1);
  check_norm(fn, norm_weight, norm_bias, eps, c);
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t first = i * chunk;
    at::Tensor part = x.narrow(0, first, std::min(chunk, tokens - first));
    const at::Tensor act = onednn_linear(post_norm ? part : layer_norm(part, norm_weight, norm_bias, eps), w1, b1,
                                         true);
    const at::Tensor branch = onednn_linear(act, w2, b2, false);
    part.add_(post_norm ? layer_norm(branch, norm_weight, norm_bias, eps) : branch);
  });
  return x;
}

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
  const std::vector<int64_t> starts = chunk_starts("gelu_mlp_backward", "hidden", hidden, width);
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
