// vitfast::layer_norm_ext_fwd / _bwd on CUDA: argument checks (shared with the CPU twin), launch shapes, launches.
// The kernels and their layout are described in layer_norm.cuh.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "../vitfast_ext.h"
#include "layer_norm.cuh"

namespace vitfast {
namespace {

// Widest row a warp normalizes (48 values per lane); wider rows take a block per row.
constexpr int kWarpRowMaxWidth = 32 * 48;
constexpr int kBlockThreads = 512;
// Most rows a row group adds into its parameter-gradient slots in sequence: fp32 rounding error grows with the run
// (the Triton kernel keeps the same bound); the grid grows instead, and torch.sum adds the partial rows as a tree.
constexpr int64_t kMaxChain = 16;

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Blocks of `kernel` resident per SM with `smem` bytes of dynamic shared memory. The first call per kernel and
// device opts it in to the most it can ask for (`max_smem`: all three parameter gradients; above 48 KiB, static
// included, a launch fails without that); results are cached, so that a call inside CUDA graph capture makes no
// runtime configuration call, and repeated calls cost no host time.
int resident_blocks(ln::BwdKernel kernel, int threads, size_t smem, size_t max_smem, int device) {
  static std::mutex mutex;
  static std::set<std::pair<int, void*>> opted_in;
  static std::map<std::tuple<int, void*, size_t>, int> occupancy;
  const std::lock_guard<std::mutex> lock(mutex);
  void* const address = reinterpret_cast<void*>(kernel);
  if (opted_in.insert({device, address}).second) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem)));
  }
  const auto key = std::make_tuple(device, address, smem);
  auto found = occupancy.find(key);
  if (found == occupancy.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    found = occupancy.emplace(key, per_sm).first;
  }
  return found->second;
}

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

LayerNormBwdResult layer_norm_ext_bwd_cuda(const std::optional<at::Tensor>& d_out,
                                           const std::optional<at::Tensor>& d_residual, const at::Tensor& x,
                                           const std::optional<at::Tensor>& branch,
                                           const std::optional<at::Tensor>& gamma,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& rstd) {
  const int64_t cols = check_layer_norm_bwd(d_out, d_residual, x, branch, gamma, weight, bias, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dbranch = at::empty(branch.has_value() ? x.sizes() : at::IntArrayRef{0}, x.options());
  auto empty_grad = [&](const std::optional<at::Tensor>& p) {
    return at::empty({p.has_value() ? cols : 0}, x.options().dtype(p.has_value() ? p->scalar_type()
                                                                                  : x.scalar_type()));
  };
  const at::Tensor x_rows = as_rows(x, cols);
  const int64_t rows = x_rows.size(0);
  if (rows == 0) {
    auto zero_grad = [&](const std::optional<at::Tensor>& p) { return empty_grad(p).zero_(); };
    return {dx, dbranch, zero_grad(gamma), zero_grad(weight), zero_grad(bias)};
  }
  const at::Tensor d_out_rows = d_out.has_value() ? as_rows(*d_out, cols) : at::Tensor();
  const at::Tensor d_residual_rows = d_residual.has_value() ? as_rows(*d_residual, cols) : at::Tensor();
  const at::Tensor branch_rows = branch.has_value() ? as_rows(*branch, cols) : at::Tensor();
  const at::Tensor gamma_c = param_or_undefined(gamma), weight_c = param_or_undefined(weight);
  const at::Tensor rstd_c = rstd.contiguous();
  const Shape shape = plan(cols, x.element_size(),
                           {{&x_rows, true}, {&d_out_rows, true}, {&d_residual_rows, true}, {&branch_rows, true},
                            {&gamma_c, false}, {&weight_c, false}, {&dx, false}, {&dbranch, false}});

  ln::BwdArgs a{};
  a.d_out = ptr_or_null(d_out_rows);
  a.d_residual = ptr_or_null(d_residual_rows);
  a.x = x_rows.data_ptr();
  a.branch = ptr_or_null(branch_rows);
  a.gamma = ptr_or_null(gamma_c);
  a.weight = ptr_or_null(weight_c);
  a.rstd = rstd_c.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dbranch = branch.has_value() ? dbranch.data_ptr() : nullptr;
  a.rows = rows;
  a.cols = static_cast<int>(cols);
  a.d_out_stride = d_out_rows.defined() ? d_out_rows.stride(0) : 0;
  a.d_residual_stride = d_residual_rows.defined() ? d_residual_rows.stride(0) : 0;
  a.x_stride = x_rows.stride(0);
  a.branch_stride = branch_rows.defined() ? branch_rows.stride(0) : 0;
  a.gamma_f32 = is_f32(gamma_c);
  a.weight_f32 = is_f32(weight_c);
  a.params = 0;
  a.gamma_slot = gamma.has_value() ? a.params++ : -1;
  a.weight_slot = weight.has_value() ? a.params++ : -1;
  a.bias_slot = bias.has_value() ? a.params++ : -1;

  at::Tensor partial;
  dispatch_kernel_dtype(x.scalar_type(), "layer_norm_ext", [&](auto tag) {
    using T = decltype(tag);
    const ln::KernelChoice choice = ln::select_bwd<T>(shape.vector, shape.elems, shape.block_per_row);
    const auto kernel = reinterpret_cast<ln::BwdKernel>(choice.kernel);
    const int threads = choice.threads_per_row * choice.rows_per_block;
    const size_t smem = sizeof(float) * choice.rows_per_block * a.params * choice.slots;
    const int per_sm = resident_blocks(kernel, threads, smem, sizeof(float) * choice.rows_per_block * 3 * choice.slots,
                                       x.get_device());
    const int64_t sms = multiprocessor_count(x.get_device());
    const int64_t row_groups = (rows + choice.rows_per_block - 1) / choice.rows_per_block;
    // one full wave of resident blocks (each writes one row of partial sums), more when a row group would otherwise
    // add more than kMaxChain rows in sequence
    int64_t blocks = std::min(row_groups, sms * std::max(per_sm, 1));
    blocks = std::max(blocks, (row_groups + kMaxChain - 1) / kMaxChain);
    partial = at::empty({a.params, blocks, cols}, x.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
    kernel<<<static_cast<unsigned>(blocks), dim3(choice.threads_per_row, choice.rows_per_block), smem,
             c10::cuda::getCurrentCUDAStream()>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // a separate sum per parameter: the gradients must not be views of one tensor (op outputs may not alias)
  auto param_grad = [&](const std::optional<at::Tensor>& p, int slot) {
    return p.has_value() ? partial.select(0, slot).sum(0).to(p->scalar_type()) : empty_grad(p);
  };
  return {dx, dbranch, param_grad(gamma, a.gamma_slot), param_grad(weight, a.weight_slot),
          param_grad(bias, a.bias_slot)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("layer_norm_ext_fwd", &layer_norm_ext_fwd_cuda);
  m.impl("layer_norm_ext_bwd", &layer_norm_ext_bwd_cuda);
}

}  // namespace vitfast
