// Pieces shared by the torch bindings of csrc/cuda (register_*_cuda.cpp):
// the torch includes and the small helpers that turn tensors into the plain
// descriptors of the *_kernels.h headers. Only the .cpp bindings include
// this; the .cu files stay free of torch headers.
//
// Must be included before any other torch header.

#pragma once

// CPU-only torch wheels ship the c10/cuda headers but not this generated one,
// which only carries Windows export settings; skipping it lets the bindings
// be syntax-checked against such an install. CUDA builds have it and are
// unaffected.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && \
    !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "masked_fusion_kernels.h"

namespace medmap_fast {
namespace glue {

inline std::string indexed(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The kernels' dtype of a data tensor. Name is whatever the caller has at
// hand (a literal or an indexed() string); it only appears in the message.
template <class Name>
gpu::DType kernel_dtype(const at::Tensor& t, const Name& name, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::DType::kFloat32;
    case at::kHalf:
      return gpu::DType::kFloat16;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    case at::kDouble:
      return gpu::DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; expected float32, float16, bfloat16 or float64");
  }
  return gpu::DType::kFloat32;  // unreachable
}

// Accumulator (and coefficient) dtype that goes with a data dtype.
inline at::ScalarType acc_dtype_for(at::ScalarType data) {
  return data == at::kDouble ? at::kDouble : at::kFloat;
}

// Inputs go through const_data_ptr so that copy-on-write storages are not
// materialised; the launchers never write through input descriptors.
inline gpu::StridedTensor3 describe_input(const at::Tensor& t) {
  return gpu::StridedTensor3{const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1),
                             t.stride(2)};
}

inline gpu::StridedTensor3 describe_output(const at::Tensor& t) {
  return gpu::StridedTensor3{t.mutable_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline gpu::TensorPack describe_inputs(at::TensorList ts) {
  gpu::TensorPack pack{};
  for (size_t k = 0; k < ts.size(); ++k) pack.t[k] = describe_input(ts[k]);
  return pack;
}

inline gpu::TensorPack describe_outputs(at::TensorList ts) {
  gpu::TensorPack pack{};
  for (size_t k = 0; k < ts.size(); ++k) pack.t[k] = describe_output(ts[k]);
  return pack;
}

// Partial results live in a caching-allocator buffer on the current stream,
// so they are reused across calls without synchronisation.
inline at::Tensor workspace(size_t bytes, const at::Device& device) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

inline void* ws_ptr(const at::Tensor& ws) { return ws.defined() ? ws.mutable_data_ptr() : nullptr; }

inline cudaStream_t current_stream(const at::Device& device) {
  // Same stream object that at::cuda::getCurrentCUDAStream() returns; the
  // c10 spelling avoids pulling the cuBLAS/cuSPARSE headers of CUDAContext.h.
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

}  // namespace glue
}  // namespace medmap_fast
