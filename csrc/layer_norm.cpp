// vitfast::layer_norm_ext_fwd: argument checks shared with the CUDA kernels, and the CPU twin.
//
// Same semantics as the Triton op vitfast::layer_norm_fwd (vitfast/ops/layer_norm.py):
//   fwd(x, branch?, gamma?, weight?, bias?, eps) -> (out, residual_out, mean, rstd)
//     residual variant (branch given): residual_out = x + gamma * branch computed in fp32 (one fused multiply-add)
//     and rounded once to x's dtype; out = LayerNorm(residual_out) (the rounded tensor the next block receives).
//     Plain variant: out = LayerNorm(x), residual_out an empty [0]. mean / rstd: fp32 statistics of the normalized
//     tensor, shape x.shape[:-1].
// Its gradient is the Triton op vitfast::layer_norm_bwd's, on the statistics this op returns (the autograd formula,
// vitfast/ops/layer_norm_ext.py, says why there is no C++ backward).
// The twin runs simple loops: fp32 element math with fp64 row statistics.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "vitfast_ext.h"

namespace vitfast {

namespace {

bool kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_activation(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "layer_norm_ext: ", name, " must have x's shape ", x.sizes(), ", got ",
                    t->sizes(), ".");
  TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), "layer_norm_ext: ", name, " must have x's dtype ",
                    x.scalar_type(), ", got ", t->scalar_type(), ".");
  TORCH_CHECK_VALUE(t->device() == x.device(), "layer_norm_ext: ", name, " is on ", t->device(), ", x on ",
                    x.device(), ".");
}

void check_param(const char* name, const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t cols) {
  if (!p.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == cols, "layer_norm_ext: ", name, " must have shape (", cols,
                    ",), got ", p->sizes(), ".");
  TORCH_CHECK_VALUE(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, "layer_norm_ext: ", name,
                    " must be float32 or x's dtype ", x.scalar_type(), ", got ", p->scalar_type(), ".");
  TORCH_CHECK_VALUE(p->device() == x.device(), "layer_norm_ext: ", name, " is on ", p->device(), ", x on ",
                    x.device(), ".");
}

int64_t check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "layer_norm_ext: x must have at least one dimension (the normalized one).");
  TORCH_CHECK_VALUE(kernel_dtype(x.scalar_type()), "layer_norm_ext: x must be float16, bfloat16 or float32, got ",
                    x.scalar_type(), ".");
  const int64_t cols = x.size(-1);
  TORCH_CHECK_VALUE(cols >= 1 && cols <= kLayerNormMaxWidth, "layer_norm_ext: the kernels take widths 1..",
                    kLayerNormMaxWidth, ", got ", cols, ".");
  return cols;
}

}  // namespace

int64_t check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& branch,
                             const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias) {
  const int64_t cols = check_x(x);
  TORCH_CHECK_VALUE(!gamma.has_value() || branch.has_value(),
                    "layer_norm_ext: gamma (the layer scale of the branch) needs a branch.");
  check_activation("branch", branch, x);
  check_param("gamma", gamma, x, cols);
  check_param("weight", weight, x, cols);
  check_param("bias", bias, x, cols);
  return cols;
}

at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor rows = t.reshape({-1, cols});
  return rows.stride(1) == 1 || cols == 1 ? rows : rows.contiguous();
}

namespace {

// A parameter as fp32 values (an empty vector when absent).
std::vector<float> param_values(const std::optional<at::Tensor>& p) {
  if (!p.has_value()) {
    return {};
  }
  const at::Tensor values = p->to(at::kFloat).contiguous();
  return std::vector<float>(values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
}

// A fresh contiguous fp32 copy of a tensor's rows (the loops write into it).
at::Tensor float_rows(const at::Tensor& t, int64_t cols) {
  const at::Tensor rows = t.reshape({-1, cols});
  return at::empty(rows.sizes(), rows.options().dtype(at::kFloat)).copy_(rows);
}

// Centers a row of fp32 values (in place), with its fp64 mean.
double center_row(float* values, int64_t cols) {
  double sum = 0.0;
  for (int64_t c = 0; c < cols; ++c) {
    sum += values[c];
  }
  const double mean = sum / static_cast<double>(cols);
  for (int64_t c = 0; c < cols; ++c) {
    values[c] = static_cast<float>(static_cast<double>(values[c]) - mean);
  }
  return mean;
}

LayerNormFwdResult layer_norm_ext_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& branch,
                                          const std::optional<at::Tensor>& gamma,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, double eps) {
  const int64_t cols = check_layer_norm_fwd(x, branch, gamma, weight, bias);
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor residual_out = branch.has_value() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  // the normalized tensor: x, or residual_out (fp32 sum rounded once to x's dtype) in the residual variant
  at::Tensor normalized = x;
  if (branch.has_value()) {
    at::Tensor sum = float_rows(x, cols);
    const at::Tensor branch_values = float_rows(*branch, cols);
    const std::vector<float> gamma_values = param_values(gamma);
    float* s = sum.data_ptr<float>();
    const float* b = branch_values.data_ptr<float>();
    const int64_t rows = sum.size(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        // one rounding in fp32, as the CUDA kernel's fmaf: the rounded residual_out is then the same on both
        s[r * cols + c] = std::fma(gamma_values.empty() ? 1.0f : gamma_values[c], b[r * cols + c], s[r * cols + c]);
      }
    }
    residual_out.copy_(sum.view(x.sizes()));
    normalized = residual_out;
  }
  at::Tensor values = float_rows(normalized, cols);
  at::Tensor out_values = at::empty(values.sizes(), values.options());
  const std::vector<float> w = param_values(weight), b = param_values(bias);
  float* v = values.data_ptr<float>();
  float* o = out_values.data_ptr<float>();
  float* mean_ptr = mean.data_ptr<float>();
  float* rstd_ptr = rstd.data_ptr<float>();
  const int64_t rows = values.size(0);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * cols;
    const double row_mean = center_row(row, cols);
    double squares = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      squares += static_cast<double>(row[c]) * row[c];
    }
    const double row_rstd = 1.0 / std::sqrt(squares / static_cast<double>(cols) + eps);
    for (int64_t c = 0; c < cols; ++c) {
      double y = row[c] * row_rstd;
      if (!w.empty()) {
        y *= w[c];
      }
      if (!b.empty()) {
        y += b[c];
      }
      o[r * cols + c] = static_cast<float>(y);
    }
    mean_ptr[r] = static_cast<float>(row_mean);
    rstd_ptr[r] = static_cast<float>(row_rstd);
  }
  return {out_values.view(x.sizes()).to(x.scalar_type()), residual_out, mean, rstd};
}

}  // namespace

// The fake (meta) implementation and the autograd formula are registered from Python (vitfast/ops/layer_norm_ext.py).
TORCH_LIBRARY_FRAGMENT(vitfast, m) {
  m.def(
      "layer_norm_ext_fwd(Tensor x, Tensor? branch, Tensor? gamma, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("layer_norm_ext_fwd", &layer_norm_ext_fwd_cpu);
}

}  // namespace vitfast
