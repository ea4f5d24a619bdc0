// vitfast::preprocess on the CPU: uint8 images [B, H, W, 3] -> normalized [B, 3, H, W] or patch rows [B, N, 3*p*p].
//
// One pass over the bytes through a 3 x 256 table of normalize_byte values: the table holds exactly the fp32 values
// the formula gives, so the result is bit-identical to computing it per element (and to preprocess_ref).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vitfast_ext.h"

namespace vitfast {

std::vector<int64_t> check_preprocess(const at::Tensor& images, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                      int64_t patch_size, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(images.scalar_type() == at::kByte, "vitfast::preprocess: expected uint8 images [B, H, W, 3], got ",
                   images.scalar_type(), ".");
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(3) == 3,
                    "vitfast::preprocess: expected channels-last images [B, H, W, 3] (as image decoders produce "
                    "them), got shape ",
                    images.sizes(), ".");
  TORCH_CHECK_VALUE(mean.size() == 3 && std.size() == 3, "vitfast::preprocess: mean and std need 3 values each, got ",
                    mean.size(), " and ", std.size(), ".");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "vitfast::preprocess: dtype must be float32, bfloat16 or float16, got ", dtype, ".");
  TORCH_CHECK_VALUE(patch_size >= 0, "vitfast::preprocess: patch_size must be >= 0 (0: no patches), got ", patch_size,
                    ".");
  const int64_t batch = images.size(0), height = images.size(1), width = images.size(2);
  if (patch_size == 0) {
    return {batch, 3, height, width};
  }
  TORCH_CHECK_VALUE(height % patch_size == 0 && width % patch_size == 0, "vitfast::preprocess: the image size ",
                    height, "x", width, " is not a multiple of the patch size ", patch_size, ".");
  return {batch, (height / patch_size) * (width / patch_size), 3 * patch_size * patch_size};
}

namespace {

template <typename scalar_t>
void preprocess_cpu_loop(const uint8_t* in, scalar_t* out, const float (&table)[3][256], int64_t batch,
                         int64_t height, int64_t width, int64_t patch) {
  // one task per image row: it reads the row once and writes each of its values once
  at::parallel_for(0, batch * height, 16, [&](int64_t begin, int64_t end) {
    for (int64_t image_row = begin; image_row < end; ++image_row) {
      const int64_t b = image_row / height, y = image_row % height;
      const uint8_t* pixels = in + image_row * width * 3;
      for (int64_t x = 0; x < width; ++x) {
        for (int64_t c = 0; c < 3; ++c) {
          int64_t index;
          if (patch == 0) {
            index = ((b * 3 + c) * height + y) * width + x;
          } else {
            const int64_t grid_w = width / patch, grid_h = height / patch;
            const int64_t token = (b * grid_h + y / patch) * grid_w + x / patch;
            index = ((token * 3 + c) * patch + y % patch) * patch + x % patch;
          }
          out[index] = static_cast<scalar_t>(table[c][pixels[x * 3 + c]]);
        }
      }
    }
  });
}

at::Tensor preprocess_cpu(const at::Tensor& images, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                          int64_t patch_size, at::ScalarType dtype) {
  const auto shape = check_preprocess(images, mean, std, patch_size, dtype);
  const at::Tensor in = images.contiguous();
  at::Tensor out = at::empty(shape, images.options().dtype(dtype));
  float table[3][256];
  for (int c = 0; c < 3; ++c) {
    for (int value = 0; value < 256; ++value) {
      table[c][value] = normalize_byte(value, static_cast<float>(mean[c]), static_cast<float>(std[c]));
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vitfast::preprocess", [&] {
    preprocess_cpu_loop<scalar_t>(in.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), table, in.size(0), in.size(1),
                                  in.size(2), patch_size);
  });
  return out;
}

}  // namespace

// The fake (meta) implementation is registered from Python (vitfast/ops/preprocess.py).
TORCH_LIBRARY_FRAGMENT(vitfast, m) {
  m.def("preprocess(Tensor images, float[] mean, float[] std, int patch_size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("preprocess", &preprocess_cpu); }

}  // namespace vitfast
