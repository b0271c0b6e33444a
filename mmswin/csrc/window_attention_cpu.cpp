// Fused window attention for CPU bf16 (inference, and the forward of training): per window and head, the
// logits of q k^T, their softmax and the weighted sum of v, the logits and weights kept in registers and a
// few cache lines (no (B*nW, nH, N, N) tensor), the products taken with the AVX512-BF16 dot-product
// instruction and fp32 accumulation, the logits kept in fp32 up to the softmax. In inference, on CPUs with AMX
// (Intel's tile matrix multiply, see use_amx), both products run on its tiles, 16 query rows at a time: they sum
// in another order, so the outputs may differ from training's forward by bf16 roundings (without the tiles they
// are the same bits).
//
// It reads q, k and v straight from the qkv projection, qkv (B*nW, N, 3C) bf16 with C = nH * d, and writes
// (B*nW, N, C) bf16, the layout the output projection reads. The logits are
//   V1: scale[h] * q.k + bias[h] + mask[b % nW],
//   V2 (cosine): scale[h] * q.k / (max(|q|, eps) max(|k|, eps)) + bias[h] + mask[b % nW],
// with bias (nH, N, N) fp32, mask (nW, N, N) fp32 or none, scale (nH,) fp32. d must be a multiple of 16.
// For training, window_attention_with_lse also returns each row's lse = log2(sum_j 2^(logit_j * log2(e)))
// in fp32, from which the backward (window_attention_backward_cpu.cpp) recomputes the weights.
//
// window_attention_rows takes the projection of a map's real tokens only, qkv (B, R, 3C), and for the
// positions of nW' windows of N tokens (in each image) slots (nW' * N) naming each one's row of qkv, or -1
// for a position that pads the map, whose token is zero and projects to the projection's bias `pad` (3C).
// It writes the outputs of the real tokens, (B, R, C): padding positions are keys and values, never
// queries, whose outputs the map would crop. A window without padding whose slots are consecutive rows is
// attended in place, without gathering its tokens.
#include "simd.h"
#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using mmswin::LineVector;

constexpr int64_t kMaxTokens = 1024;

#ifdef MMSWIN_X86

using namespace mmswin::simd;

// Per-task scratch: the queries as (N, d) rows, the keys as (d/2, Npad) bf16 pairs (column j of pair p holds
// k[j, 2p], k[j, 2p+1]),
// the values as (ceil(N/2), d) pairs of rows, the keys' scales (cosine attention), and R rows of logits
// (fp32), weights (bf16, unnormalised) and their sums' reciprocals.
// window_attention_rows also gathers the window's tokens (N, 3d) of the head and its query positions, and
// keeps their outputs (N, d) until they are written to their rows.
//
// With AMX tiles (tiles true) the products read whole tiles: the queries' and keys' d pads to dt (a multiple of
// 32) and the weights' and values' N to nt (a multiple of 32) with zeros, the queries are npad rows, and the logits,
// weights and sums hold a tile's 16 rows, whose products accumulate in `products` (16 rows of d).
struct Scratch {
  int64_t dt, nt;  // the queries' row length and the weights' (d and npad without tiles)
  LineVector<uint32_t> keys, values;
  LineVector<float> key_scales, logits, inv_sums, products;
  LineVector<uint16_t> queries, weights, tokens, outputs;
  std::vector<int64_t> positions;
  LineVector<float> lse;
  Scratch(int64_t n, int64_t npad, int64_t d, int64_t rows, bool gathered = false, bool tiles = false)
      : dt(tiles ? (d + 31) / 32 * 32 : d), nt(tiles ? (npad + 31) / 32 * 32 : npad), keys(dt / 2 * npad),
        values((tiles ? nt : n + 1) / 2 * d), key_scales(npad), logits((tiles ? 16 : rows) * npad),
        inv_sums(tiles ? 16 : rows), products(tiles ? 16 * d : 0), queries((tiles ? npad : n) * dt),
        weights((tiles ? 16 : rows) * nt), tokens(gathered ? n * 3 * d : 0), outputs(gathered ? n * d : 0),
        positions(gathered ? n : 0), lse(gathered ? n : 0) {}
};

constexpr int kRows = 4;  // query rows per register block

// out[r, c0*16 : (c0+C)*16] = inv_sums[r] * weights[r] @ v for R rows and C vectors of 16 channels, in bf16.
template <int R, int C>
MMSWIN_AVX512_BF16 inline void row_outputs(const uint32_t* weights, int64_t w_stride, const float* inv_sums,
                                           const uint32_t* values, int64_t d, int64_t pairs, int64_t c0,
                                           uint16_t* out, int64_t out_stride) {
  __m512 acc[R][C];
  dot_block<R, C>(weights, w_stride, values, d, pairs, c0, acc);
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sums[r]);
    for (int c = 0; c < C; ++c) store_bf16(out + r * out_stride + (c0 + c) * 16, _mm512_mul_ps(acc[r][c], inv));
  }
}

template <int R>
MMSWIN_AVX512_BF16 void block_outputs(const uint32_t* weights, int64_t w_stride, const float* inv_sums,
                                      const uint32_t* values, int64_t d, int64_t pairs, uint16_t* out,
                                      int64_t out_stride) {
  const int64_t vecs = d / 16;
  int64_t c0 = 0;
  for (; c0 + 2 <= vecs; c0 += 2)
    row_outputs<R, 2>(weights, w_stride, inv_sums, values, d, pairs, c0, out, out_stride);
  if (c0 < vecs) row_outputs<R, 1>(weights, w_stride, inv_sums, values, d, pairs, c0, out, out_stride);
}

// The keys' scales 1 / max(|k|, eps) of cosine attention, from the keys packed as columns.
MMSWIN_AVX512_BF16 void key_scales(const uint32_t* keys, int64_t npad, int64_t d, float* scales) {
  for (int64_t j0 = 0; j0 < npad; j0 += 16) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; ++p) {
      const __m512i kv = _mm512_loadu_si512(keys + p * npad + j0);
      squares = dot_pairs(squares, kv, kv);
    }
    const __m512 length = _mm512_max_ps(_mm512_sqrt_ps(squares), _mm512_set1_ps(kNormEps));
    _mm512_storeu_ps(scales + j0, _mm512_div_ps(_mm512_set1_ps(1.0f), length));
  }
}

struct Head {
  const uint16_t* q;  // row i at q + i * stride
  int64_t stride;     // elements between the rows of q (3C in qkv, d in the scratch copy)
  const int64_t* positions;  // query row i's position in the window (its bias and mask row), or null: i
  int64_t queries;           // query rows
  const float* bias;  // (N, N)
  const float* mask;  // (N, N) or null
  float scale;
  bool cosine;
  int64_t n, npad, d;
  uint16_t* out;      // row i at out + i * out_stride
  int64_t out_stride;
  float* lse;         // row i's log2 of the sum of 2^(logit * log2(e)), at lse[i * lse_stride]; or null
  int64_t lse_stride;
};

// Row i's bias and mask rows (mask null where there is none) and its logits' factor: the head's scale, over
// the query's length in cosine attention.
MMSWIN_AVX512_BF16 inline float row_terms(const Head& h, int64_t i, const float*& bias, const float*& mask) {
  const int64_t at = (h.positions != nullptr ? h.positions[i] : i) * h.n;
  bias = h.bias + at;
  mask = h.mask != nullptr ? h.mask + at : nullptr;
  if (!h.cosine) return h.scale;
  return h.scale / std::max(std::sqrt(squared_length(h.q + i * h.stride, h.d)), kNormEps);
}

// Vector t of a row's logits from its products x: x * scale (* the keys' scales) + bias (+ mask) in lanes m
// (the keys', lanes 0 to N - 16 t - 1), -inf in the others.
MMSWIN_AVX512_BF16 __attribute__((always_inline)) inline __m512 logit_vector(const Head& h, const Scratch& s,
                                                                             __m512 x, __m512 scale,
                                                                             const float* bias, const float* mask,
                                                                             int64_t t, __mmask16 m) {
  x = _mm512_mul_ps(x, scale);
  if (h.cosine) x = _mm512_mul_ps(x, _mm512_loadu_ps(s.key_scales.data() + t * 16));
  x = _mm512_add_ps(x, load_ps(bias + t * 16, m));
  if (mask != nullptr) x = _mm512_add_ps(x, load_ps(mask + t * 16, m));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, x);
}

// The end of row i0 + r's softmax from the fp32 sum of its weights: the sum's reciprocal, and its lse.
MMSWIN_AVX512_BF16 inline void finish_row(const Head& h, int64_t i0, int r, __m512 shift, __m512 sum, Scratch& s,
                                          int64_t at = 0) {
  const float total = _mm512_reduce_add_ps(sum);
  s.inv_sums[at + r] = 1.0f / total;
  if (h.lse != nullptr) h.lse[(i0 + r) * h.lse_stride] = _mm512_cvtss_f32(shift) + std::log2(total);
}

// The softmax of R rows of logits (fp32, in the scratch from its row `at`): the logit vectors, exponentiated
// relative to each row's maximum into bf16 weights (0 from lane N on; rows s.nt apart), and the reciprocals of
// their fp32 sums. The rows are interleaved: each one's reductions are a chain of dependent steps that the CPU
// overlaps with the others'.
template <int R>
MMSWIN_AVX512_BF16 void softmax_rows(const Head& h, int64_t i0, Scratch& s, int64_t at = 0) {
  const int64_t vecs = h.npad / 16;
  __m512 scale[R], top[R], sum[R];
  const float* bias[R];
  const float* mask[R];
  for (int r = 0; r < R; ++r) {
    scale[r] = _mm512_set1_ps(row_terms(h, i0 + r, bias[r], mask[r]));
    top[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    sum[r] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < vecs; ++t) {
    for (int r = 0; r < R; ++r) {
      float* logits = s.logits.data() + (at + r) * h.npad + t * 16;
      const __m512 x = logit_vector(h, s, _mm512_loadu_ps(logits), scale[r], bias[r], mask[r], t,
                                    first_lanes(h.n - t * 16));
      _mm512_storeu_ps(logits, x);
      top[r] = _mm512_max_ps(top[r], x);
    }
  }
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  __m512 shift[R];
  for (int r = 0; r < R; ++r) shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]) * kLog2e);
  for (int64_t t = 0; t < vecs; ++t) {
    for (int r = 0; r < R; ++r) {
      const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s.logits.data() + (at + r) * h.npad + t * 16),
                                               log2e, shift[r]));
      sum[r] = _mm512_add_ps(sum[r], e);
      store_bf16(s.weights.data() + (at + r) * s.nt + t * 16, e);
    }
  }
  for (int r = 0; r < R; ++r) finish_row(h, i0, r, shift[r], sum[r], s, at);
}

// softmax_rows of a tile's 16 rows of logits (without lse), the same values: their maxima and sums reduced in one
// tree (reduce_rows), and where N = 16 k + 1 (7 x 7 windows) the last key's logits of the 16 rows taken as one
// vector, gathered from the rows and its weights scattered to them, where each row would spend a whole vector
// (a quarter of its work) on one lane. That lane's weight is added to the row's sum last, as in softmax_rows.
MMSWIN_AVX512_BF16 void softmax_tile(const Head& h, int64_t i0, Scratch& s) {
  const int64_t n = h.n, npad = h.npad, last_key = n - 1;
  const bool column = n % 16 == 1;
  const int64_t vecs = column ? n / 16 : npad / 16;  // of each row
  const __mmask16 last = column ? static_cast<__mmask16>(0xFFFF) : first_lanes(n - 16 * (vecs - 1));
  alignas(64) float scales[16];
  alignas(64) int32_t terms_at[16];  // row r's bias and mask at the last key, from the head's (N, N)
  __m512 rows[16];
  for (int r = 0; r < 16; ++r) {
    const float* bias;
    const float* mask;
    scales[r] = row_terms(h, i0 + r, bias, mask);
    terms_at[r] = static_cast<int32_t>(bias - h.bias + last_key);
    const __m512 scale = _mm512_set1_ps(scales[r]);
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < vecs; ++t) {
      float* logits = s.logits.data() + r * npad + t * 16;
      const __m512 x = logit_vector(h, s, _mm512_loadu_ps(logits), scale, bias, mask, t,
                                    t == vecs - 1 ? last : static_cast<__mmask16>(0xFFFF));
      _mm512_storeu_ps(logits, x);
      top = _mm512_max_ps(top, x);
    }
    rows[r] = top;
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 maxima = reduce_rows<true>(rows), key = _mm512_setzero_ps();  // key: the last key's logits (lane r: row r's)
  if (column) {
    const __m512i at = _mm512_load_si512(terms_at);
    key = _mm512_i32gather_ps(_mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(npad)),
                                               _mm512_set1_epi32(last_key)), s.logits.data(), 4);
    key = _mm512_mul_ps(key, _mm512_load_ps(scales));
    if (h.cosine) key = _mm512_mul_ps(key, _mm512_set1_ps(s.key_scales[last_key]));
    key = _mm512_add_ps(key, _mm512_i32gather_ps(at, h.bias, 4));
    if (h.mask != nullptr) key = _mm512_add_ps(key, _mm512_i32gather_ps(at, h.mask, 4));
    maxima = _mm512_max_ps(maxima, key);
  }
  const __m512 log2e = _mm512_set1_ps(kLog2e), shift = _mm512_mul_ps(maxima, log2e);
  alignas(64) float shifts[16];
  _mm512_store_ps(shifts, shift);
  for (int r = 0; r < 16; ++r) {
    const __m512 row_shift = _mm512_set1_ps(shifts[r]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < vecs; ++t) {
      const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s.logits.data() + r * npad + t * 16), log2e,
                                               row_shift));
      sum = _mm512_add_ps(sum, e);
      store_bf16(s.weights.data() + r * s.nt + t * 16, e);
    }
    rows[r] = sum;
  }
  if (column) {  // the weights of the last key (and zero for the padding key after it: a word per row)
    const __m512 e = exp2_ps(_mm512_fmsub_ps(key, log2e, shift));
    _mm512_i32scatter_epi32(s.weights.data(), _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(s.nt / 2)),
                                                                _mm512_set1_epi32(last_key / 2)),
                            _mm512_cvtepu16_epi32(round_bf16(e)), 4);
    alignas(64) float weights[16];
    _mm512_store_ps(weights, e);
    for (int r = 0; r < 16; ++r) rows[r] = _mm512_mask_add_ps(rows[r], 1, rows[r], _mm512_set1_ps(weights[r]));
  }
  _mm512_storeu_ps(s.inv_sums.data(), _mm512_div_ps(_mm512_set1_ps(1.0f), reduce_rows<false>(rows)));
}

// q k^T and softmax_rows of R rows of windows of at most 16 V tokens, the logits kept in registers from the
// products to their exponentials (the same values, without storing and reloading them).
template <int R, int V>
MMSWIN_AVX512_BF16 void softmax_rows_in_registers(const Head& h, int64_t i0, Scratch& s) {
  __m512 x[R][V];
  dot_block<R, V>(reinterpret_cast<const uint32_t*>(h.q + i0 * h.stride), h.stride / 2, s.keys.data(), h.npad,
                  h.d / 2, 0, x);
  const __mmask16 last = first_lanes(h.n - 16 * (V - 1));
  __m512 shift[R];
  for (int r = 0; r < R; ++r) {
    const float* bias;
    const float* mask;
    const __m512 scale = _mm512_set1_ps(row_terms(h, i0 + r, bias, mask));
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int t = 0; t < V; ++t) {
      // (a constant mask but for the last vector: whole vectors take the plain loads)
      x[r][t] = logit_vector(h, s, x[r][t], scale, bias, mask, t, t == V - 1 ? last : static_cast<__mmask16>(0xFFFF));
      top = _mm512_max_ps(top, x[r][t]);
    }
    shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top) * kLog2e);
  }
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  for (int r = 0; r < R; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < V; ++t) {
      const __m512 e = exp2_ps(_mm512_fmsub_ps(x[r][t], log2e, shift[r]));
      sum = _mm512_add_ps(sum, e);
      store_bf16(s.weights.data() + r * h.npad + t * 16, e);
    }
    finish_row(h, i0, r, shift[r], sum, s);
  }
}

template <int R>
MMSWIN_AVX512_BF16 void attend_rows(const Head& h, int64_t i0, Scratch& s) {
  switch (h.npad / 16) {  // windows of up to 64 tokens (8 x 8) in registers
    case 1: softmax_rows_in_registers<R, 1>(h, i0, s); break;
    case 2: softmax_rows_in_registers<R, 2>(h, i0, s); break;
    case 3: softmax_rows_in_registers<R, 3>(h, i0, s); break;
    case 4: softmax_rows_in_registers<R, 4>(h, i0, s); break;
    default:
      dot_all_columns<R>(reinterpret_cast<const uint32_t*>(h.q + i0 * h.stride), h.stride / 2, s.keys.data(),
                         h.npad, h.d / 2, s.logits.data());
      softmax_rows<R>(h, i0, s);
  }
  block_outputs<R>(reinterpret_cast<const uint32_t*>(s.weights.data()), h.npad / 2, s.inv_sums.data(),
                   s.values.data(), h.d, (h.n + 1) / 2, h.out + i0 * h.out_stride, h.out_stride);
}

// The d values of n rows, from src + rows[i] * stride (rows null: i) to dst + i * d: the head's query rows
// into the task's scratch (all of their cache lines requested at once here, where the products that read
// them row by row would each wait on a miss), and its outputs back to their rows.
MMSWIN_AVX512_BF16 void copy_rows(const uint16_t* src, int64_t stride, const int64_t* rows, int64_t n, int64_t d,
                                  uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) copy_values(src + (rows != nullptr ? rows[i] : i) * stride, d, dst + i * d);
}

// Requests the cache lines of one head's q, k and v in n token rows, row i at qkv + rows[i] * 3C (rows null:
// i; a negative row, a padding position, is skipped), ahead of their use. A thread attends a window's heads
// one after another, each reading a few lines of every row, a pattern the CPU's prefetchers do not follow:
// the next window's lines are requested while this one is attended (about a fifth of the kernel's time at
// 800x1216, where qkv is far larger than the caches). Inlined where it is called: compiled as a function of
// its own, it was found without effects and its calls dropped.
__attribute__((always_inline)) inline void prefetch_head_rows(const uint16_t* qkv, const int64_t* rows, int64_t n,
                                                              int64_t c, int64_t d) {
  const char* base = reinterpret_cast<const char*>(qkv);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = rows != nullptr ? rows[i] : i;
    if (row < 0) continue;
    for (int part = 0; part < 3; ++part) {
      const char* at = base + (row * 3 * c + part * c) * 2;
      for (int64_t offset = 0; offset < 2 * d; offset += 64) _mm_prefetch(at + offset, _MM_HINT_T0);
    }
  }
}

MMSWIN_AVX512_BF16 void attend_head(const Head& head, const uint16_t* k, const uint16_t* v, Scratch& s) {
  pack_columns(k, head.stride, head.n, head.npad, head.d, s.keys.data());
  if (head.cosine) key_scales(s.keys.data(), head.npad, head.d, s.key_scales.data());
  pack_row_pairs(v, head.stride, head.n, head.d, s.values.data());
  copy_rows(head.q, head.stride, head.positions, head.queries, head.d, s.queries.data());
  Head h = head;
  h.q = s.queries.data();
  h.stride = h.d;
  int64_t i = 0;
  for (; i + kRows <= h.queries; i += kRows) attend_rows<kRows>(h, i, s);
  switch (h.queries - i) {
    case 3: attend_rows<3>(h, i, s); break;
    case 2: attend_rows<2>(h, i, s); break;
    case 1: attend_rows<1>(h, i, s); break;
    default: break;
  }
}

#ifdef MMSWIN_AMX

// out[:, g*16 : (g+1)*16] = a @ b[:, (g0+g)*16 : (g0+g+1)*16] for g < G: 16 rows of a (bf16, a_stride values apart,
// `chunks` chunks of 32 along the reduction axis) times b packed as pairs of rows (words, b_stride words apart, 16
// pairs per chunk), into fp32 out (out_stride floats apart). Tiles 0-3 accumulate, tile 4 holds a's rows, tiles 5
// and 6 b's pairs of rows.
template <int G>
MMSWIN_AMX void tile_products(const uint16_t* a, int64_t a_stride, const uint32_t* b, int64_t b_stride, int64_t g0,
                              int64_t chunks, float* out, int64_t out_stride) {
  _tile_zero(0);
  if (G > 1) _tile_zero(1);
  if (G > 2) _tile_zero(2);
  if (G > 3) _tile_zero(3);
  for (int64_t k = 0; k < chunks; ++k) {
    const uint32_t* right = b + k * 16 * b_stride + g0 * 16;
    _tile_loadd(4, a + k * 32, a_stride * 2);
    _tile_loadd(5, right, b_stride * 4);
    _tile_dpbf16ps(0, 4, 5);
    if (G > 1) {
      _tile_loadd(6, right + 16, b_stride * 4);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (G > 2) {
      _tile_loadd(5, right + 32, b_stride * 4);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (G > 3) {
      _tile_loadd(6, right + 48, b_stride * 4);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, out, out_stride * 4);
  if (G > 1) _tile_stored(1, out + 16, out_stride * 4);
  if (G > 2) _tile_stored(2, out + 32, out_stride * 4);
  if (G > 3) _tile_stored(3, out + 48, out_stride * 4);
}

// tile_products over `blocks` blocks of 16 columns of b, four at a time.
MMSWIN_AMX void tile_product_blocks(const uint16_t* a, int64_t a_stride, const uint32_t* b, int64_t b_stride,
                                    int64_t blocks, int64_t chunks, float* out, int64_t out_stride) {
  for (int64_t g0 = 0; g0 < blocks; g0 += 4) {
    switch (std::min<int64_t>(4, blocks - g0)) {
      case 4: tile_products<4>(a, a_stride, b, b_stride, g0, chunks, out + g0 * 16, out_stride); break;
      case 3: tile_products<3>(a, a_stride, b, b_stride, g0, chunks, out + g0 * 16, out_stride); break;
      case 2: tile_products<2>(a, a_stride, b, b_stride, g0, chunks, out + g0 * 16, out_stride); break;
      default: tile_products<1>(a, a_stride, b, b_stride, g0, chunks, out + g0 * 16, out_stride); break;
    }
  }
}

// attend_head with both products on AMX tiles, 16 query rows at a time: their logits (16, npad) from the queries
// (npad, dt) and the keys' pairs (dt/2, npad), the softmax as without tiles, and the weights (16, nt) times the
// values' pairs (nt/2, d). The padding of the scratch's layouts is zero (never written), the rows past the
// queries' are computed and left unused.
MMSWIN_AMX void attend_head_tiles(const Head& head, const uint16_t* k, const uint16_t* v, Scratch& s) {
  const int64_t d = head.d, npad = head.npad;
  pack_columns(k, head.stride, head.n, npad, d, s.keys.data());
  if (head.cosine) key_scales(s.keys.data(), npad, d, s.key_scales.data());
  pack_row_pairs(v, head.stride, head.n, d, s.values.data());
  // Whole tiles of queries in their own rows (a window's, d a multiple of 32) are read there, the rest copied.
  const bool in_place = head.positions == nullptr && d == s.dt;
  const int64_t first_copied = in_place ? head.queries / 16 * 16 : 0;
  for (int64_t i = first_copied; i < head.queries; ++i)
    copy_values(head.q + (head.positions != nullptr ? head.positions[i] : i) * head.stride, d,
                s.queries.data() + i * s.dt);
  Head h = head;
  if (!in_place) {
    h.q = s.queries.data();
    h.stride = s.dt;
  }
  mmswin::tiles::configure();
  for (int64_t i0 = 0; i0 < h.queries; i0 += 16) {
    const bool whole = i0 < first_copied;
    tile_product_blocks(whole ? head.q + i0 * head.stride : s.queries.data() + i0 * s.dt,
                        whole ? head.stride : s.dt, s.keys.data(), npad, npad / 16, s.dt / 32, s.logits.data(), npad);
    const int64_t rows = std::min<int64_t>(16, h.queries - i0);
    int64_t r = rows == 16 ? 16 : 0;
    if (rows == 16) softmax_tile(h, i0, s);
    for (; r + kRows <= rows; r += kRows) softmax_rows<kRows>(h, i0 + r, s, r);
    switch (rows - r) {
      case 3: softmax_rows<3>(h, i0 + r, s, r); break;
      case 2: softmax_rows<2>(h, i0 + r, s, r); break;
      case 1: softmax_rows<1>(h, i0 + r, s, r); break;
      default: break;
    }
    tile_product_blocks(s.weights.data(), s.nt, s.values.data(), d, d / 16, s.nt / 32, s.products.data(), d);
    for (r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(s.inv_sums[r]);
      for (int64_t c = 0; c < d; c += 16)
        store_bf16(h.out + (i0 + r) * h.out_stride + c, _mm512_mul_ps(_mm512_loadu_ps(s.products.data() + r * d + c),
                                                                       inv));
    }
  }
  _tile_release();
}

#endif  // MMSWIN_AMX

// attend_head on AMX tiles where the scratch is laid out for them, else on AVX512-BF16 instructions.
MMSWIN_AVX512_BF16 void attend_head_on(const Head& head, const uint16_t* k, const uint16_t* v, Scratch& s,
                                       bool tiles) {
#ifdef MMSWIN_AMX
  if (tiles) return attend_head_tiles(head, k, v, s);
#endif
  attend_head(head, k, v, s);
}

// window_attention_rows's task for head hd of one window: its N tokens from the rows of qkv (3C apart)
// that slot names, or from pad where slot is -1; the outputs of its real tokens to the same rows of out (C
// apart), and their lse to the same rows of lse (nH apart) unless null.
MMSWIN_AVX512_BF16 void attend_window_rows(const uint16_t* qkv, const int64_t* slot, const uint16_t* pad, Head h,
                                           int64_t c, uint16_t* out, float* lse, int64_t heads, Scratch& s,
                                           bool tiles) {
  const int64_t n = h.n, d = h.d;
  if (mmswin::consecutive_slots(slot, n)) {  // no padding, the window's rows in order: attended in place
    h.q = qkv + slot[0] * 3 * c;
    h.stride = 3 * c;
    h.queries = n;
    h.out = out + slot[0] * c;
    h.out_stride = c;
    h.lse = lse != nullptr ? lse + slot[0] * heads : nullptr;
    h.lse_stride = heads;
    attend_head_on(h, h.q + c, h.q + 2 * c, s, tiles);
    return;
  }
  int64_t queries = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* from = slot[i] >= 0 ? qkv + slot[i] * 3 * c : pad;
    for (int part = 0; part < 3; ++part) copy_values(from + part * c, d, s.tokens.data() + (3 * i + part) * d);
    if (slot[i] >= 0) s.positions[queries++] = i;
  }
  h.q = s.tokens.data();
  h.stride = 3 * d;
  h.positions = s.positions.data();
  h.queries = queries;
  h.out = s.outputs.data();
  h.out_stride = d;
  h.lse = lse != nullptr ? s.lse.data() : nullptr;
  h.lse_stride = 1;
  attend_head_on(h, s.tokens.data() + d, s.tokens.data() + 2 * d, s, tiles);
  for (int64_t j = 0; j < queries; ++j) {
    const int64_t row = slot[s.positions[j]];
    copy_values(s.outputs.data() + j * d, d, out + row * c);
    if (lse != nullptr) lse[row * heads] = s.lse[j];
  }
}

#endif  // MMSWIN_X86

// The forward of both entry points: the output and, with_lse, each row's lse (B*nW, nH, N) fp32.
std::tuple<at::Tensor, at::Tensor> attend(const char* fn, const at::Tensor& qkv, int64_t heads,
                                          const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& scale, bool cosine, bool with_lse) {
  const mmswin::WindowShapes w = mmswin::check_window_attention(fn, qkv, heads, bias, mask, scale);
  at::Tensor out = at::empty({w.bw, w.n, w.c}, qkv.options());
  at::Tensor lse;
  if (with_lse) lse = at::empty({w.bw, heads, w.n}, qkv.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bias_data = bias.data_ptr<float>();
  const float* mask_data = w.nw > 0 ? mask->data_ptr<float>() : nullptr;
  const float* scales = scale.data_ptr<float>();
  float* lse_data = lse.defined() ? lse.data_ptr<float>() : nullptr;
  const int64_t n = w.n, c = w.c, d = w.d, npad = (n + 15) / 16 * 16;
  const bool tiles = !with_lse && mmswin::use_amx();
  at::parallel_for(0, w.bw * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, npad, d, kRows, false, tiles);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, hd = task % heads;
      const uint16_t* q = src + b * n * 3 * c + hd * d;
      const Head h{q, 3 * c, nullptr, n, bias_data + hd * n * n,
                   mask_data ? mask_data + (b % w.nw) * n * n : nullptr, scales[hd], cosine, n, npad, d,
                   dst + b * n * c + hd * d, c, lse_data ? lse_data + task * n : nullptr, 1};
      if (b + 1 < w.bw) prefetch_head_rows(q + n * 3 * c, nullptr, n, c, d);
      attend_head_on(h, q + c, q + 2 * c, s, tiles);
    }
  });
#endif
  return {out, lse};
}

}  // namespace

namespace mmswin {

WindowShapes check_window_attention(const char* fn, const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                                    const c10::optional<at::Tensor>& mask, const at::Tensor& scale) {
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(qkv, at::kBFloat16) && qkv.dim() == 3,
              fn, ": qkv must be a contiguous (B*nW, N, 3C) bf16 CPU tensor, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  return check_window_sizes(fn, qkv.size(0), qkv.size(1), qkv.size(2), heads, bias, mask, scale);
}

WindowShapes check_window_sizes(const char* fn, int64_t windows, int64_t n, int64_t c3, int64_t heads,
                                const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                const at::Tensor& scale) {
  WindowShapes w;
  w.bw = windows;
  w.n = n;
  TORCH_CHECK(heads >= 1 && c3 % (3 * heads) == 0, fn, ": qkv's last axis (", c3,
              ") is not 3 * heads * d for heads=", heads);
  w.c = c3 / 3;
  w.d = w.c / heads;
  TORCH_CHECK(w.d % 16 == 0, fn, ": the head width must be a multiple of 16, got ", w.d);
  TORCH_CHECK(n >= 1 && n <= kMaxTokens, fn, ": windows of 1 to ", kMaxTokens, " tokens, got ", n);
  TORCH_CHECK(is_cpu_contiguous(bias, at::kFloat) && bias.sizes() == at::IntArrayRef({heads, n, n}),
              fn, ": bias must be a contiguous (nH, N, N) = (", heads, ", ", n, ", ", n,
              ") fp32 CPU tensor, got ", bias.sizes(), " ", bias.scalar_type());
  TORCH_CHECK(is_cpu_contiguous(scale, at::kFloat) && scale.numel() == heads,
              fn, ": scale must hold one fp32 number per head (", heads, "), got ", scale.sizes(), " ",
              scale.scalar_type());
  w.nw = 0;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(is_cpu_contiguous(m, at::kFloat) && m.dim() == 3 && m.size(0) >= 1 && m.size(1) == n && m.size(2) == n,
                fn, ": mask must be a contiguous (nW, N, N) fp32 CPU tensor with N=", n, ", got ", m.sizes(), " ",
                m.scalar_type());
    TORCH_CHECK(w.bw % m.size(0) == 0, fn, ": ", w.bw, " windows are not whole images of ", m.size(0),
                " mask windows");
    w.nw = m.size(0);
  }
  return w;
}

at::Tensor window_attention(const at::Tensor& qkv, int64_t heads, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine) {
  return std::get<0>(attend("window_attention", qkv, heads, bias, mask, scale, cosine, false));
}

WindowShapes check_window_rows(const char* fn, const at::Tensor& qkv, const at::Tensor& slots, const at::Tensor& pad,
                               int64_t heads, const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                               const at::Tensor& scale) {
  TORCH_CHECK(kernels_available(), fn, " needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(qkv, at::kBFloat16) && qkv.dim() == 3,
              fn, ": qkv must be a contiguous (B, R, 3C) bf16 CPU tensor, got ", qkv.sizes(), " ", qkv.scalar_type());
  return check_window_slots(fn, qkv.size(0), qkv.size(1), qkv.size(2), slots, pad, heads, bias, mask, scale);
}

WindowShapes check_window_slots(const char* fn, int64_t images, int64_t rows, int64_t c3, const at::Tensor& slots,
                                const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& scale) {
  TORCH_CHECK(bias.dim() == 3, fn, ": bias must be a contiguous (nH, N, N) fp32 CPU tensor, got ", bias.sizes());
  const int64_t n = bias.size(1);
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  slots.is_contiguous() && n >= 1 && slots.numel() % n == 0,
              fn, ": slots must be a contiguous (nW * N,) int64 CPU tensor with N=", n, ", got ", slots.sizes(), " ",
              slots.scalar_type());
  const WindowShapes w = check_window_sizes(fn, images * (slots.numel() / n), n, c3, heads, bias, mask, scale);
  TORCH_CHECK(is_cpu_contiguous(pad, at::kBFloat16) && pad.dim() == 1 && pad.size(0) == 3 * w.c,
              fn, ": pad must be a contiguous (3C,) = (", 3 * w.c, ",) bf16 CPU tensor, got ", pad.sizes(), " ",
              pad.scalar_type());
  // Every row of qkv is named once: each output row is written once, by one task per head.
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  std::vector<char> named(rows, 0);
  for (int64_t i = 0; i < slots.numel(); ++i) {
    const int64_t row = slot_data[i];
    TORCH_CHECK(row >= -1 && row < rows, fn, ": slots[", i, "] = ", row, " is neither -1 nor a row of qkv's ",
                rows);
    if (row < 0) continue;
    TORCH_CHECK(!named[row], fn, ": slots name row ", row, " twice (at ", i, ")");
    named[row] = 1;
  }
  TORCH_CHECK(std::count(named.begin(), named.end(), 1) == rows, fn, ": slots name ",
              std::count(named.begin(), named.end(), 1), " of qkv's ", rows, " rows, not all of them");
  return w;
}

namespace {

// The forward of both rows entry points: the outputs (B, R, C), into `into` where given, and, with_lse, each
// real token's lse (B, R, nH) fp32.
std::tuple<at::Tensor, at::Tensor> rows_forward(const char* fn, const at::Tensor& qkv, const at::Tensor& slots,
                                                const at::Tensor& pad, int64_t heads, const at::Tensor& bias,
                                                const c10::optional<at::Tensor>& mask, const at::Tensor& scale,
                                                bool cosine, bool with_lse,
                                                const c10::optional<at::Tensor>& into = c10::nullopt) {
  const WindowShapes w = check_window_rows(fn, qkv, slots, pad, heads, bias, mask, scale);
  const int64_t n = w.n, rows = qkv.size(1), windows = slots.numel() / n;
  if (into.has_value())
    TORCH_CHECK(is_cpu_contiguous(*into, at::kBFloat16) && into->sizes() == at::IntArrayRef({qkv.size(0), rows, w.c}),
                fn, ": out must be a contiguous (B, R, C) = (", qkv.size(0), ", ", rows, ", ", w.c,
                ") bf16 CPU tensor, got ", into->sizes(), " ", into->scalar_type());
  at::Tensor out = into.has_value() ? *into : at::empty({qkv.size(0), rows, w.c}, qkv.options());
  at::Tensor lse;
  if (with_lse) lse = at::empty({qkv.size(0), rows, heads}, qkv.options().dtype(at::kFloat));
#ifdef MMSWIN_X86
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  const auto* pad_data = reinterpret_cast<const uint16_t*>(pad.data_ptr<at::BFloat16>());
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* lse_data = with_lse ? lse.data_ptr<float>() : nullptr;
  const float* bias_data = bias.data_ptr<float>();
  const float* mask_data = w.nw > 0 ? mask->data_ptr<float>() : nullptr;
  const float* scales = scale.data_ptr<float>();
  const int64_t c = w.c, d = w.d, npad = (n + 15) / 16 * 16;
  const bool tiles = !with_lse && mmswin::use_amx();
  at::parallel_for(0, w.bw * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, npad, d, kRows, true, tiles);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, hd = task % heads, image = b / windows;
      const Head h{nullptr, 0, nullptr, 0, bias_data + hd * n * n,
                   mask_data ? mask_data + (b % w.nw) * n * n : nullptr, scales[hd], cosine, n, npad, d,
                   nullptr, 0, nullptr, 1};
      if (b + 1 < w.bw)
        prefetch_head_rows(src + (b + 1) / windows * rows * 3 * c + hd * d, slot_data + (b + 1) % windows * n, n, c,
                           d);
      attend_window_rows(src + image * rows * 3 * c + hd * d, slot_data + (b % windows) * n, pad_data + hd * d, h,
                         c, dst + image * rows * c + hd * d, lse_data ? lse_data + image * rows * heads + hd : nullptr,
                         heads, s, tiles);
    }
  });
#endif
  return {out, lse};
}

}  // namespace

at::Tensor window_attention_rows(const at::Tensor& qkv, const at::Tensor& slots, const at::Tensor& pad, int64_t heads,
                                 const at::Tensor& bias, const c10::optional<at::Tensor>& mask,
                                 const at::Tensor& scale, bool cosine) {
  return std::get<0>(rows_forward("window_attention_rows", qkv, slots, pad, heads, bias, mask, scale, cosine, false));
}

std::tuple<at::Tensor, at::Tensor> window_attention_rows_with_lse(const at::Tensor& qkv, const at::Tensor& slots,
                                                                  const at::Tensor& pad, int64_t heads,
                                                                  const at::Tensor& bias,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  const at::Tensor& scale, bool cosine,
                                                                  const c10::optional<at::Tensor>& out) {
  return rows_forward("window_attention_rows_with_lse", qkv, slots, pad, heads, bias, mask, scale, cosine, true, out);
}

std::tuple<at::Tensor, at::Tensor> window_attention_with_lse(const at::Tensor& qkv, int64_t heads,
                                                             const at::Tensor& bias,
                                                             const c10::optional<at::Tensor>& mask,
                                                             const at::Tensor& scale, bool cosine) {
  return attend("window_attention_with_lse", qkv, heads, bias, mask, scale, cosine, true);
}

}  // namespace mmswin
