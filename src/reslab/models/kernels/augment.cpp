// A training batch of in-memory uint8 images as reslab.data.loaders.TensorLoader's tensor ops
// make it (section 4.2's augmentation: normalise, pad, random crop, mirror), in one pass that
// writes each output value once: out[n, c, i, j] = image idx[n]'s pixel (rows[n, i] - pad,
// cols[n, j] - pad) of channel c, normalised as Preprocess.normalize does (u8 * scale - shift,
// fp32, each step rounded), or 0 where that pixel falls in the padding.
//
// The ops it replaces (index_select, a cast, a mul, a sub, F.pad, one gather of the crops and
// flips) each pass over the batch: 0.88 ms for 128 CIFAR images on a 2-core Xeon, ~2% of a
// ResNet-20 training step. The crops and flips stay drawn by torch (loaders.crop_windows), so
// the batch is the same bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>

#include "api.h"

namespace {

// One output row of one image: [W, 3] floats from source row r of img ([3, H, W] uint8).
// Compiled without contraction: u8 * scale rounded to fp32 before shift is subtracted, as torch's
// mul and sub round (a fused multiply-subtract would round once: other bits). GCC contracts
// across statements under its default -ffp-contract=fast; clang's default contracts within an
// expression only, and ignores this attribute.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void crop_row(const uint8_t* img, const float* scale, const float* shift, int64_t H, int64_t W,
              int64_t r, const int64_t* cols, int64_t Wo, int64_t pad, float* out) {
  if (r < 0 || r >= H) {
    std::memset(out, 0, Wo * 3 * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < Wo; ++j) {
    const int64_t s = cols[j] - pad;
    float* o = out + j * 3;
    if (s < 0 || s >= W) {
      o[0] = o[1] = o[2] = 0.0f;
      continue;
    }
    for (int64_t c = 0; c < 3; ++c) {
      const int64_t k = (c * H + r) * W + s;
      const float v = static_cast<float>(img[k]) * scale[k];
      o[c] = v - shift[k];
    }
  }
}

}  // namespace

at::Tensor crop_normalize(const at::Tensor& images, const at::Tensor& idx, const at::Tensor& rows,
                          const at::Tensor& cols, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t pad) {
  TORCH_CHECK(images.device().is_cpu() && images.scalar_type() == at::kByte &&
                  images.dim() == 4 && images.size(1) == 3 && images.is_contiguous(),
              "images must be a contiguous uint8 [M, 3, H, W] CPU tensor");
  const int64_t M = images.size(0), H = images.size(2), W = images.size(3);
  const int64_t N = idx.numel(), Ho = rows.size(-1), Wo = cols.size(-1);
  for (const at::Tensor* t : {&idx, &rows, &cols})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(),
                "idx, rows and cols must be contiguous int64 CPU tensors");
  TORCH_CHECK(idx.dim() == 1 && rows.dim() == 2 && cols.dim() == 2 && rows.size(0) == N &&
                  cols.size(0) == N,
              "rows [N, H] and cols [N, W] for idx [N]");
  for (const at::Tensor* t : {&scale, &shift})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->dim() == 3 && t->size(0) == 3 && t->size(1) == H && t->size(2) == W,
                "scale and shift must be contiguous fp32 [3, H, W] CPU tensors");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(ip[n] >= 0 && ip[n] < M, "image index ", ip[n], " out of range [0, ", M, ")");
  at::Tensor out = at::empty({N, 3, Ho, Wo},
                             images.options().dtype(at::kFloat).memory_format(
                                 at::MemoryFormat::ChannelsLast));
  const uint8_t* src = images.data_ptr<uint8_t>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *cp = cols.data_ptr<int64_t>();
  const float *sc = scale.data_ptr<float>(), *sh = shift.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N * Ho, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t q = r0; q < r1; ++q) {
      const int64_t n = q / Ho, i = q % Ho;
      crop_row(src + ip[n] * 3 * H * W, sc, sh, H, W, rp[n * Ho + i] - pad, cp + n * Wo, Wo, pad,
               dst + q * Wo * 3);
    }
  });
  return out;
}
