// vitfast::layer_norm_ext_fwd on CUDA: argument checks (shared with the CPU twin), launch shapes, launches.
// The kernels and their layout are described in layer_norm.cuh.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "../vitfast_ext.h"
#include "layer_norm.cuh"

namespace vitfast {
namespace {

// Widest row a warp normalizes (48 values per lane); wider rows take a block per row.
constexpr int kWarpRowMaxWidth = 32 * 48;
constexpr int kBlockThreads = 512;

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

struct Shape {
  int vector;
  int elems;
  bool block_per_row;
};

// 16-byte vectors when the row width, every row stride and every pointer allow them; then the register bucket.
Shape plan(int64_t cols, int64_t element_size, std::initializer_list<std::pair<const at::Tensor*, bool>> tensors) {
  const int full = static_cast<int>(16 / element_size);
  bool vectors = cols % full == 0;
  for (const auto& [tensor, is_rows] : tensors) {
    if (tensor == nullptr || !tensor->defined()) {
      continue;
    }
    // a parameter's vector of `full` values is 16 bytes in the activation dtype, 4 * full bytes in fp32
    vectors = vectors && aligned(tensor->data_ptr(), full * tensor->element_size()) &&
              (!is_rows || tensor->stride(0) % full == 0);
  }
  const int vector = vectors ? full : 1;
  const bool block_per_row = cols > kWarpRowMaxWidth;
  const int64_t threads = block_per_row ? kBlockThreads : 32;
  const int64_t per_thread = (cols + threads * vector - 1) / (threads * vector) * vector;
  static constexpr int kWarpBuckets[] = {8, 16, 24, 32, 48};  // the register buckets of layer_norm.cuh
  static constexpr int kBlockBuckets[] = {8, 16};
  for (const int bucket : kWarpBuckets) {
    if (!block_per_row && per_thread <= bucket) {
      return {vector, bucket, false};
    }
  }
  for (const int bucket : kBlockBuckets) {
    if (block_per_row && per_thread <= bucket) {
      return {vector, bucket, true};
    }
  }
  TORCH_INTERNAL_ASSERT(false, "layer_norm_ext: no kernel for rows of width ", cols);
}

at::Tensor param_or_undefined(const std::optional<at::Tensor>& p) {
  return p.has_value() ? p->contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

bool is_f32(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kFloat; }

LayerNormFwdResult layer_norm_ext_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& branch,
                                           const std::optional<at::Tensor>& gamma,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, double eps) {
  const int64_t cols = check_layer_norm_fwd(x, branch, gamma, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(branch.has_value() ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  const at::Tensor x_rows = as_rows(x, cols);
  const int64_t rows = x_rows.size(0);
  if (rows == 0) {
    return {out, residual_out, mean, rstd};
  }
  const at::Tensor branch_rows = branch.has_value() ? as_rows(*branch, cols) : at::Tensor();
  const at::Tensor gamma_c = param_or_undefined(gamma), weight_c = param_or_undefined(weight),
                   bias_c = param_or_undefined(bias);
  const Shape shape = plan(cols, x.element_size(),
                           {{&x_rows, true}, {&branch_rows, true}, {&gamma_c, false}, {&weight_c, false},
                            {&bias_c, false}, {&out, false}, {&residual_out, false}});

  ln::FwdArgs a{};
  a.x = x_rows.data_ptr();
  a.branch = ptr_or_null(branch_rows);
  a.gamma = ptr_or_null(gamma_c);
  a.weight = ptr_or_null(weight_c);
  a.bias = ptr_or_null(bias_c);
  a.out = out.data_ptr();
  a.residual_out = branch.has_value() ? residual_out.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.cols = static_cast<int>(cols);
  a.x_stride = x_rows.stride(0);
  a.branch_stride = branch_rows.defined() ? branch_rows.stride(0) : 0;
  a.eps = static_cast<float>(eps);
  a.gamma_f32 = is_f32(gamma_c);
  a.weight_f32 = is_f32(weight_c);
  a.bias_f32 = is_f32(bias_c);

  dispatch_kernel_dtype(x.scalar_type(), "layer_norm_ext", [&](auto tag) {
    using T = decltype(tag);
    const ln::KernelChoice choice = ln::select_fwd<T>(shape.vector, shape.elems, shape.block_per_row);
    const dim3 block(choice.threads_per_row, choice.rows_per_block);
    const int64_t blocks = (rows + choice.rows_per_block - 1) / choice.rows_per_block;
    reinterpret_cast<ln::FwdKernel>(choice.kernel)<<<static_cast<unsigned>(blocks), block, 0,
                                                     c10::cuda::getCurrentCUDAStream()>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, residual_out, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("layer_norm_ext_fwd", &layer_norm_ext_fwd_cuda);
}

}  // namespace vitfast
