// CPU bf16 inference's products on AMX tiles (see use_amx), with the weights packed once by pack_tile_pairs (the
// models keep them across inference forwards): weight (N, K) becomes the tiles of its transpose's pairs of rows,
// (N / 16, K / 32, 16, 16) words, tile (g, s) holding the pairs (weight[g*16 + n, s*32 + 2p], weight[g*16 + n,
// s*32 + 2p + 1]) at row p and column n. N and K must be multiples of 32. The products sum in the tiles' order
// (fp32 accumulation, starting from the bias), so the values may differ from oneDNN's by bf16 roundings.
// - tile_linear: x weight^T plus bias, rounded to bf16, on the calling thread (the attention half's projections).
// - patch_embedding_tiles: the patch embedding, each token's patch of the image gathered (rounded to bf16 as
//   autocast casts the image), projected and normalised per chunk of tokens.
// - patch_merging_tiles: patch merging, the 2 x 2 neighbours gathered, normalised and reduced per chunk of
//   output tokens (V2: reduced, then normalised).
// - gelu_mlp_tiles_ (gelu_mlp_rows_ for packed weights): the MLP half of a block, x += fc2(gelu(fc1(norm(x))))
//   (post_norm: x += norm(fc2(gelu(fc1(x))))), in place, as gelu_mlp_rows_ computes it with oneDNN's products.
//   Each thread takes whole chunks of rows and each chunk a panel of rows at a time: their norm, fc1's output
//   with its bias and the exact GELU, rounded to bf16, fc2's output with its bias, rounded to bf16, and the
//   residual sum, all in the core's caches.
#include "simd.h"
#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mmswin {

namespace {

constexpr int64_t kBlockRows = 32;  // rows of a block: two tiles of 16

#ifdef MMSWIN_AMX

using namespace simd;

// Tiles 0-3 = a (32 rows of bf16, a_stride values apart) times the packed columns of tile groups g and g + 1
// (b0 and b1: their `steps` tiles along the reduction axis, 32 values each): rows 0-15 and 16-31 times columns
// 0-15 and 16-31, plus start (the 32 columns' fp32 bias, each tile's 16 rows loaded from the same 64 bytes) where
// not null. Tiles 4 and 5 hold a's rows, 6 and 7 b's pairs of rows.
MMSWIN_AMX inline void block_product(const uint16_t* a, int64_t a_stride, const uint32_t* b0, const uint32_t* b1,
                                     int64_t steps, const float* start) {
  if (start != nullptr) {
    _tile_loadd(0, start, 0);
    _tile_loadd(1, start + 16, 0);
    _tile_loadd(2, start, 0);
    _tile_loadd(3, start + 16, 0);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * 32, a_stride * 2);
    _tile_loadd(5, a + 16 * a_stride + s * 32, a_stride * 2);
    _tile_loadd(6, b0 + s * 256, 64);
    _tile_loadd(7, b1 + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// Tiles 0-3 into acc (32, 32) fp32.
MMSWIN_AMX inline void store_block(float* acc) {
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  _tile_stored(2, acc + 16 * 32, 128);
  _tile_stored(3, acc + 16 * 32 + 16, 128);
}

// GELU(h) = h Phi(h) = h / 2 + |h| / 2 (1 - erfc(|h| / sqrt(2))) for 16 fp32 values, with erfc(z) = (1 + a1 z +
// ... + a6 z^6)^-16 (Abramowitz and Stegun's 7.1.28, absolute error below 3e-7; PyTorch's 7.1.26 is within 1.5e-7
// and takes an exponential), the coefficients scaled by 2^(-k/2) to take |h|, the reciprocal refined by a Newton
// step.
MMSWIN_AMX inline __m512 gelu_ps(__m512 h) {
  const __m512 a = _mm512_abs_ps(h);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(5.3829750000e-06f), a, _mm512_set1_ps(4.8890635643e-05f));
  p = _mm512_fmadd_ps(p, a, _mm512_set1_ps(3.8003575000e-05f));
  p = _mm512_fmadd_ps(p, a, _mm512_set1_ps(3.2776263241e-03f));
  p = _mm512_fmadd_ps(p, a, _mm512_set1_ps(2.1141006150e-02f));
  p = _mm512_fmadd_ps(p, a, _mm512_set1_ps(4.9867346967e-02f));
  p = _mm512_fmadd_ps(p, a, _mm512_set1_ps(1.0f));
  __m512 q = _mm512_rcp14_ps(p);
  q = _mm512_mul_ps(q, _mm512_fnmadd_ps(p, q, _mm512_set1_ps(2.0f)));
  q = _mm512_mul_ps(q, q);
  q = _mm512_mul_ps(q, q);
  q = _mm512_mul_ps(q, q);
  q = _mm512_mul_ps(q, q);  // erfc(|h| / sqrt(2))
  const __m512 half_a = _mm512_mul_ps(a, _mm512_set1_ps(0.5f));
  return _mm512_fnmadd_ps(half_a, q, _mm512_fmadd_ps(h, _mm512_set1_ps(0.5f), half_a));
}

struct Mlp {
  int64_t c, width;
  const uint32_t* w1;  // packed (width / 16, c / 32, 16, 16)
  const uint16_t* b1;  // (width,) or null
  const uint32_t* w2;  // packed (c / 16, width / 32, 16, 16)
  const uint16_t* b2;  // (c,) or null
  const float* norm_weight;
  const float* norm_bias;
  float eps;
  bool post_norm;
};

// Rows per panel. Where both weights (4 C H bytes) stay in a core's L2 within 1 MiB, 64: fc1's output goes from the
// GELU to fc2 through the nearest caches (Swin-T's MLP halves at C = 96 and 192 took 1.09-1.16x less time than in
// panels of 1 MiB, at C = 96 0.5 ms less a block at 800x1216). Else the panel's norm output and fc1's output,
// (rows, C + H) bf16, within about 1 MiB (a core's L2 holds them with the weights' tiles in use), a multiple of 32
// from 32 to 1024, each panel reading the weights once.
int64_t panel_rows(int64_t c, int64_t width) {
  if (4 * c * width <= (int64_t{1} << 20)) return 2 * kBlockRows;
  return std::clamp<int64_t>((int64_t{1} << 20) / ((c + width) * 2) / kBlockRows * kBlockRows, kBlockRows, 1024);
}

// a (blocks * 32 rows of bf16, a_stride values apart; the last block's rows at `last` instead where not null) times
// the packed weight b (`groups` groups of 16 columns, `steps` tiles of 32 along the reduction axis each), plus the
// fp32 bias where not null (the accumulators start from it: the epilogues take no vector adds for it), 32 rows by
// 32 columns at a time, the columns' pairs of groups outermost (their tiles stay in L1 over the rows):
// epilogue(acc, g, rb) takes the fp32 products (32, 32) of groups g, g + 1 and rows rb * 32 ... The products of
// one block run on the tiles while the previous block's epilogue runs on the vector units.
template <typename Epilogue>
MMSWIN_AMX void products_in_blocks(const uint16_t* a, int64_t a_stride, int64_t blocks, const uint16_t* last,
                                   const uint32_t* b, const float* bias, int64_t groups, int64_t steps,
                                   float (&acc)[2][kBlockRows * 32], const Epilogue& epilogue) {
  int64_t pending_g = -1, pending_rb = 0;
  int buffer = 0;
  for (int64_t g = 0; g < groups; g += 2)
    for (int64_t rb = 0; rb < blocks; ++rb) {
      const uint16_t* rows = last != nullptr && rb == blocks - 1 ? last : a + rb * kBlockRows * a_stride;
      block_product(rows, a_stride, b + g * steps * 256, b + (g + 1) * steps * 256, steps,
                    bias != nullptr ? bias + g * 16 : nullptr);
      if (pending_g >= 0) epilogue(acc[buffer ^ 1], pending_g, pending_rb);
      store_block(acc[buffer]);
      pending_g = g;
      pending_rb = rb;
      buffer ^= 1;
    }
  if (pending_g >= 0) epilogue(acc[buffer ^ 1], pending_g, pending_rb);
}

// 32 fp32 values rounded to bf16: a cache line.
MMSWIN_AMX inline __m512i rounded_line(const float* y) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(y + 16), _mm512_load_ps(y));
}

// A bias of n bf16 values (or none: empty) in fp32, where the accumulators start.
MMSWIN_AMX LineVector<float> widened_bias(const uint16_t* bias, int64_t n) {
  LineVector<float> wide(bias != nullptr ? n : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(wide.size()); j += 16)
    _mm512_store_ps(wide.data() + j, load_bf16(bias + j, 0xFFFF));
  return wide;
}

const float* or_null(const LineVector<float>& v) { return v.empty() ? nullptr : v.data(); }

// n (at most 16) fp32 values rounded to bf16 (to nearest even, as PyTorch casts them).
MMSWIN_AMX inline void round_to_bf16(const float* from, int64_t n, uint16_t* to) {
  const __mmask16 m = first_lanes(n);
  store_bf16_bits(to, m, round_bf16(_mm512_maskz_loadu_ps(m, from)));
}

// out (rows, n) bf16 = x (rows, k) bf16 times the packed weight (n, k) plus bias (or none), on this thread.
MMSWIN_AMX void linear_on_tiles(const uint16_t* x, int64_t rows, int64_t k, const uint32_t* weight, int64_t n,
                                const uint16_t* bias, uint16_t* out) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows, tail = rows - (blocks - 1) * kBlockRows;
  LineVector<uint16_t> last;  // the last block's rows padded with zeros, where it is not whole
  if (tail < kBlockRows) {
    last.assign(kBlockRows * k, 0);
    std::memcpy(last.data(), x + (blocks - 1) * kBlockRows * k, tail * k * sizeof(uint16_t));
  }
  alignas(64) float acc[2][kBlockRows * 32];
  const LineVector<float> start = widened_bias(bias, n);
  tiles::configure();
  products_in_blocks(x, k, blocks, last.empty() ? nullptr : last.data(), weight, or_null(start), n / 16, k / 32,
                     acc, [&](const float* y, int64_t g, int64_t rb) MMSWIN_AMX {
                       const int64_t valid = std::min(kBlockRows, rows - rb * kBlockRows);
                       uint16_t* to = out + rb * kBlockRows * n + g * 16;
                       for (int64_t r = 0; r < valid; ++r) _mm512_storeu_si512(to + r * n, rounded_line(y + r * 32));
                     });
  _tile_release();
}

// The MLP half for `rows` rows of x (bf16, C each), in place, on this thread, a panel of rows at a time.
MMSWIN_AMX void mlp_rows_on_tiles(const Mlp& m, uint16_t* x, int64_t rows) {
  const int64_t c = m.c, width = m.width;
  const int64_t panel = std::min(panel_rows(c, width), (rows + kBlockRows - 1) / kBlockRows * kBlockRows);
  LineVector<uint16_t> in(panel * c), hidden(panel * width), branch(m.post_norm ? panel * c : 0);
  alignas(64) float acc[2][kBlockRows * 32];
  const LineVector<float> b1 = widened_bias(m.b1, width), b2 = widened_bias(m.b2, c);
  tiles::configure();
  for (int64_t p0 = 0; p0 < rows; p0 += panel) {
    const int64_t n = std::min(panel, rows - p0), blocks = (n + kBlockRows - 1) / kBlockRows;
    uint16_t* xp = x + p0 * c;
    if (m.post_norm)
      std::memcpy(in.data(), xp, n * c * sizeof(uint16_t));
    else
      layer_norm_rows(reinterpret_cast<const at::BFloat16*>(xp), n, c, m.norm_weight, m.norm_bias, m.eps,
                      reinterpret_cast<at::BFloat16*>(in.data()), nullptr);
    std::memset(in.data() + n * c, 0, (blocks * kBlockRows - n) * c * sizeof(uint16_t));
    // fc1 with its bias and the GELU, rounded to bf16
    products_in_blocks(in.data(), c, blocks, nullptr, m.w1, or_null(b1), width / 16, c / 32, acc,
                       [&](const float* y, int64_t g, int64_t rb) MMSWIN_AMX {
      uint16_t* h = hidden.data() + rb * kBlockRows * width + g * 16;  // a cache line of each row of fc1's output
      for (int64_t r = 0; r < kBlockRows; ++r) {
        const __m512 lo = gelu_ps(_mm512_load_ps(y + r * 32)), hi = gelu_ps(_mm512_load_ps(y + r * 32 + 16));
        _mm512_storeu_si512(h + r * width, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    });
    // fc2 with its bias, rounded to bf16, and (without post_norm) the residual sum, rounded again
    products_in_blocks(hidden.data(), width, blocks, nullptr, m.w2, or_null(b2), c / 16, width / 32, acc,
                       [&](const float* y, int64_t g, int64_t rb) MMSWIN_AMX {
      const int64_t valid = std::min(kBlockRows, n - rb * kBlockRows), j = g * 16;
      for (int64_t r = 0; r < valid; ++r) {
        const int64_t row = rb * kBlockRows + r;
        const __m512i line = rounded_line(y + r * 32);
        if (m.post_norm) {
          _mm512_storeu_si512(branch.data() + row * c + j, line);
        } else {
          uint16_t* to = xp + row * c + j;
          const __m512 lo = _mm512_add_ps(load_bf16(to, 0xFFFF), widen_bf16(_mm512_castsi512_si256(line)));
          const __m512 hi = _mm512_add_ps(load_bf16(to + 16, 0xFFFF),
                                          widen_bf16(_mm512_extracti64x4_epi64(line, 1)));
          _mm512_storeu_si512(to, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
    });
    if (m.post_norm) {
      layer_norm_rows(reinterpret_cast<const at::BFloat16*>(branch.data()), n, c, m.norm_weight, m.norm_bias, m.eps,
                      reinterpret_cast<at::BFloat16*>(branch.data()), nullptr);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < c; j += 16) {
          uint16_t* to = xp + r * c + j;
          store_bf16(to, _mm512_add_ps(load_bf16(to, 0xFFFF), load_bf16(branch.data() + r * c + j, 0xFFFF)));
        }
    }
  }
  _tile_release();
}

#endif  // MMSWIN_AMX

// Checks a weight packed by pack_tile_pairs for an (n, k) weight, named name in fn's errors.
void check_packed(const char* fn, const char* name, const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(is_cpu_contiguous(packed, at::kInt) && packed.sizes() == at::IntArrayRef({n / 16, k / 32, 16, 16}), fn,
              ": ", name, " must be pack_tile_pairs's contiguous (", n / 16, ", ", k / 32,
              ", 16, 16) int32 CPU tensor for a (", n, ", ", k, ") weight, got ", packed.sizes(), " ",
              packed.scalar_type());
}

// Checks a bias of n values (contiguous bf16 or none), named name in fn's errors.
void check_bias(const char* fn, const char* name, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(!bias.has_value() || (is_cpu_contiguous(*bias, at::kBFloat16) && bias->sizes() == at::IntArrayRef({n})),
              fn, ": ", name, " must be None or a contiguous (", n, ",) bf16 CPU tensor");
}

}  // namespace

at::Tensor pack_tile_pairs(const at::Tensor& weight) {
  TORCH_CHECK(is_cpu_contiguous(weight, at::kBFloat16) && weight.dim() == 2, "pack_tile_pairs: weight must be a ",
              "contiguous (N, K) bf16 CPU tensor, got ", weight.sizes(), " ", weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % 32 == 0 && k % 32 == 0, "pack_tile_pairs: weight's N and K must be multiples of 32, got ",
              weight.sizes());
  at::Tensor packed = at::empty({n / 16, k / 32, 16, 16}, weight.options().dtype(at::kInt));
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  at::parallel_for(0, n / 16, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g)
      for (int64_t s = 0; s < k / 32; ++s)
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t col = 0; col < 16; ++col) {
            const uint16_t* pair = w + (g * 16 + col) * k + s * 32 + 2 * p;
            out[((g * (k / 32) + s) * 16 + p) * 16 + col] = pair[0] | (static_cast<uint32_t>(pair[1]) << 16);
          }
  });
  return packed;
}

at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* fn = "tile_linear";
  TORCH_CHECK(amx_available(), fn, " needs a CPU with AMX-BF16 that the operating system lets this process use");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 2 && x.size(1) % 32 == 0, fn,
              ": x must be a contiguous (rows, K) bf16 CPU tensor with K a multiple of 32, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 4, fn, ": weight must be pack_tile_pairs's (N / 16, K / 32, 16, 16) tensor, got ",
              weight.sizes());
  const int64_t k = x.size(1), n = weight.size(0) * 16;
  TORCH_CHECK(n % 32 == 0, fn, ": the weight's N must be a multiple of 32, got ", n);
  check_packed(fn, "weight", weight, n, k);
  check_bias(fn, "bias", bias, n);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
#ifdef MMSWIN_AMX
  if (x.size(0) > 0)
    linear_on_tiles(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), k,
                    reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()), n,
                    bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr,
                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
#endif
  return out;
}

at::Tensor inference_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return weight.scalar_type() == at::kInt ? tile_linear(x, weight, bias) : onednn_linear(x, weight, bias, false);
}

at::Tensor patch_merging_tiles(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& norm_weight,
                               const c10::optional<at::Tensor>& norm_bias, double eps, bool norm_after,
                               int64_t chunk) {
  const char* fn = "patch_merging_tiles";
  TORCH_CHECK(amx_available(), fn, " needs a CPU with AMX-BF16 that the operating system lets this process use");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 4 && x.size(3) % 16 == 0, fn,
              ": x must be a contiguous (B, H, W, C) bf16 CPU tensor with C a multiple of 16, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t b = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  check_packed(fn, "weight", weight, 2 * c, 4 * c);
  check_norm(fn, norm_weight, norm_bias, eps, norm_after ? 2 * c : 4 * c);
  TORCH_CHECK(chunk > 0, fn, ": chunk must be positive, got ", chunk);
  const int64_t h2 = (h + 1) / 2, w2 = (w + 1) / 2, tokens = b * h2 * w2;
  at::Tensor out = at::empty({b, h2, w2, 2 * c}, x.options());
#ifdef MMSWIN_AMX
  const float* nw = norm_weight.has_value() && norm_weight->defined() ? norm_weight->data_ptr<float>() : nullptr;
  const float* nb = norm_bias.has_value() && norm_bias->defined() ? norm_bias->data_ptr<float>() : nullptr;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>());
  for_each_chunk((tokens + chunk - 1) / chunk, [&](int64_t k) {
    const int64_t first = k * chunk, rows = std::min(chunk, tokens - first);
    LineVector<uint16_t> merged(rows * 4 * c);
    for (int64_t t = 0; t < rows; ++t) {  // the neighbours (0, 0), (1, 0), (0, 1), (1, 1) (row, column), zero past x
      const int64_t token = first + t, j = token % w2, i = token / w2 % h2, image = token / (w2 * h2);
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t row = 2 * i + q % 2, col = 2 * j + q / 2;
        uint16_t* to = merged.data() + (t * 4 + q) * c;
        if (row < h && col < w)
          std::memcpy(to, src + ((image * h + row) * w + col) * c, c * sizeof(uint16_t));
        else
          std::memset(to, 0, c * sizeof(uint16_t));
      }
    }
    const auto as_bf16 = [](uint16_t* p) { return reinterpret_cast<at::BFloat16*>(p); };
    if (!norm_after) layer_norm_rows(as_bf16(merged.data()), rows, 4 * c, nw, nb, static_cast<float>(eps),
                                     as_bf16(merged.data()), nullptr);
    uint16_t* y = dst + first * 2 * c;
    linear_on_tiles(merged.data(), rows, 4 * c, packed, 2 * c, nullptr, y);
    if (norm_after) layer_norm_rows(as_bf16(y), rows, 2 * c, nw, nb, static_cast<float>(eps), as_bf16(y), nullptr);
  });
#endif
  return out;
}

at::Tensor patch_embedding_tiles(const at::Tensor& image, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t patch,
                                 const c10::optional<at::Tensor>& norm_weight,
                                 const c10::optional<at::Tensor>& norm_bias, double eps, bool normalise,
                                 int64_t chunk) {
  const char* fn = "patch_embedding_tiles";
  TORCH_CHECK(amx_available(), fn, " needs a CPU with AMX-BF16 that the operating system lets this process use");
  TORCH_CHECK(image.device().is_cpu() && image.is_contiguous() && image.dim() == 4 &&
                  (image.scalar_type() == at::kFloat || image.scalar_type() == at::kBFloat16),
              fn, ": image must be a contiguous (B, in_channels, H, W) fp32 or bf16 CPU tensor, got ", image.sizes(),
              " ", image.scalar_type());
  TORCH_CHECK(patch > 0, fn, ": patch must be positive, got ", patch);
  const int64_t b = image.size(0), channels = image.size(1), h = image.size(2), w = image.size(3);
  const int64_t k = channels * patch * patch, kp = (k + 31) / 32 * 32;  // the reduction axis padded for the tiles
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == kp / 32, fn, ": weight must be pack_tile_pairs's (dim / 16, ",
              kp / 32, ", 16, 16) tensor for a (dim, ", kp, ") weight (in_channels * patch^2 = ", k,
              " columns and zeros), got ", weight.sizes());
  const int64_t dim = weight.size(0) * 16;
  TORCH_CHECK(dim % 32 == 0, fn, ": the embedding's dim must be a multiple of 32, got ", dim);
  check_packed(fn, "weight", weight, dim, kp);
  check_bias(fn, "bias", bias, dim);
  check_norm(fn, norm_weight, norm_bias, eps, dim);
  TORCH_CHECK(chunk > 0, fn, ": chunk must be positive, got ", chunk);
  const int64_t h2 = (h + patch - 1) / patch, w2 = (w + patch - 1) / patch, tokens = b * h2 * w2;
  at::Tensor out = at::empty({b, h2, w2, dim}, image.options().dtype(at::kBFloat16));
#ifdef MMSWIN_AMX
  const bool fp32 = image.scalar_type() == at::kFloat;
  const float* nw = norm_weight.has_value() && norm_weight->defined() ? norm_weight->data_ptr<float>() : nullptr;
  const float* nb = norm_bias.has_value() && norm_bias->defined() ? norm_bias->data_ptr<float>() : nullptr;
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* pixels = fp32 ? image.data_ptr<float>() : nullptr;
  const uint16_t* bits = fp32 ? nullptr : reinterpret_cast<const uint16_t*>(image.data_ptr<at::BFloat16>());
  for_each_chunk((tokens + chunk - 1) / chunk, [&](int64_t part) MMSWIN_AMX {
    const int64_t first = part * chunk, rows = std::min(chunk, tokens - first);
    LineVector<uint16_t> columns(rows * kp, 0);  // each token's patch, (in_channels, patch, patch), as bf16
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t token = first + t, j = token % w2, i = token / w2 % h2, n = token / (w2 * h2);
      uint16_t* to = columns.data() + t * kp;
      for (int64_t ch = 0; ch < channels; ++ch)
        for (int64_t dy = 0; dy < patch && i * patch + dy < h; ++dy) {
          const int64_t offset = ((n * channels + ch) * h + i * patch + dy) * w + j * patch;
          const int64_t width = std::min(patch, w - j * patch);
          uint16_t* row = to + (ch * patch + dy) * patch;
          if (fp32)
            round_to_bf16(pixels + offset, width, row);  // as autocast casts the image
          else
            std::memcpy(row, bits + offset, width * sizeof(uint16_t));
        }
    }
    uint16_t* y = dst + first * dim;
    linear_on_tiles(columns.data(), rows, kp, reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()), dim,
                    bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr,
                    y);
    if (normalise)
      layer_norm_rows(reinterpret_cast<at::BFloat16*>(y), rows, dim, nw, nb, static_cast<float>(eps),
                      reinterpret_cast<at::BFloat16*>(y), nullptr);
  });
#endif
  return out;
}

at::Tensor& gelu_mlp_tiles_(at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                            double eps, bool post_norm, int64_t chunk) {
  const char* fn = "gelu_mlp_rows_";  // its weights packed
  TORCH_CHECK(amx_available(), fn, " needs a CPU with AMX-BF16 that the operating system lets this process use");
  TORCH_CHECK(is_cpu_contiguous(x, at::kBFloat16) && x.dim() == 2, fn,
              ": x must be a contiguous (tokens, C) bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t tokens = x.size(0), c = x.size(1);
  TORCH_CHECK(c % 32 == 0, fn, ": x's C must be a multiple of 32, got ", c);
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == c / 32, fn, ": w1 must be pack_tile_pairs's (H / 16, ", c / 32,
              ", 16, 16) tensor for an (H, ", c, ") weight, got ", w1.sizes());
  const int64_t width = w1.size(0) * 16;
  TORCH_CHECK(width % 32 == 0, fn, ": the hidden width H must be a multiple of 32, got ", width);
  check_packed(fn, "w1", w1, width, c);
  check_packed(fn, "w2", w2, c, width);
  check_bias(fn, "b1", b1, width);
  check_bias(fn, "b2", b2, c);
  check_norm(fn, norm_weight, norm_bias, eps, c);
  TORCH_CHECK(chunk > 0, fn, ": chunk must be positive, got ", chunk);
#ifdef MMSWIN_AMX
  const auto data = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? reinterpret_cast<const uint16_t*>(t->data_ptr<at::BFloat16>()) : nullptr;
  };
  const auto affine = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
  };
  const Mlp m{c,
              width,
              reinterpret_cast<const uint32_t*>(w1.data_ptr<int32_t>()),
              data(b1),
              reinterpret_cast<const uint32_t*>(w2.data_ptr<int32_t>()),
              data(b2),
              affine(norm_weight),
              affine(norm_bias),
              static_cast<float>(eps),
              post_norm};
  uint16_t* rows = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  for_each_chunk(chunks, [&](int64_t i) {
    const int64_t first = i * chunk;
    mlp_rows_on_tiles(m, rows + first * c, std::min(chunk, tokens - first));
  });
#endif
  return x;
}

}  // namespace mmswin
