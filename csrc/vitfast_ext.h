// Declarations shared by the C++ (CPU) and CUDA sources of vitfast's compiled extension.
//
// Every op is defined once, in its .cpp file, with TORCH_LIBRARY_FRAGMENT (not TORCH_LIBRARY: the `vitfast`
// namespace also holds the ops the Python files define with torch.library.triton_op, and a namespace may have only
// one TORCH_LIBRARY block). Each is implemented for CPU (the "twin": plain loops, the reference the CUDA kernels are
// held to) and, in CUDA builds (VITFAST_WITH_CUDA), for CUDA by the .cu files, which register their own
// TORCH_LIBRARY_IMPL. Argument checks are shared, so both devices reject the same inputs with the same messages
// (ValueError / TypeError in Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#endif

namespace vitfast {

// Widest row the LayerNorm kernels take (the CUDA block-per-row path holds a row in registers, 16 values per thread
// of a 512-thread block); wider rows are not covered and run elsewhere (Python dispatch).
constexpr int64_t kLayerNormMaxWidth = 8192;

// Calls f(T{}) with T the C++ type of a kernel dtype (float32, float16, bfloat16): unlike AT_DISPATCH_*, no fp64
// instantiation is compiled for dtypes the checks already rejected.
template <typename F>
void dispatch_kernel_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

#ifdef __CUDACC__
// Streaming multiprocessors of a GPU (launch grids are sized from it). Asked of the runtime directly: ATen's
// CUDAContext headers pull in cuBLAS / cuSPARSE headers, which a minimal CUDA toolkit (nvcc only) lacks.
inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}
#endif

using LayerNormFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- preprocess --------------------------------------------------------------------------------------------------

// Output shape of preprocess after checking its arguments: [B, 3, H, W] (patch_size 0) or [B, N, 3 * p * p].
std::vector<int64_t> check_preprocess(const at::Tensor& images, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                      int64_t patch_size, at::ScalarType dtype);

// The per-channel normalization of one byte, in fp32, in this order: (u / 255 - mean) / std. Kernels and twins use
// this exact sequence of IEEE operations (no reciprocal multiply, no fused multiply-add), which makes the fp32 result
// bit-identical to vitfast.ops.preprocess.preprocess_ref.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline float normalize_byte(int value, float mean, float std) {
  return (static_cast<float>(value) / 255.0f - mean) / std;
}

// ---- layer_norm_ext ----------------------------------------------------------------------------------------------

// Checks of the forward's arguments (same rules as the Triton op vitfast::layer_norm_fwd, plus: branch
// in x's dtype, parameters in x's dtype or fp32); return the row width.
int64_t check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& branch,
                             const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias);

// `t` as [rows, cols] with unit column stride (a copy only when no such view exists).
at::Tensor as_rows(const at::Tensor& t, int64_t cols);

}  // namespace vitfast
