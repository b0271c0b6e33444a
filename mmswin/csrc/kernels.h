// mmswin's CPU kernels: what the Python module (module.cpp) exposes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Optional.h>

#include <cstddef>
#include <new>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMSWIN_X86 1
#define MMSWIN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define MMSWIN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#endif
#endif

namespace mmswin {

// An allocator of memory that starts on a 64-byte cache line (malloc's blocks start 16 bytes past one), for the
// kernels' scratch buffers: an AMX tile row or an AVX512 vector read from an unaligned address touches two lines
// (tile products whose rows were 16 bytes off a line ran 2.7x slower).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};

// A std::vector whose data starts on a cache line.
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// Whether this CPU runs the kernels (x86 with AVX512-BF16).
bool kernels_available();

// Whether the kernels can multiply on AMX tiles here: built with them, a CPU with AMX-BF16 and an operating system
// that lets this process use them.
bool amx_available();

// Whether the inference's window attention multiplies on AMX tiles: where they are available, unless the
// environment variable MMSWIN_AMX is 0.
bool use_amx();

// Whether t is a contiguous CPU tensor of dtype: what every kernel reads and writes.
bool is_cpu_contiguous(const at::Tensor& t, at::ScalarType dtype);

// Checks that grad, the gradient of fn's input `name` (x), is a contiguous bf16 CPU tensor of x's shape.
void check_gradient_of(const char* fn, const at::Tensor& grad, const at::Tensor& x, const char* name);

// The product x (rows, C_in) weight^T (weight (C_out, C_in)) plus bias, bf16, as the models' chunk_linear
// (mmswin/models/matmul.py) takes it: without a bias a plain product; with one, oneDNN's linear with the bias
// applied to its fp32 accumulator where fused_bias, else PyTorch's linear.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       bool fused_bias);

// Checks a layer norm's affine parameters norm_weight and norm_bias over c channels (contiguous fp32 or none) and
// eps >= 0, naming fn and the argument in its errors.
void check_norm(const char* fn, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                double eps, int64_t c);

// oneDNN's linear x (rows, C_in) weight^T plus bias (or none), bf16, with the bias (and, if gelu, the exact GELU)
// applied to its fp32 accumulator: the models' linear (mmswin/models/matmul.py) in CPU bf16 inference.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool gelu);

// partial (blocks, ...) fp32 summed over its first axis in order, from the first block on: the kernels' sums
// over fixed blocks, the same on any number of threads.
at::Tensor sum_blocks(const at::Tensor& partial);

// parts (chunks, ...) bf16 summed over the chunks in order in fp32 (undefined if there are none): the weight
// gradients of the passes that share chunks out among the threads, the same on any number of threads.
at::Tensor sum_chunks(const at::Tensor& parts);

// The sum in order of the fp32 parts (undefined if there are none), in place in the first.
at::Tensor sum_in_order(const std::vector<at::Tensor>& parts);

// fn(i) for each chunk i in [0, chunks), whole chunks shared out among the threads, each running with the
// caller's grad mode and dispatch state; PyTorch's operators and the kernels called by fn run on that one
// thread (nested parallel regions run inline). The Python bindings of its callers release the GIL: the state
// may hold Python objects (saved-tensor hooks, as torch.utils.checkpoint sets them), whose copies take it.
template <typename F>
void for_each_chunk(int64_t chunks, const F& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = first; i < last; ++i) fn(i);
  });
}

// The sizes of window attention's inputs: B*nW windows of N tokens, C = nH * d channels, nW mask windows
// (0: no mask).
struct WindowShapes {
  int64_t bw, n, c, d, nw;
};

// Checks the inputs of the window attention kernels, naming `fn` and the argument in its errors.
WindowShapes check_window_attention(const char* fn, const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                                    const c10::optional<at::Tensor>& mask, const at::Tensor& scale);

// The same for qkv's sizes given apart: `windows` windows of n tokens, c3 = 3C channels.
WindowShapes check_window_sizes(const char* fn, int64_t windows, int64_t n, int64_t c3, int64_t heads,
                                const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                const at::Tensor& scale);

at::Tensor window_attention(const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine);

at::Tensor window_attention_rows(const at::Tensor& qkv, const at::Tensor& slots, const at::Tensor& pad, int64_t heads,
                                 const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                 const at::Tensor& scale, bool cosine);

std::tuple<at::Tensor, at::Tensor> window_attention_rows_with_lse(const at::Tensor& qkv, const at::Tensor& slots,
                                                                  const at::Tensor& pad, int64_t heads,
                                                                  const at::Tensor& bias,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  const at::Tensor& scale, bool cosine,
                                                                  const c10::optional<at::Tensor>& out = c10::nullopt);

// Whether a window's n slots name n consecutive rows in order (no padding position): its q, k, v and their
// gradients can be read and written in place, without gathering the window.
inline bool consecutive_slots(const int64_t* slot, int64_t n) {
  for (int64_t i = 1; i < n; ++i)
    if (slot[i] != slot[0] + i) return false;
  return slot[0] >= 0;
}

// The checks of the rows entry points: qkv (B, R, 3C), slots (nW * N,) naming each row of qkv once (or -1),
// pad (3C,) bf16, and the window attention's arguments.
WindowShapes check_window_rows(const char* fn, const at::Tensor& qkv, const at::Tensor& slots, const at::Tensor& pad,
                               int64_t heads, const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                               const at::Tensor& scale);

// The same for qkv's sizes given apart: `images` images of `rows` rows of c3 = 3C channels.
WindowShapes check_window_slots(const char* fn, int64_t images, int64_t rows, int64_t c3, const at::Tensor& slots,
                                const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_rows_backward(
    const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& lse, const at::Tensor& slots,
    const at::Tensor& pad, int64_t heads, const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
    const at::Tensor& scale, bool cosine, bool need_bias, bool need_scale);

std::tuple<at::Tensor, at::Tensor> window_attention_with_lse(const at::Tensor& qkv, int64_t heads,
                                                             const at::Tensor& bias,
                                                             const c10::optional<at::Tensor>& mask,
                                                             const at::Tensor& scale, bool cosine);

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& lse, int64_t heads, const at::Tensor& bias,
    const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine, bool need_bias, bool need_scale);

// total (fp32) += part (bf16, total's shape), in place.
at::Tensor& accumulate_(at::Tensor& total, const at::Tensor& part);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_backward(const at::Tensor& grad, const at::Tensor& h,
                                                             bool column_sums);

// CPU bf16 training's MLP fc2(gelu(fc1(x))) over chunks of `chunk` rows of x (tokens, C), the chunks shared out
// among the threads: the output (tokens, C_out) and fc1's output as its chunks, the values of the chunk-by-chunk
// pass (fc1 with the bias fused in oneDNN where fused_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>> gelu_mlp_forward(const at::Tensor& x, const at::Tensor& w1,
                                                                 const c10::optional<at::Tensor>& b1,
                                                                 const at::Tensor& w2,
                                                                 const c10::optional<at::Tensor>& b2, int64_t chunk,
                                                                 bool fused_bias);

// CPU bf16 inference's MLP half of a Swin block, x += fc2(gelu(fc1(norm(x)))) (post_norm: x +=
// norm(fc2(gelu(fc1(x))))) for x (tokens, C) in place, over chunks of `chunk` rows shared out among the threads:
// the values of the chunk-by-chunk pass, the products by onednn_linear and the norm by layer_norm; where w1 and
// w2 come packed by pack_tile_pairs (int32), gelu_mlp_tiles_.
at::Tensor& gelu_mlp_rows_(at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                           const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                           double eps, bool post_norm, int64_t chunk);

// A weight (N, K) bf16, N and K multiples of 32, packed as the kernels' products on AMX tiles read it:
// (N / 16, K / 32, 16, 16) int32 words, each a pair of bf16 along K (see mlp_tiles_cpu.cpp).
at::Tensor pack_tile_pairs(const at::Tensor& weight);

// x (rows, K) bf16 times a weight packed by pack_tile_pairs (N, K) plus bias (bf16 (N,) or none), rounded to
// bf16, on the calling thread's AMX tiles (amx_available): (rows, N).
at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// CPU bf16 inference's linear: tile_linear where weight is packed by pack_tile_pairs (int32), else onednn_linear.
at::Tensor inference_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// The patch embedding of image (B, in_channels, H, W) fp32 or bf16 into tokens (B, ceil(H / patch), ceil(W /
// patch), dim) bf16 on AMX tiles: each token's patch (in_channels, patch, patch) rounded to bf16 (zeros past the
// image) times weight (dim, in_channels * patch^2, zero columns up to a multiple of 32) packed by
// pack_tile_pairs, plus bias (bf16 or none), rounded to bf16, and where normalise the layer norm (norm_weight,
// norm_bias fp32 or none, eps) over dim. Chunks of `chunk` tokens are shared out among the threads.
at::Tensor patch_embedding_tiles(const at::Tensor& image, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t patch,
                                 const c10::optional<at::Tensor>& norm_weight,
                                 const c10::optional<at::Tensor>& norm_bias, double eps, bool normalise,
                                 int64_t chunk);

// Patch merging of x (B, H, W, C) bf16 into (B, ceil(H / 2), ceil(W / 2), 2C) on AMX tiles: per output token its
// neighbours (0, 0), (1, 0), (0, 1), (1, 1) (row, column; zeros past x) as 4C values, the layer norm (norm_weight,
// norm_bias fp32 or none, eps) over them, and the reduction by weight (2C, 4C) packed by pack_tile_pairs; with
// norm_after (V2) the reduction first and then the norm over its 2C. Chunks of `chunk` output tokens are shared
// out among the threads.
at::Tensor patch_merging_tiles(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& norm_weight,
                               const c10::optional<at::Tensor>& norm_bias, double eps, bool norm_after,
                               int64_t chunk);

// gelu_mlp_rows_ for packed weights: both products on AMX tiles (amx_available), the weights packed by
// pack_tile_pairs and the biases bf16 (or none); C and H multiples of 32. The products sum in the tiles' order.
at::Tensor& gelu_mlp_tiles_(at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                            double eps, bool post_norm, int64_t chunk);

// CPU bf16 training's MLP half of a Swin block, y = x + fc2(gelu(fc1(norm(x)))) (post_norm: y = x +
// norm(fc2(gelu(fc1(x))))) for x (tokens, C), over chunks of `chunk` rows shared out among the threads: y, the
// norm's means and 1 / stds (tokens, 2), fc1's output as its chunks and (post_norm) the branch's before the norm
// (else none). The values are those of the norm's kernel, gelu_mlp_forward and a residual sum rounded once.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> norm_gelu_mlp_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
    double eps, bool post_norm, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, int64_t chunk, bool fused_bias);

// The gradients of norm_gelu_mlp_forward's x (bf16; undefined unless need_x), the norm's weight and bias, fc1's
// weight and bias and fc2's weight and bias (fp32 sums over the chunks in order; undefined where not needed) from
// grad (tokens, C), with what the forward kept; the chunks are shared out among the threads. The values are
// those of gelu_mlp_backward, layer_norm_backward and the residual's two gradients summed, to the order of the
// fp32 sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_gelu_mlp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats, const std::vector<at::Tensor>& hidden,
    const std::vector<at::Tensor>& branch, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, double eps, bool post_norm, const at::Tensor& w1, const at::Tensor& w2,
    bool need_x, bool need_norm_weight, bool need_norm_bias, bool need_w1, bool need_b1, bool need_w2, bool need_b2);

// The gradients of x (bf16; undefined unless need_x), fc1's weight and bias and fc2's weight (fp32 sums over the
// chunks; undefined where not needed) of CPU bf16 training's MLP fc2(gelu(fc1(x))) from grad_out, with fc1's
// output kept as the chunks of rows `hidden`; the chunks are shared out among the threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& hidden, const at::Tensor& w1,
    const at::Tensor& w2, bool need_x, bool need_w1, bool need_b1, bool need_w2);

// The window attention of x's rows (B, L, C) in window order projected by weight (3C, C) and qkv_bias (3C,) (or
// none) as linear_rows takes them, chunk k holding rows [starts[k], starts[k + 1]) of each image with its slots
// and (shifted windows) its mask rows masks[k]: the output (B, L, C) and, per image and chunk, the projection
// (1, rows, 3C) and lse (window_attention_rows_with_lse) that the backward takes.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> projected_rows_attention_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& qkv_bias,
    const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots, const std::vector<at::Tensor>& masks,
    const at::Tensor& pad, int64_t heads, const at::Tensor& bias, const at::Tensor& scale, bool cosine,
    bool fused_bias);

// The gradients of x (B, L, C) (bf16; undefined unless need_x), the qkv projection's weight and bias, the
// position bias and (cosine) the logit scales (fp32 sums over the chunks; undefined where not needed) of the
// window attention of x's rows in window order projected by weight (3C, C), from grad (B, L, C). The forward
// kept qkv and lse per image and chunk (window_attention_rows_with_lse); chunk k holds rows
// [starts[k], starts[k + 1]) of each image, with its slots and (shifted windows) its mask rows masks[k].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> projected_rows_attention_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::vector<at::Tensor>& qkv,
    const std::vector<at::Tensor>& lse, const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots,
    const std::vector<at::Tensor>& masks, const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
    const at::Tensor& scale, bool cosine, bool need_x, bool need_weight, bool need_pad, bool need_bias,
    bool need_scale);

// CPU bf16 inference's attention half of a Swin block, for x (B, L, C) in place: per chunk k of windows, the rows
// rows[k] of x (its real tokens in window order, each row of x named at most once over all chunks) gathered
// (normalised unless post_norm), projected to qkv (qkv_weight (3C, C), qkv_bias (3C,) or none), attended as
// window_attention_rows takes slots[k], pad, heads, bias, the mask rows masks[k] (none where masks is empty),
// scale and cosine, projected by proj_weight (C, C) and proj_bias (C,) or none, and added back to the same
// rows (normalised if post_norm). The chunks are shared out among the threads; the values are those of the
// chunk-by-chunk pass, the products by inference_linear: on AMX tiles where the weights come packed by
// pack_tile_pairs.
at::Tensor& window_attention_rows_(at::Tensor& x, const std::vector<at::Tensor>& rows,
                                   const std::vector<at::Tensor>& slots, const std::vector<at::Tensor>& masks,
                                   const c10::optional<at::Tensor>& norm_weight,
                                   const c10::optional<at::Tensor>& norm_bias, double eps, bool post_norm,
                                   const at::Tensor& qkv_weight, const c10::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
                                   const at::Tensor& scale, bool cosine, const at::Tensor& proj_weight,
                                   const c10::optional<at::Tensor>& proj_bias);

at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps);

// The layer norm of rows (rows, c) of x into y, as layer_norm computes it, with each row's mean and 1 / std
// written to stats (rows, 2) where it is not null; weight and bias fp32 (C,) or null. On one thread.
void layer_norm_rows(const at::BFloat16* x, int64_t rows, int64_t c, const float* weight, const float* bias,
                     float eps, at::BFloat16* y, float* stats);

// layer_norm_backward of rows (rows, c) on one thread: their gradient into dx (where not null), and their
// shares of the weight's and bias's gradients added to the fp32 sums dw and db (C each, where not null).
void layer_norm_backward_rows(const at::BFloat16* dy, const at::BFloat16* x, const float* stats, const float* weight,
                              int64_t rows, int64_t c, at::BFloat16* dx, float* dw, float* db);

std::tuple<at::Tensor, at::Tensor> layer_norm_with_stats(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& stats,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   bool need_x, bool need_weight, bool need_bias);

at::Tensor channels_last_bf16(const at::Tensor& x);

at::Tensor layer_norm_channels_first(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor> layer_norm_channels_first_with_stats(const at::Tensor& x,
                                                                        const c10::optional<at::Tensor>& weight,
                                                                        const c10::optional<at::Tensor>& bias,
                                                                        double eps);

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double eps, bool normalise);

at::Tensor& add_rows_(at::Tensor& x, const at::Tensor& index, const at::Tensor& src,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool normalise);

}  // namespace mmswin
