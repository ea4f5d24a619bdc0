// The LayerNorm kernels for c10::BFloat16 activations (one file per dtype: compiled in parallel).
#include "layer_norm.cuh"

namespace vitfast {
namespace ln {

VITFAST_LAYER_NORM_INSTANTIATE(c10::BFloat16)

}  // namespace ln
}  // namespace vitfast
