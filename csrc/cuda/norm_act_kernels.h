// Host-side launchers for the fused normalisation + activation (+ residual)
// kernels. Their semantics are the contract of csrc/cpu/norm_act_cpu.h; this
// header only fixes how the CUDA versions receive their arguments.
//
// Free of torch headers, like masked_fusion_kernels.h (whose DType and
// StridedTensor3 it reuses), so that the .cu file builds with a bare nvcc.
// The torch glue (register_norm_act_cuda.cpp) validates tensors and
// translates them into these descriptors.
//
// Conventions:
//   * x, residual, dy, y, dx, dres are (B, C, S) with element strides (any
//     value, 0 included, for inputs). NCS (stride_s == 1) and channels-last
//     (stride_c == 1) take 16-byte vectorised paths when every tensor of a
//     pass allows it; anything else takes a scalar strided path with the same
//     decomposition.
//   * weight, bias, dweight, dbias (C,) and mean, rstd (B, G) are contiguous
//     float for float32/float16/bfloat16 data and double for float64 data.
//   * Reductions write per-chunk partials into a caller-provided workspace
//     (size from the matching *_workspace_bytes function, called with the
//     same shape and descriptors; contents need not be initialised) and a
//     second kernel combines them in a fixed order. The chunking is a function
//     of the shape, the dtype and the layout family (channels-last or not)
//     only, so results are bitwise reproducible run to run and never depend
//     on pointer alignment. The element-wise outputs (y, dx, dres) use the
//     same expression on every path, so they depend on the layout only
//     through those reductions.
//   * Each element of an output is written by the thread that read the same
//     element of every input, after reading it, so y may share memory with x
//     or residual, and dx or dres with x, dy or residual, element for element.
//   * Launchers enqueue on `stream` and return the launch status, or
//     cudaErrorInvalidValue for arguments they cannot handle.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "masked_fusion_kernels.h"

namespace medmap_fast {
namespace gpu {

// B, C, S >= 1; G >= 1 divides C.
struct NormActShape {
  int64_t B;
  int64_t C;
  int64_t S;
  int64_t G;
};

// residual (mode 1 or 2 only) is added before (1) or after (2) the
// activation; mean and rstd receive the group statistics.
size_t norm_act_fwd_workspace_bytes(DType dtype, const NormActShape& shape,
                                    const StridedTensor3& x);
cudaError_t launch_norm_act_fwd(DType dtype, const NormActShape& shape, const StridedTensor3& x,
                                const void* weight, const void* bias,
                                const StridedTensor3* residual, const StridedTensor3& y,
                                void* mean, void* rstd, double slope, int residual_mode,
                                double eps, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// residual is given iff residual_mode == 1 (the only mode whose backward
// reads it); dres (nullable) is written only in that mode.
size_t norm_act_bwd_workspace_bytes(DType dtype, const NormActShape& shape,
                                    const StridedTensor3& x, const StridedTensor3& dy,
                                    const StridedTensor3* residual);
cudaError_t launch_norm_act_bwd(DType dtype, const NormActShape& shape, const StridedTensor3& x,
                                const void* weight, const void* bias,
                                const StridedTensor3* residual, const StridedTensor3& dy,
                                const void* mean, const void* rstd, const StridedTensor3& dx,
                                const StridedTensor3* dres, void* dweight, void* dbias,
                                double slope, int residual_mode, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

}  // namespace gpu
}  // namespace medmap_fast
