// Host-side launchers for the masked modality-fusion kernels.
//
// This header is deliberately free of torch headers so that the .cu file that
// implements it compiles with nvcc alone, in seconds. The torch glue
// (register_cuda.cpp) validates tensors and translates them into these plain
// descriptors.
//
// Conventions shared by every launcher:
//   * Logical shapes: features are (B, C, S), coef is (B, M, C), present is
//     (B, M); M is the number of modalities, 1 <= M <= kMaxModalities.
//   * Strides are in elements, not bytes, and may be arbitrary (including
//     different strides per tensor, and 0 for inputs). Layouts with
//     stride_s == 1 ("NCS") or stride_c == 1 ("channels-last") take 128-bit
//     vectorised paths when pointers and strides allow; everything else takes
//     a scalar strided path.
//   * Results are bitwise reproducible run to run. Element-wise outputs are
//     bitwise identical whatever the layout or alignment. grad_coef sums in an
//     order fixed by the shape and by the layout family (channels-last versus
//     everything else), never by pointer alignment.
//   * coef and grad_coef are contiguous (B, M, C) arrays of float for
//     float32/float16/bfloat16 features and of double for float64 features.
//   * present is a contiguous (B, M) array of bytes, 0 meaning absent.
//   * Every launcher enqueues work on `stream` and returns the launch status
//     (cudaSuccess, or cudaErrorInvalidValue for arguments it cannot handle).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace medmap_fast {
namespace gpu {

constexpr int kMaxModalities = 8;

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

// A (B, C, S) tensor: base pointer plus element strides.
struct StridedTensor3 {
  void* data;
  int64_t stride_b;
  int64_t stride_c;
  int64_t stride_s;
};

// Up to kMaxModalities tensors of identical shape; entries at index >= M are
// ignored.
struct TensorPack {
  StridedTensor3 t[kMaxModalities];
};

struct FusionShape {
  int64_t B;
  int64_t M;
  int64_t C;
  int64_t S;
};

// out[b,c,s] = sum over k ascending with present[b,k] of
//              coef[b,k,c] * feats[k][b,c,s]
// Accumulates in float (double for float64) with separately rounded multiply
// and add (no FMA contraction), rounding once into out. Absent modalities are
// never read, their coef included (it may be NaN); a sample with no modality
// present gets 0.
cudaError_t launch_fuse_sum_fwd(DType dtype, const FusionShape& shape,
                                const TensorPack& feats, const void* coef,
                                const uint8_t* present,
                                const StridedTensor3& out,
                                cudaStream_t stream);

// Bytes of scratch that launch_fuse_sum_bwd needs for the given arguments when
// grad_coef is requested (0 when it is not). The size depends on the shape and
// on which layout the strides select, so pass the same descriptors as to the
// launch. `feats` is only inspected when with_grad_coef is true.
size_t fuse_sum_bwd_workspace_bytes(DType dtype, const FusionShape& shape,
                                    const StridedTensor3& grad,
                                    const TensorPack& feats,
                                    const TensorPack& grad_feats,
                                    bool with_grad_coef);

// grad_feats[k][b,c,s] = present[b,k] ? coef[b,k,c] * grad[b,c,s] : 0
// (written for every k). When grad_coef is non-null:
// grad_coef[b,k,c] = present[b,k] ? sum_s feats[k][b,c,s] * grad[b,c,s] : 0,
// reduced deterministically through `workspace` (at least
// fuse_sum_bwd_workspace_bytes bytes, aligned for the accumulator type, which
// any allocator's alignment satisfies; contents need not be initialised).
// When grad_coef is null, feats and workspace are not used and may be null.
cudaError_t launch_fuse_sum_bwd(DType dtype, const FusionShape& shape,
                                const StridedTensor3& grad,
                                const TensorPack& feats, const void* coef,
                                const uint8_t* present,
                                const TensorPack& grad_feats, void* grad_coef,
                                void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// dst[k][b,c,s] = present[b,k] ? src[k][b,c,s] : 0. Absent sources are never
// read. Only the element size of dtype matters (the copy is bitwise).
cudaError_t launch_masked_copy(DType dtype, const FusionShape& shape,
                               const TensorPack& src, const uint8_t* present,
                               const TensorPack& dst, cudaStream_t stream);

}  // namespace gpu
}  // namespace medmap_fast
