// LayerNorm kernels (plain and with the pre-norm residual add), forward only, for layer_norm.cu.
//
// Layout: a row group of TPR threads normalizes one row at a time, holding it in registers as fp32 values, ITERS
// vectors of V elements per thread; element (i, j) of thread t is column (i * TPR + t) * V + j, so a row group's
// loads of one i are contiguous (V = 16 bytes / element size: 16-byte loads and stores). Row groups:
//   - warp per row (TPR 32, RPB 4 row groups per block): rows up to 32 * 48 columns, reductions by warp shuffles only;
//   - block per row (TPR 512, RPB 1): wider rows, up to kLayerNormMaxWidth, reductions through shared memory.
// Statistics are fp32 and computed as the Triton kernels do: mean, then a correction from the centered sum, then the
// variance of the centered values. The gradient is the Triton backward's (vitfast::layer_norm_bwd), which reads them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vitfast {
namespace ln {

struct FwdArgs {
  const void* x;
  const void* branch;  // nullptr: plain LayerNorm
  const void* gamma;
  const void* weight;
  const void* bias;
  void* out;
  void* residual_out;
  float* mean;
  float* rstd;
  int64_t rows;
  int cols;
  int64_t x_stride, branch_stride;  // row strides in elements (column stride 1); outputs are contiguous
  float eps;
  bool gamma_f32, weight_f32, bias_f32;  // parameter dtype: fp32, else the activations' dtype
};

using FwdKernel = void (*)(FwdArgs);

struct KernelChoice {
  void* kernel;  // a FwdKernel
  int threads_per_row;
  int rows_per_block;
};

// The kernel for rows of `elems` values per thread (a bucket: 8, 16, 24, 32, 48 with a warp per row; 8 or 16 with a
// block per row) loaded `vector` at a time (16 bytes / element, or 1).
template <typename T>
KernelChoice select_fwd(int vector, int elems, bool block_per_row);
// defined by layer_norm_<dtype>.cu
template <>
KernelChoice select_fwd<float>(int vector, int elems, bool block_per_row);
template <>
KernelChoice select_fwd<c10::Half>(int vector, int elems, bool block_per_row);
template <>
KernelChoice select_fwd<c10::BFloat16>(int vector, int elems, bool block_per_row);

#ifdef __CUDACC__

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T values[V];
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* ptr, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(ptr);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    out[j] = static_cast<float>(pack.values[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* ptr, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    pack.values[j] = static_cast<T>(in[j]);
  }
  *reinterpret_cast<Pack<T, V>*>(ptr) = pack;
}

// A [C] parameter in fp32 or in the activations' dtype T.
template <typename T, int V>
__device__ __forceinline__ void load_param(const void* ptr, bool is_f32, int col, float (&out)[V]) {
  if (is_f32) {
    load<float, V>(static_cast<const float*>(ptr) + col, out);
  } else {
    load<T, V>(static_cast<const T*>(ptr) + col, out);
  }
}

// Sum over the row group; every thread of it gets the same value (the xor butterfly adds the same pairs on every
// lane, and the cross-warp sum runs in the same order on every thread).
template <int TPR>
__device__ __forceinline__ float row_sum(float value, float* buffer) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if constexpr (TPR > 32) {
    __syncthreads();  // the previous reduction may still be reading the buffer
    if (threadIdx.x % 32 == 0) {
      buffer[threadIdx.x / 32] = value;
    }
    __syncthreads();
    value = 0.0f;
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) {
      value += buffer[w];
    }
  }
  return value;
}

template <int V, int TPR>
__device__ __forceinline__ bool in_row(int i, int cols) {
  return (i * TPR + static_cast<int>(threadIdx.x)) * V < cols;
}

// Centers the row (values beyond the row stay 0) and returns its fp32 mean.
template <int V, int ITERS, int TPR>
__device__ __forceinline__ float center(float (&v)[ITERS][V], int cols, float* buffer) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      sum += v[i][j];
    }
  }
  float mean = row_sum<TPR>(sum, buffer) / cols;
  float centered_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (in_row<V, TPR>(i, cols)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[i][j] -= mean;
        centered_sum += v[i][j];
      }
    }
  }
  // the mean rounded to fp32 is off by up to an ulp, which rstd multiplies in rows of small spread: take it out
  const float correction = row_sum<TPR>(centered_sum, buffer) / cols;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (in_row<V, TPR>(i, cols)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[i][j] -= correction;
      }
    }
  }
  return mean + correction;
}

template <typename T, int V, int ITERS, int TPR, int RPB>
__global__ void __launch_bounds__(TPR* RPB) layer_norm_fwd_kernel(const FwdArgs a) {
  __shared__ float buffer[TPR / 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.y;
  if (row >= a.rows) {
    return;  // uniform over a row group (and over the block when it has one row group)
  }
  const int tid = threadIdx.x;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  float v[ITERS][V];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * TPR + tid) * V;
    if (col < a.cols) {
      load<T, V>(x + col, v[i]);
      if (a.branch != nullptr) {
        float branch[V], gamma[V];
        load<T, V>(static_cast<const T*>(a.branch) + row * a.branch_stride + col, branch);
        if (a.gamma != nullptr) {
          load_param<T, V>(a.gamma, a.gamma_f32, col, gamma);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            gamma[j] = 1.0f;
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          // x + gamma * branch rounded once to T; the rounded value is what gets normalized and handed on
          v[i][j] = static_cast<float>(static_cast<T>(fmaf(gamma[j], branch[j], v[i][j])));
        }
        store<T, V>(static_cast<T*>(a.residual_out) + row * a.cols + col, v[i]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[i][j] = 0.0f;
      }
    }
  }
  const float mean = center<V, ITERS, TPR>(v, a.cols, buffer);
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      squares += v[i][j] * v[i][j];
    }
  }
  const float rstd = rsqrtf(row_sum<TPR>(squares, buffer) / a.cols + a.eps);
  T* out = static_cast<T*>(a.out) + row * a.cols;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * TPR + tid) * V;
    if (col < a.cols) {
      float y[V], weight[V], bias[V];
      if (a.weight != nullptr) {
        load_param<T, V>(a.weight, a.weight_f32, col, weight);
      }
      if (a.bias != nullptr) {
        load_param<T, V>(a.bias, a.bias_f32, col, bias);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        y[j] = v[i][j] * rstd;
        if (a.weight != nullptr) {
          y[j] *= weight[j];
        }
        if (a.bias != nullptr) {
          y[j] += bias[j];
        }
      }
      store<T, V>(out + col, y);
    }
  }
  if (tid == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T, int V, int ELEMS, int TPR, int RPB>
KernelChoice fwd_choice() {
  return {reinterpret_cast<void*>(&layer_norm_fwd_kernel<T, V, ELEMS / V, TPR, RPB>), TPR, RPB};
}

// Register buckets (values per thread). A warp per row: 8..48, i.e. rows up to 256 / 512 / 768 / 1024 / 1536 wide
// (the ViT widths 384, 768, 1024, 1280, 1408 each fill most of theirs). A block per row: 8 or 16, rows up to 4096 /
// 8192.
template <typename T, int V>
KernelChoice select_fwd_vector(int elems, bool block_per_row) {
  if (block_per_row) {
    return elems <= 8 ? fwd_choice<T, V, 8, 512, 1>() : fwd_choice<T, V, 16, 512, 1>();
  }
  switch (elems) {
    case 8:
      return fwd_choice<T, V, 8, 32, 4>();
    case 16:
      return fwd_choice<T, V, 16, 32, 4>();
    case 24:
      return fwd_choice<T, V, 24, 32, 4>();
    case 32:
      return fwd_choice<T, V, 32, 32, 4>();
    default:
      return fwd_choice<T, V, 48, 32, 4>();
  }
}

// One translation unit per dtype (layer_norm_<dtype>.cu) compiles these, so that a build compiles them in parallel.
#define VITFAST_LAYER_NORM_INSTANTIATE(T)                                          \
  template <>                                                                      \
  KernelChoice select_fwd<T>(int vector, int elems, bool block_per_row) {          \
    return vector > 1 ? select_fwd_vector<T, 16 / sizeof(T)>(elems, block_per_row) \
                      : select_fwd_vector<T, 1>(elems, block_per_row);             \
  }

#endif  // __CUDACC__

}  // namespace ln
}  // namespace vitfast
