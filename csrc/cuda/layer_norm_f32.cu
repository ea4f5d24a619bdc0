// The LayerNorm kernels for float activations (one file per dtype: compiled in parallel).
#include "layer_norm.cuh"

namespace vitfast {
namespace ln {

VITFAST_LAYER_NORM_INSTANTIATE(float)

}  // namespace ln
}  // namespace vitfast
