// The Python module mmswin._C: mmswin's CPU kernels.
#include <torch/extension.h>

#include "kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <string>

#ifdef MMSWIN_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mmswin {

bool kernels_available() {
#ifdef MMSWIN_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

bool amx_available() {
#ifdef MMSWIN_AMX
  static const bool ok = [] {
    unsigned int a = 0, b = 0, c = 0, d = 0;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; Linux then grants the tiles' state on request
    // (arch_prctl ARCH_REQ_XCOMP_PERM, 0x1023, for XFEATURE_XTILEDATA, 18).
    if (!kernels_available() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
      return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool use_amx() {
  const char* setting = std::getenv("MMSWIN_AMX");
  return amx_available() && !(setting != nullptr && std::string(setting) == "0");
}

bool is_cpu_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous();
}

void check_gradient_of(const char* fn, const at::Tensor& grad, const at::Tensor& x, const char* name) {
  TORCH_CHECK(is_cpu_contiguous(grad, at::kBFloat16) && grad.sizes() == x.sizes(), fn,
              ": grad must be a contiguous bf16 CPU tensor of ", name, "'s shape ", x.sizes(), ", got ", grad.sizes(),
              " ", grad.scalar_type());
}

void check_norm(const char* fn, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                double eps, int64_t c) {
  for (const auto& [name, t] : {std::make_pair("norm_weight", &weight), std::make_pair("norm_bias", &bias)})
    TORCH_CHECK(!t->has_value() || (is_cpu_contiguous(**t, at::kFloat) && (*t)->sizes() == at::IntArrayRef({c})),
                fn, ": ", name, " must be None or a contiguous (", c, ",) fp32 CPU tensor");
  TORCH_CHECK(eps >= 0, fn, ": eps must not be negative, got ", eps);
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool gelu) {
  static const auto fused =  // PyTorch's registration of oneDNN's linear with post-ops
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return fused.call(x, weight, bias, gelu ? "gelu" : "none", c10::List<std::optional<at::Scalar>>(),
                    c10::string_view(gelu ? "none" : ""));
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       bool fused_bias) {
  if (!bias.has_value()) return at::mm(x, weight.t());
  if (!fused_bias) return at::linear(x, weight, bias);
  return onednn_linear(x, weight, bias, false);
}

at::Tensor sum_blocks(const at::Tensor& partial) {
  at::Tensor total = partial[0].clone();
  float* out = total.data_ptr<float>();
  const float* part = partial.data_ptr<float>();
  const int64_t size = total.numel();
  for (int64_t block = 1; block < partial.size(0); ++block)
    for (int64_t i = 0; i < size; ++i) out[i] += part[block * size + i];
  return total;
}

at::Tensor sum_chunks(const at::Tensor& parts) {
  if (parts.size(0) == 0) return at::Tensor();
  at::Tensor total = parts[0].to(at::kFloat);
  for (int64_t i = 1; i < parts.size(0); ++i) accumulate_(total, parts[i]);
  return total;
}

at::Tensor sum_in_order(const std::vector<at::Tensor>& parts) {
  at::Tensor total;
  for (const at::Tensor& part : parts) total = total.defined() ? total.add_(part) : part;
  return total;
}

}  // namespace mmswin

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmswin's fused CPU kernels for bf16";
  m.def("available", &mmswin::kernels_available, "Whether this CPU runs the kernels (x86 with AVX512-BF16)");
  m.def("amx_available", &mmswin::amx_available,
        "Whether the kernels can multiply on AMX tiles here (AMX-BF16, granted by the operating system)");
  m.def("use_amx", &mmswin::use_amx,
        "Whether the inference's window attention multiplies on AMX tiles (available, and MMSWIN_AMX is not 0)");
  m.def("window_attention", &mmswin::window_attention,
        "Window attention from the qkv projection (bf16, CPU inference)", py::arg("qkv"), py::arg("heads"),
        py::arg("bias"), py::arg("mask"), py::arg("scale"), py::arg("cosine"));
  m.def("window_attention_rows", &mmswin::window_attention_rows,
        "Window attention from the projection of a map's real tokens (B, R, 3C), slots naming each window "
        "position's row (-1: padding, projected to pad), to their outputs (B, R, C) (bf16, CPU inference)",
        py::arg("qkv"), py::arg("slots"), py::arg("pad"), py::arg("heads"), py::arg("bias"), py::arg("mask"),
        py::arg("scale"), py::arg("cosine"));
  m.def("window_attention_rows_with_lse", &mmswin::window_attention_rows_with_lse,
        "window_attention_rows and each real token's log2-sum-exp2 of logits * log2(e), (B, R, nH) fp32 (bf16, "
        "CPU training); the outputs written into out (B, R, C) where given",
        py::arg("qkv"), py::arg("slots"), py::arg("pad"), py::arg("heads"), py::arg("bias"), py::arg("mask"),
        py::arg("scale"), py::arg("cosine"), py::arg("out") = py::none());
  m.def("window_attention_rows_backward", &mmswin::window_attention_rows_backward,
        "Gradients of qkv (bf16), pad, bias and scale (fp32) of window_attention_rows_with_lse (bf16, CPU "
        "training)",
        py::arg("grad"), py::arg("qkv"), py::arg("lse"), py::arg("slots"), py::arg("pad"), py::arg("heads"),
        py::arg("bias"), py::arg("mask"), py::arg("scale"), py::arg("cosine"), py::arg("need_bias"),
        py::arg("need_scale"));
  m.def("window_attention_with_lse", &mmswin::window_attention_with_lse,
        "Window attention from the qkv projection and each row's log2-sum-exp2 of logits * log2(e) (bf16, CPU "
        "training)",
        py::arg("qkv"), py::arg("heads"), py::arg("bias"), py::arg("mask"), py::arg("scale"), py::arg("cosine"));
  m.def("window_attention_backward", &mmswin::window_attention_backward,
        "Gradients of qkv (bf16), bias and scale (fp32) of window_attention_with_lse (bf16, CPU training)",
        py::arg("grad"), py::arg("qkv"), py::arg("lse"), py::arg("heads"), py::arg("bias"), py::arg("mask"),
        py::arg("scale"), py::arg("cosine"), py::arg("need_bias"), py::arg("need_scale"));
  m.def("gelu_backward", &mmswin::gelu_backward,
        "GELU of h and the gradient of h from the GELU's gradient grad, and the fp32 column sums of the latter if "
        "column_sums (bf16, CPU training)",
        py::arg("grad"), py::arg("h"), py::arg("column_sums"));
  m.def("gelu_mlp_forward", &mmswin::gelu_mlp_forward,
        "The MLP fc2(gelu(fc1(x))) of x (tokens, C) and fc1's output as chunks of `chunk` rows, the chunks shared "
        "out among the threads (bf16, CPU training)",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("chunk"),
        py::arg("fused_bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gelu_mlp_rows_", &mmswin::gelu_mlp_rows_,
        "Adds the MLP branch fc2(gelu(fc1(norm(x)))) (post_norm: norm(fc2(gelu(fc1(x))))) to x (tokens, C) in place, "
        "in chunks of `chunk` rows shared out among the threads (bf16, CPU inference); both products on AMX tiles "
        "where w1 and w2 come packed by pack_tile_pairs",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("post_norm"), py::arg("chunk"),
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_tile_pairs", &mmswin::pack_tile_pairs,
        "A weight (N, K) bf16 packed for the kernels' products on AMX tiles: (N / 16, K / 32, 16, 16) int32 words, "
        "each a pair of bf16 along K",
        py::arg("weight"));
  m.def("tile_linear", &mmswin::tile_linear,
        "x (rows, K) bf16 times a weight packed by pack_tile_pairs (N, K) plus bias (or None), rounded to bf16, on "
        "AMX tiles",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::call_guard<py::gil_scoped_release>());
  m.def("patch_embedding_tiles", &mmswin::patch_embedding_tiles,
        "The patch embedding of image (B, in_channels, H, W) into (B, ceil(H / patch), ceil(W / patch), dim) bf16 "
        "tokens: each patch rounded to bf16, projected by the weight packed by pack_tile_pairs plus bias and, where "
        "normalise, normalised, on AMX tiles in chunks of `chunk` tokens shared out among the threads (CPU "
        "inference)",
        py::arg("image"), py::arg("weight"), py::arg("bias"), py::arg("patch"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("normalise"), py::arg("chunk"),
        py::call_guard<py::gil_scoped_release>());
  m.def("patch_merging_tiles", &mmswin::patch_merging_tiles,
        "Patch merging of x (B, H, W, C) into (B, ceil(H / 2), ceil(W / 2), 2C): the 2 x 2 neighbours' 4C values "
        "normalised and reduced by the weight packed by pack_tile_pairs (norm_after: reduced, then normalised), on "
        "AMX tiles in chunks of `chunk` output tokens shared out among the threads (bf16, CPU inference)",
        py::arg("x"), py::arg("weight"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"),
        py::arg("norm_after"), py::arg("chunk"), py::call_guard<py::gil_scoped_release>());
  m.def("norm_gelu_mlp_forward", &mmswin::norm_gelu_mlp_forward,
        "A Swin block's MLP half x + fc2(gelu(fc1(norm(x)))) (post_norm: x + norm(fc2(gelu(fc1(x))))) of x "
        "(tokens, C), the norm's stats, fc1's output as chunks of `chunk` rows and (post_norm) the branch's chunks "
        "before the norm, the chunks shared out among the threads (bf16, CPU training)",
        py::arg("x"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"), py::arg("post_norm"), py::arg("w1"),
        py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("chunk"), py::arg("fused_bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("norm_gelu_mlp_backward", &mmswin::norm_gelu_mlp_backward,
        "Gradients of x (bf16) and of the norm's, fc1's and fc2's parameters (fp32) of norm_gelu_mlp_forward, the "
        "chunks shared out among the threads (bf16, CPU training)",
        py::arg("grad"), py::arg("x"), py::arg("stats"), py::arg("hidden"), py::arg("branch"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("post_norm"), py::arg("w1"), py::arg("w2"), py::arg("need_x"),
        py::arg("need_norm_weight"), py::arg("need_norm_bias"), py::arg("need_w1"), py::arg("need_b1"),
        py::arg("need_w2"), py::arg("need_b2"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gelu_mlp_backward", &mmswin::gelu_mlp_backward,
        "Gradients of x (bf16), fc1's weight and bias and fc2's weight (fp32) of the MLP fc2(gelu(fc1(x))) from "
        "fc1's output kept as chunks of rows, the chunks shared out among the threads (bf16, CPU training)",
        py::arg("grad_out"), py::arg("x"), py::arg("hidden"), py::arg("w1"), py::arg("w2"), py::arg("need_x"),
        py::arg("need_w1"), py::arg("need_b1"), py::arg("need_w2"),
        py::call_guard<py::gil_scoped_release>());
  m.def("projected_rows_attention_forward", &mmswin::projected_rows_attention_forward,
        "The window attention of x's rows projected to qkv, in chunks of windows shared out among the threads, and "
        "each image's and chunk's qkv and lse for the backward (bf16, CPU training)",
        py::arg("x"), py::arg("weight"), py::arg("qkv_bias"), py::arg("starts"), py::arg("slots"), py::arg("masks"),
        py::arg("pad"), py::arg("heads"), py::arg("bias"), py::arg("scale"), py::arg("cosine"), py::arg("fused_bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("window_attention_rows_", &mmswin::window_attention_rows_,
        "Adds the window attention branch of x (B, L, C) to x in place: per chunk of windows, its rows gathered "
        "(normalised unless post_norm), projected to qkv, attended, projected by proj and added back (normalised if "
        "post_norm), the chunks shared out among the threads (bf16, CPU inference); the projections on AMX tiles where "
        "their weights come packed by pack_tile_pairs",
        py::arg("x"), py::arg("rows"), py::arg("slots"), py::arg("masks"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("post_norm"), py::arg("qkv_weight"), py::arg("qkv_bias"),
        py::arg("pad"), py::arg("heads"), py::arg("bias"), py::arg("scale"), py::arg("cosine"),
        py::arg("proj_weight"), py::arg("proj_bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("projected_rows_attention_backward", &mmswin::projected_rows_attention_backward,
        "Gradients of x (bf16), the qkv projection's weight and bias, the position bias and the logit scales (fp32) "
        "of the window attention of x's rows projected to qkv, chunk by chunk as the forward kept each image's "
        "qkv and lse, the chunks shared out among the threads (bf16, CPU training)",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("qkv"), py::arg("lse"), py::arg("starts"),
        py::arg("slots"), py::arg("masks"), py::arg("pad"), py::arg("heads"), py::arg("bias"), py::arg("scale"),
        py::arg("cosine"), py::arg("need_x"), py::arg("need_weight"), py::arg("need_pad"), py::arg("need_bias"),
        py::arg("need_scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("accumulate_", &mmswin::accumulate_,
        "Adds part (bf16) to total (fp32, part's shape) in place: the fp32 sum of bf16 chunks (CPU training)",
        py::arg("total"), py::arg("part"));
  m.def("layer_norm", &mmswin::layer_norm, "Layer norm over the last axis (bf16, CPU inference)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_with_stats", &mmswin::layer_norm_with_stats,
        "Layer norm over the last axis and the rows' (mean, 1 / std) in fp32 (bf16, CPU training)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_backward", &mmswin::layer_norm_backward,
        "Gradients of x, weight and bias (fp32) of layer_norm_with_stats (bf16, CPU training)", py::arg("grad"),
        py::arg("x"), py::arg("stats"), py::arg("weight"), py::arg("need_x"), py::arg("need_weight"),
        py::arg("need_bias"));
  m.def("channels_last_bf16", &mmswin::channels_last_bf16,
        "An fp32 or bf16 map (B, C, H, W) in bf16, laid out channels-last (CPU)", py::arg("x"));
  m.def("layer_norm_channels_first", &mmswin::layer_norm_channels_first,
        "Layer norm of tokens (B, L, C) over C, written as (B, C, L) (bf16, CPU inference)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_channels_first_with_stats", &mmswin::layer_norm_channels_first_with_stats,
        "layer_norm_channels_first and the rows' (mean, 1 / std) in fp32, (B * L, 2) (bf16, CPU training)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("gather_rows", &mmswin::gather_rows,
        "Rows index of tokens (B, L, C), layer-normalised if normalise, zero where index < 0 (bf16, CPU "
        "inference)",
        py::arg("x"), py::arg("index"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("normalise"));
  m.def("add_rows_", &mmswin::add_rows_,
        "Adds src (B, M, C), layer-normalised if normalise, to rows index of tokens (B, L, C) where index >= 0, "
        "in place (bf16, CPU inference)",
        py::arg("x"), py::arg("index"), py::arg("src"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("normalise"));
}
