// Sums of bf16 parts in fp32, as the training passes sum weight and bias gradients over chunks of tokens:
// total += part in one pass over both. PyTorch's add_ of a bf16 tensor to an fp32 one first copies the
// part into a fresh fp32 tensor. A bf16 value is exact in fp32, so the sums are those of
// total.add_(part.float()) bit for bit.
#include "simd.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: the tasks of a weight gradient stay few

#ifdef MMSWIN_X86

using namespace mmswin::simd;

MMSWIN_AVX512_BF16 void add_widened(float* total, const uint16_t* part, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = first_lanes(end - i);
    store_ps(total + i, m, _mm512_add_ps(load_ps(total + i, m), load_bf16(part + i, m)));
  }
}

#endif  // MMSWIN_X86

}  // namespace

namespace mmswin {

at::Tensor& accumulate_(at::Tensor& total, const at::Tensor& part) {
  TORCH_CHECK(kernels_available(), "accumulate_ needs an x86 CPU with AVX512-BF16");
  TORCH_CHECK(is_cpu_contiguous(total, at::kFloat), "accumulate_: total must be a contiguous fp32 CPU tensor, got ",
              total.sizes(), " ", total.scalar_type(), total.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(is_cpu_contiguous(part, at::kBFloat16) && part.sizes() == total.sizes(),
              "accumulate_: part must be a contiguous bf16 CPU tensor of total's shape ", total.sizes(), ", got ",
              part.sizes(), " ", part.scalar_type(), part.is_contiguous() ? "" : " (not contiguous)");
#ifdef MMSWIN_X86
  float* sums = total.data_ptr<float>();
  const auto* values = reinterpret_cast<const uint16_t*>(part.data_ptr<at::BFloat16>());
  at::parallel_for(0, total.numel(), kGrain,
                   [&](int64_t begin, int64_t end) { add_widened(sums, values, begin, end); });
#endif
  return total;
}

}  // namespace mmswin
