// The patch embedding's input for CPU bf16: an fp32 image (B, C, H, W) rounded to bf16 and laid out
// channels-last, in one pass (also a bf16 map as it is: the gradient of a backbone output, whose norm's
// backward reads it by token). PyTorch's x.to(bfloat16, memory_format=channels_last) takes about 2.5 ms for a
// 3 x 800 x 1216 image on 2 cores, ten times its plain cast: its copy walks the 3-channel interleave value
// by value. Here 16 pixels of up to 16 channels are loaded as 16 rows, rounded, transposed in registers
// (transpose16) and stored pixel by pixel.
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

#ifdef MMSWIN_X86

using namespace mmswin::simd;

// 16 values (the lanes m) as bf16 bits in 32-bit words: fp32 rounded, bf16 as it is.
MMSWIN_AVX512_BF16 inline __m512i load_words(const float* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(round_bf16(load_ps(p, m)));
}

MMSWIN_AVX512_BF16 inline __m512i load_words(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(load_bf16_bits(p, m));
}

// Pixels [first, first + count) (count <= 16) of one image: src (C, HW) fp32 or bf16 to dst (HW, C) bf16 bits.
template <typename T>
MMSWIN_AVX512_BF16 void pixels_to_channels_last(const T* src, int64_t c, int64_t hw, int64_t first,
                                                int64_t count, uint16_t* dst) {
  const __mmask16 m = first_lanes(count);
  for (int64_t c0 = 0; c0 < c; c0 += 16) {
    const int64_t channels = std::min<int64_t>(16, c - c0);
    __m512i a[16];
    for (int i = 0; i < 16; ++i)
      a[i] = i < channels ? load_words(src + (c0 + i) * hw + first, m) : _mm512_setzero_si512();
    transpose16(a);
    // Pixel p's channels are the first `channels` lanes of a[p]. A whole 32-byte store writes them where the
    // lanes beyond are none (a group of 16) or land, within this call's pixels, on later pixels' values
    // (one group: their own stores come after); elsewhere a masked store.
    const __mmask16 own = first_lanes(channels);
    for (int64_t p = 0; p < count; ++p) {
      uint16_t* out = dst + (first + p) * c + c0;
      const __m256i bits = _mm512_cvtepi32_epi16(a[p]);
      if (channels == 16 || (c0 == 0 && p * c + 16 <= count * c)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bits);
      } else {
        store_bf16_bits(out, own, bits);
      }
    }
  }
}

#endif  // MMSWIN_X86

}  // namespace

namespace mmswin {

at::Tensor channels_last_bf16(const at::Tensor& x) {
  TORCH_CHECK(kernels_available(), "channels_last_bf16 needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK((is_cpu_contiguous(x, at::kFloat) || is_cpu_contiguous(x, at::kBFloat16)) && x.dim() == 4,
              "channels_last_bf16: x must be a contiguous (B, C, H, W) fp32 or bf16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16).memory_format(at::MemoryFormat::ChannelsLast));
#ifdef MMSWIN_X86
  const bool fp32 = x.scalar_type() == at::kFloat;
  const float* src32 = fp32 ? x.data_ptr<float>() : nullptr;
  const auto* src16 = fp32 ? nullptr : reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t tiles = (hw + 15) / 16;
  at::parallel_for(0, b * tiles, std::max<int64_t>(1, 4096 / std::max<int64_t>(c, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / tiles, first = (t % tiles) * 16, count = std::min<int64_t>(16, hw - first);
      if (fp32) {
        pixels_to_channels_last(src32 + image * c * hw, c, hw, first, count, dst + image * hw * c);
      } else {
        pixels_to_channels_last(src16 + image * c * hw, c, hw, first, count, dst + image * hw * c);
      }
    }
  });
#endif
  return out;
}

}  // namespace mmswin
