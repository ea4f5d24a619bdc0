// vitfast::preprocess on CUDA: uint8 images [B, H, W, 3] -> normalized [B, 3, H, W] or patch rows [B, N, 3*p*p].
//
// Memory-bound: every input byte is read once and every output value written once. A block takes a tile of the
// image (planar output: a few whole pixel rows; patch rows: one band of p pixel rows, a few patches wide), copies its
// bytes to shared memory with 16-byte loads, then writes its part of the output, which is contiguous (planar: rows of
// each channel plane; patches: consecutive patch rows), with 16-byte stores where the alignment allows. Values come
// from a 3 x 256 table of normalize_byte results, built per block: the same fp32 operations as the formula, so the
// output is bit-identical to it.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "../vitfast_ext.h"

namespace vitfast {
namespace {

constexpr int kThreads = 256;
// Tiles in shared memory stay below this (larger patches take the element-per-thread kernel).
constexpr int64_t kMaxTileBytes = 32 * 1024;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T values[V];
};

struct Tiles {
  const uint8_t* in;
  void* out;
  int64_t height, width;
  int64_t patch;                   // 0: planar output
  int64_t tile_rows, tile_cols;    // pixels; patch rows: tile_rows = patch, tile_cols = patches per tile * patch
  int64_t tiles_x, tiles_y;        // per image
  float mean[3], std[3];
  bool vector_loads;               // 16-byte loads: every tile row segment is 16-byte aligned and sized
};

__device__ __forceinline__ void fill_table(float (&table)[3][256], const Tiles& t) {
  for (int i = threadIdx.x; i < 3 * 256; i += kThreads) {
    const int c = i / 256;
    // selects, not t.mean[c]: indexing a kernel argument's array at run time copies it to local memory
    const float mean = c == 0 ? t.mean[0] : c == 1 ? t.mean[1] : t.mean[2];
    const float std = c == 0 ? t.std[0] : c == 1 ? t.std[1] : t.std[2];
    table[c][i % 256] = normalize_byte(i % 256, mean, std);
  }
}

template <typename T, int V, bool PATCHES>
__global__ void __launch_bounds__(kThreads) preprocess_tile_kernel(const Tiles t) {
  extern __shared__ __align__(16) uint8_t tile[];
  __shared__ float table[3][256];
  fill_table(table, t);

  const int64_t tiles_per_image = t.tiles_x * t.tiles_y;
  const int64_t b = blockIdx.x / tiles_per_image;
  const int64_t ty = (blockIdx.x % tiles_per_image) / t.tiles_x, tx = blockIdx.x % t.tiles_x;
  const int64_t y0 = ty * t.tile_rows, x0 = tx * t.tile_cols;
  const int rows = static_cast<int>(min(t.tile_rows, t.height - y0));
  const int cols = static_cast<int>(min(t.tile_cols, t.width - x0));
  const int row_bytes = cols * 3, tile_row_bytes = static_cast<int>(t.tile_cols) * 3;
  const uint8_t* src = t.in + ((b * t.height + y0) * t.width + x0) * 3;
  const int64_t src_row_bytes = t.width * 3;

  if (t.vector_loads) {
    const int vectors = row_bytes / 16;
    for (int i = threadIdx.x; i < rows * vectors; i += kThreads) {
      const int r = i / vectors, v = i % vectors;
      *reinterpret_cast<uint4*>(tile + r * tile_row_bytes + v * 16) =
          __ldg(reinterpret_cast<const uint4*>(src + r * src_row_bytes + v * 16));
    }
  } else {
    for (int i = threadIdx.x; i < rows * row_bytes; i += kThreads) {
      const int r = i / row_bytes, k = i % row_bytes;
      tile[r * tile_row_bytes + k] = __ldg(src + r * src_row_bytes + k);
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(t.out);
  if constexpr (!PATCHES) {
    // plane c, rows y0.., columns x0..: V consecutive pixels of one row per store
    const int vectors = cols / V;
    for (int i = threadIdx.x; i < 3 * rows * vectors; i += kThreads) {
      const int c = i / (rows * vectors), r = (i / vectors) % rows, v = i % vectors;
      const uint8_t* pixels = tile + r * tile_row_bytes + v * V * 3 + c;
      Pack<T, V> pack;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        pack.values[j] = static_cast<T>(table[c][pixels[j * 3]]);
      }
      *reinterpret_cast<Pack<T, V>*>(out + ((b * 3 + c) * t.height + y0 + r) * t.width + x0 + v * V) = pack;
    }
  } else {
    // the tile's patch rows are consecutive in the output: element e is (patch, channel, ky, kx) in that order
    const int p = static_cast<int>(t.patch), per_patch = 3 * p * p;
    const int64_t grid_h = t.height / p, grid_w = t.width / p;
    T* chunk = out + ((b * grid_h + y0 / p) * grid_w + x0 / p) * per_patch;
    const int count = (cols / p) * per_patch;
    for (int e = threadIdx.x * V; e < count; e += kThreads * V) {
      int patch = e / per_patch, rem = e % per_patch;
      int c = rem / (p * p), ky = (rem / p) % p, kx = rem % p;
      Pack<T, V> pack;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        pack.values[j] = static_cast<T>(table[c][tile[ky * tile_row_bytes + (patch * p + kx) * 3 + c]]);
        if (++kx == p) {
          kx = 0;
          if (++ky == p) {
            ky = 0;
            if (++c == 3) {
              c = 0;
              ++patch;
            }
          }
        }
      }
      *reinterpret_cast<Pack<T, V>*>(chunk + e) = pack;
    }
  }
}

// Patches too large for a shared-memory tile: one output value per thread, read straight from global memory.
template <typename T>
__global__ void __launch_bounds__(kThreads) preprocess_element_kernel(const Tiles t, int64_t count) {
  __shared__ float table[3][256];
  fill_table(table, t);
  __syncthreads();
  const int64_t p = t.patch, per_patch = 3 * p * p, grid_w = t.width / p;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t token = e / per_patch, rem = e % per_patch;
    const int64_t c = rem / (p * p), ky = (rem / p) % p, kx = rem % p;
    const int64_t tokens_per_image = (t.height / p) * grid_w;
    const int64_t b = token / tokens_per_image, gy = (token % tokens_per_image) / grid_w, gx = token % grid_w;
    const int64_t pixel = (b * t.height + gy * p + ky) * t.width + gx * p + kx;
    static_cast<T*>(t.out)[e] = static_cast<T>(table[c][__ldg(t.in + pixel * 3 + c)]);
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, bool PATCHES>
void launch_tiles(const Tiles& t, int vector, int64_t block_count, int64_t smem, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(block_count);
  switch (vector) {
    case 8:
      if constexpr (sizeof(T) == 2) {
        preprocess_tile_kernel<T, 8, PATCHES><<<blocks, kThreads, smem, stream>>>(t);
        return;
      }
      break;
    case 4:
      preprocess_tile_kernel<T, 4, PATCHES><<<blocks, kThreads, smem, stream>>>(t);
      return;
    case 2:
      preprocess_tile_kernel<T, 2, PATCHES><<<blocks, kThreads, smem, stream>>>(t);
      return;
    default:
      preprocess_tile_kernel<T, 1, PATCHES><<<blocks, kThreads, smem, stream>>>(t);
      return;
  }
  TORCH_INTERNAL_ASSERT(false, "vitfast::preprocess: no kernel for ", vector, " values per store");
}

at::Tensor preprocess_cuda(const at::Tensor& images, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                           int64_t patch_size, at::ScalarType dtype) {
  const auto shape = check_preprocess(images, mean, std, patch_size, dtype);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  at::Tensor out = at::empty(shape, images.options().dtype(dtype));
  if (out.numel() == 0) {
    return out;
  }
  const int64_t batch = in.size(0), height = in.size(1), width = in.size(2), p = patch_size;
  Tiles t{};
  t.in = in.data_ptr<uint8_t>();
  t.out = out.data_ptr();
  t.height = height;
  t.width = width;
  t.patch = p;
  for (int c = 0; c < 3; ++c) {
    t.mean[c] = static_cast<float>(mean[c]);
    t.std[c] = static_cast<float>(std[c]);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessor_count(images.get_device());
  // Tiles of 2-8 KiB: small enough that a small batch still gives every SM several blocks to overlap, large enough
  // that the per-block table setup is amortized.
  const int64_t target = std::clamp<int64_t>(in.numel() / (4 * sms), 2048, 8192);
  const int64_t element = out.element_size();

  if (p > 0) {
    const int64_t per_patch = 3 * p * p, grid_w = width / p;
    // patches per tile: a multiple of `group` keeps each tile row segment (patches * p * 3 bytes) 16-byte sized
    const int64_t group = 16 / std::gcd<int64_t>(16, 3 * p);
    int64_t patches = std::max(group, target / per_patch / group * group);
    patches = std::min(patches, grid_w);
    if (p * patches * p * 3 > kMaxTileBytes) {
      const int64_t count = out.numel();
      const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, int64_t(sms) * 32);
      dispatch_kernel_dtype(dtype, "vitfast::preprocess", [&](auto tag) {
        using scalar_t = decltype(tag);
        preprocess_element_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(t, count);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return out;
    }
    t.tile_rows = p;
    t.tile_cols = patches * p;
  } else {
    // whole pixel rows when they fit the target, else row segments of a multiple of 16 pixels
    t.tile_cols = width * 3 <= target ? width : std::max<int64_t>(16, target / 3 / 16 * 16);
    t.tile_rows = std::max<int64_t>(1, target / (t.tile_cols * 3));
  }
  t.tiles_x = (width + t.tile_cols - 1) / t.tile_cols;
  t.tiles_y = (height + t.tile_rows - 1) / t.tile_rows;
  t.vector_loads = aligned(t.in, 16) && (width * 3) % 16 == 0 && (t.tile_cols * 3) % 16 == 0;

  // values per store: the widest power of two (<= 16 bytes) that every tile's output run is a multiple of
  int vector = static_cast<int>(16 / element);
  while (vector > 1) {
    const bool fits = p > 0 ? (t.tile_cols / p * 3 * p * p) % vector == 0 && ((width / p) * 3 * p * p) % vector == 0
                            : t.tile_cols % vector == 0 && width % vector == 0;
    if (fits && aligned(t.out, vector * element)) {
      break;
    }
    vector /= 2;
  }
  const int64_t blocks = batch * t.tiles_x * t.tiles_y;
  const int64_t smem = t.tile_rows * t.tile_cols * 3;
  dispatch_kernel_dtype(dtype, "vitfast::preprocess", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (p > 0) {
      launch_tiles<scalar_t, true>(t, vector, blocks, smem, stream);
    } else {
      launch_tiles<scalar_t, false>(t, vector, blocks, smem, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("preprocess", &preprocess_cuda); }

}  // namespace vitfast
