// Pieces shared by the CUDA translation units of csrc/cuda: launch constants,
// the element-type traits, explicitly rounded arithmetic, the warp butterfly
// and the host-side dtype helpers.
//
// No torch headers here: every .cu that includes this builds with a bare
// nvcc. Everything is a template, an inline function or a constant, so each
// translation unit gets the same code it had when these lived in its own
// anonymous namespace.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "masked_fusion_kernels.h"

namespace medmap_fast {
namespace gpu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Element types. Half and bfloat16 travel as raw 16-bit words so that the
// register packs stay trivially copyable. S is the storage type, A the
// accumulator type.

struct TraitsF32 {
  using S = float;
  using A = float;
  __device__ __forceinline__ static A to_acc(S v) { return v; }
  __device__ __forceinline__ static S from_acc(A v) { return v; }
};

struct TraitsF16 {
  using S = unsigned short;
  using A = float;
  __device__ __forceinline__ static A to_acc(S v) { return __half2float(__ushort_as_half(v)); }
  __device__ __forceinline__ static S from_acc(A v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct TraitsBF16 {
  using S = unsigned short;
  using A = float;
  __device__ __forceinline__ static A to_acc(S v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  }
  __device__ __forceinline__ static S from_acc(A v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

struct TraitsF64 {
  using S = double;
  using A = double;
  __device__ __forceinline__ static A to_acc(S v) { return v; }
  __device__ __forceinline__ static S from_acc(A v) { return v; }
};

// One 16-byte group of VEC elements, moved with a single 128-bit access.
template <typename S, int VEC>
union Pack16 {
  uint4 raw;
  S e[VEC];
};

// Separately rounded multiply and add: nvcc never contracts them into FMAs,
// so a result equals a plain sequential loop on the host (the CPU build
// disables FMA contraction), which keeps CPU and CUDA outputs comparable.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  // Butterfly with a fixed pairing; IEEE addition is commutative, so every
  // lane ends with the same bits.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ---------------------------------------------------------------------------
// Host-side helpers.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

inline int element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat64:
      return 8;
    case DType::kFloat32:
    default:
      return 4;
  }
}

inline bool valid_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16 ||
         dtype == DType::kFloat64;
}

// Grid size for n logical blocks; kernels loop when n exceeds the limit.
inline unsigned grid_for(int64_t n) { return static_cast<unsigned>(n < INT_MAX ? n : INT_MAX); }

}  // namespace gpu
}  // namespace medmap_fast
