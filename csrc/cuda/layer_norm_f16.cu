// The LayerNorm kernels for c10::Half activations (one file per dtype: compiled in parallel).
#include "layer_norm.cuh"

namespace vitfast {
namespace ln {

VITFAST_LAYER_NORM_INSTANTIATE(c10::Half)

}  // namespace ln
}  // namespace vitfast
