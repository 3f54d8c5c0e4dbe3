// Host-side launchers for the MedMAP alignment kernels (anchor alignment,
// moment matching, Gaussian KL to an anchor). Their semantics are the contract
// of csrc/cpu/alignment_cpu.h; this header only fixes how the CUDA versions
// receive their arguments.
//
// Free of torch headers, like masked_fusion_kernels.h (whose DType,
// StridedTensor3, TensorPack and kMaxModalities it reuses), so that the .cu
// file builds with a bare nvcc. The torch glue (register_alignment_cuda.cpp)
// validates tensors and translates them into these descriptors.
//
// Conventions:
//   * Feature-like tensors are (B, C, S) with element strides; every feature
//     and feature-sized output of one call is addressed through the same
//     work decomposition, chosen from all their strides together (NCS,
//     channels-last, or a scalar strided fallback).
//   * "acc" arrays (coef, G, sq, mean, m2, alpha, beta, grad_coef, nu,
//     logtau2, logpi, loss, resp, stats) are contiguous float for
//     float32/float16/bfloat16 features and double for float64 features.
//   * present is a contiguous array of bytes, 0 meaning absent.
//   * Reductions write per-block partials into a caller-provided workspace
//     (size from the matching *_workspace_bytes function, called with the
//     same arguments) and a second kernel combines them in a fixed order, so
//     results are bitwise reproducible run to run.
//   * Launchers enqueue on `stream` and return the launch status, or
//     cudaErrorInvalidValue for arguments they cannot handle.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "masked_fusion_kernels.h"

namespace medmap_fast {
namespace gpu {

// Mixture components and channels the Gaussian-KL kernels support: the
// per-row component sums are kept in registers and a row's channels are
// handled by one group of at most 32 lanes.
constexpr int kMaxKlComponents = 16;
constexpr int64_t kMaxKlChannels = 1024;

struct AlignShape {
  int64_t B;
  int64_t M;  // 1 <= M <= kMaxModalities
  int64_t C;
  int64_t S;
};

// ---- anchor alignment ------------------------------------------------------

// anchor (nullable) receives a; sq is (B, M, C).
size_t anchor_fwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                  const StridedTensor3* anchor);
cudaError_t launch_anchor_fwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                              const void* coef, const uint8_t* present, void* sq,
                              const StridedTensor3* anchor, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// G is (B, M, C); grad_coef (B, M, C) is nullable.
size_t anchor_bwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                  const TensorPack& grad_feats, bool with_grad_coef);
cudaError_t launch_anchor_bwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                              const void* coef, const uint8_t* present, const void* G,
                              bool detach, const TensorPack& grad_feats, void* grad_coef,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- moment matching -------------------------------------------------------

// coef nullable (A = coef ? 1 : 0); mean and m2 are (B, M + A, C).
size_t moments_fwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                   bool with_anchor);
cudaError_t launch_moments_fwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                               const void* coef, const uint8_t* present, void* mean, void* m2,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

// mean, alpha, beta are (B, M + A, C); grad_coef nullable and requires coef.
size_t moments_bwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                   const TensorPack& grad_feats, bool with_grad_coef);
cudaError_t launch_moments_bwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                               const void* coef, const uint8_t* present, const void* mean,
                               const void* alpha, const void* beta, const TensorPack& grad_feats,
                               void* grad_coef, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// ---- Gaussian KL to a mixture anchor ---------------------------------------

// Rows are (g, r) pairs; strides in elements, any value (0 included) for
// inputs. StridedTensor3's (b, c, s) strides are read as (g, r, c) here.
struct KlShape {
  int64_t G;
  int64_t R;
  int64_t C;  // 0 <= C <= kMaxKlChannels
  int64_t J;  // 1 <= J <= kMaxKlComponents
};

// A (G, R) array of acc values with element strides (w).
struct RowWeights {
  const void* data;
  int64_t stride_g;
  int64_t stride_r;
};

// present (G,) and resp (G, R, J) are nullable.
size_t gkl_fwd_workspace_bytes(DType dtype, const KlShape& shape);
cudaError_t launch_gkl_fwd(DType dtype, const KlShape& shape, const StridedTensor3& mu,
                           const StridedTensor3& logvar, const uint8_t* present, const void* nu,
                           const void* logtau2, const void* logpi, void* loss, void* resp,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

// present, resp (absent means J == 1), grad_mu, grad_logvar and stats
// (3, J, C) are nullable.
size_t gkl_bwd_workspace_bytes(DType dtype, const KlShape& shape, bool with_stats);
cudaError_t launch_gkl_bwd(DType dtype, const KlShape& shape, const StridedTensor3& mu,
                           const StridedTensor3& logvar, const uint8_t* present, const void* nu,
                           const void* logtau2, const void* resp, const RowWeights& w,
                           const StridedTensor3* grad_mu, const StridedTensor3* grad_logvar,
                           void* stats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

}  // namespace gpu
}  // namespace medmap_fast
