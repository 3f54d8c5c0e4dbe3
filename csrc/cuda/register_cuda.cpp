// Torch bindings for the CUDA masked-fusion kernels: schema definitions for
// the medmap_fast_cuda namespace, argument validation, and translation of
// tensors into the plain descriptors of masked_fusion_kernels.h.

#include "torch_glue.h"

#include <cstdint>
#include <optional>
#include <string>

#include "masked_fusion_kernels.h"

namespace {

namespace gpu = medmap_fast::gpu;

using medmap_fast::glue::acc_dtype_for;
using medmap_fast::glue::describe_input;
using medmap_fast::glue::describe_inputs;
using medmap_fast::glue::describe_output;
using medmap_fast::glue::describe_outputs;
using medmap_fast::glue::indexed;
using medmap_fast::glue::kernel_dtype;

// Reference geometry every (B, C, S) argument of one call must match.
struct Reference {
  const char* op;
  at::ScalarType dtype;
  at::Device device;
  int64_t B;
  int64_t C;
  int64_t S;
};

Reference reference_from(const at::Tensor& t, const std::string& name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (B, C, S), got sizes ", t.sizes());
  kernel_dtype(t, name, op);
  return Reference{op, t.scalar_type(), t.device(), t.size(0), t.size(1), t.size(2)};
}

void check_like(const at::Tensor& t, const std::string& name, const Reference& ref,
                const std::string& ref_name) {
  TORCH_CHECK(t.defined(), ref.op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device, ref.op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device);
  TORCH_CHECK(t.scalar_type() == ref.dtype, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.dtype);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == ref.B && t.size(1) == ref.C && t.size(2) == ref.S,
              ref.op, ": ", name, " has sizes ", t.sizes(), " but expected [", ref.B, ", ", ref.C,
              ", ", ref.S, "] like ", ref_name);
}

// Outputs are written by many threads at once: an output whose elements
// alias each other would make the result depend on scheduling.
void check_writable(const at::Tensor& t, const std::string& name, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has internally overlapping memory (e.g. an expanded tensor) and cannot be "
              "written");
}

void check_coef_like(const at::Tensor& t, const char* name, const Reference& ref, int64_t M) {
  TORCH_CHECK(t.defined(), ref.op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device, ref.op, ": ", name, " is on ", t.device(),
              " but the features are on ", ref.device);
  const at::ScalarType want = acc_dtype_for(ref.dtype);
  TORCH_CHECK(t.scalar_type() == want, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", want, " is required for ", ref.dtype, " features");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == ref.B && t.size(1) == M && t.size(2) == ref.C, ref.op,
              ": ", name, " has sizes ", t.sizes(), " but expected [", ref.B, ", ", M, ", ", ref.C,
              "]");
  TORCH_CHECK(t.is_contiguous(), ref.op, ": ", name, " must be contiguous");
}

void check_present(const at::Tensor& t, const Reference& ref, int64_t M) {
  TORCH_CHECK(t.defined(), ref.op, ": present is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device, ref.op, ": present is on ", t.device(),
              " but the features are on ", ref.device);
  TORCH_CHECK(t.scalar_type() == at::kBool, ref.op, ": present has dtype ", t.scalar_type(),
              " but bool is required");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == ref.B && t.size(1) == M, ref.op,
              ": present has sizes ", t.sizes(), " but expected [", ref.B, ", ", M, "]");
  TORCH_CHECK(t.is_contiguous(), ref.op, ": present must be contiguous");
}

void check_modality_count(size_t M, const char* name, const char* op) {
  TORCH_CHECK(M >= 1, op, ": ", name, " must hold at least one tensor");
  TORCH_CHECK(M <= static_cast<size_t>(gpu::kMaxModalities), op, ": ", name, " holds ", M,
              " tensors but at most ", gpu::kMaxModalities, " modalities are supported");
}

const uint8_t* present_ptr(const at::Tensor& present) {
  return static_cast<const uint8_t*>(present.const_data_ptr());
}

void fuse_sum_fwd_cuda(at::TensorList feats, const at::Tensor& coef, const at::Tensor& present,
                       const at::Tensor& out) {
  const char* op = "medmap_fast_cuda::fuse_sum_fwd";
  check_modality_count(feats.size(), "feats", op);
  const int64_t M = static_cast<int64_t>(feats.size());
  const Reference ref = reference_from(feats[0], "feats[0]", op);
  for (size_t k = 1; k < feats.size(); ++k) check_like(feats[k], indexed("feats", k), ref, "feats[0]");
  check_coef_like(coef, "coef", ref, M);
  check_present(present, ref, M);
  check_like(out, "out", ref, "feats[0]");
  check_writable(out, "out", op);

  const c10::cuda::CUDAGuard guard(ref.device);
  if (ref.B == 0 || ref.C == 0 || ref.S == 0) return;
  const gpu::FusionShape shape{ref.B, M, ref.C, ref.S};
  // Same stream object that at::cuda::getCurrentCUDAStream() returns; the
  // c10 spelling avoids pulling the cuBLAS/cuSPARSE headers of CUDAContext.h.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.device.index()).stream();
  C10_CUDA_CHECK(gpu::launch_fuse_sum_fwd(kernel_dtype(out, "out", op), shape,
                                          describe_inputs(feats), coef.const_data_ptr(),
                                          present_ptr(present), describe_output(out), stream));
}

void fuse_sum_bwd_cuda(const at::Tensor& grad, at::TensorList feats, const at::Tensor& coef,
                       const at::Tensor& present, at::TensorList grad_feats,
                       const std::optional<at::Tensor>& grad_coef) {
  const char* op = "medmap_fast_cuda::fuse_sum_bwd";
  check_modality_count(grad_feats.size(), "grad_feats", op);
  const int64_t M = static_cast<int64_t>(grad_feats.size());
  const bool want_coef = grad_coef.has_value() && grad_coef->defined();
  const Reference ref = reference_from(grad, "grad", op);

  // feats are only read for grad_coef; without it an empty list is accepted.
  TORCH_CHECK(feats.size() == grad_feats.size() || (!want_coef && feats.empty()), op,
              ": feats holds ", feats.size(), " tensors but grad_feats holds ", grad_feats.size(),
              (want_coef ? "" : " (feats may also be empty when grad_coef is None)"));
  for (size_t k = 0; k < feats.size(); ++k) check_like(feats[k], indexed("feats", k), ref, "grad");
  check_coef_like(coef, "coef", ref, M);
  check_present(present, ref, M);
  for (size_t k = 0; k < grad_feats.size(); ++k) {
    const std::string name = indexed("grad_feats", k);
    check_like(grad_feats[k], name, ref, "grad");
    check_writable(grad_feats[k], name, op);
  }
  if (want_coef) check_coef_like(*grad_coef, "grad_coef", ref, M);

  const c10::cuda::CUDAGuard guard(ref.device);
  if (ref.B == 0 || ref.C == 0) return;  // every output is empty
  const gpu::FusionShape shape{ref.B, M, ref.C, ref.S};
  const gpu::DType dtype = kernel_dtype(grad, "grad", op);
  const gpu::StridedTensor3 grad_desc = describe_input(grad);
  const gpu::TensorPack feats_desc = want_coef ? describe_inputs(feats) : gpu::TensorPack{};
  const gpu::TensorPack grad_feats_desc = describe_outputs(grad_feats);

  // Partial sums live in a caching-allocator buffer on the launch stream, so
  // they are reused across calls without synchronisation.
  const size_t ws_bytes = gpu::fuse_sum_bwd_workspace_bytes(dtype, shape, grad_desc, feats_desc,
                                                            grad_feats_desc, want_coef);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)},
                          at::TensorOptions().dtype(at::kByte).device(ref.device));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.device.index()).stream();
  C10_CUDA_CHECK(gpu::launch_fuse_sum_bwd(
      dtype, shape, grad_desc, feats_desc, coef.const_data_ptr(), present_ptr(present),
      grad_feats_desc, want_coef ? grad_coef->mutable_data_ptr() : nullptr,
      ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, ws_bytes, stream));
}

void masked_copy_cuda(at::TensorList src, const at::Tensor& present, at::TensorList dst) {
  const char* op = "medmap_fast_cuda::masked_copy";
  check_modality_count(src.size(), "src", op);
  TORCH_CHECK(dst.size() == src.size(), op, ": dst holds ", dst.size(),
              " tensors but src holds ", src.size());
  const int64_t M = static_cast<int64_t>(src.size());
  const Reference ref = reference_from(src[0], "src[0]", op);
  for (size_t k = 1; k < src.size(); ++k) check_like(src[k], indexed("src", k), ref, "src[0]");
  for (size_t k = 0; k < dst.size(); ++k) {
    const std::string name = indexed("dst", k);
    check_like(dst[k], name, ref, "src[0]");
    check_writable(dst[k], name, op);
  }
  check_present(present, ref, M);

  const c10::cuda::CUDAGuard guard(ref.device);
  if (ref.B == 0 || ref.C == 0 || ref.S == 0) return;
  const gpu::FusionShape shape{ref.B, M, ref.C, ref.S};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.device.index()).stream();
  C10_CUDA_CHECK(gpu::launch_masked_copy(kernel_dtype(src[0], "src[0]", op), shape,
                                         describe_inputs(src), present_ptr(present),
                                         describe_outputs(dst), stream));
}

}  // namespace

TORCH_LIBRARY(medmap_fast_cuda, m) {
  m.def("fuse_sum_fwd(Tensor[] feats, Tensor coef, Tensor present, Tensor(a!) out) -> ()");
  m.def(
      "fuse_sum_bwd(Tensor grad, Tensor[] feats, Tensor coef, Tensor present, "
      "Tensor(a!)[] grad_feats, Tensor(b!)? grad_coef) -> ()");
  m.def("masked_copy(Tensor[] src, Tensor present, Tensor(a!)[] dst) -> ()");
}

TORCH_LIBRARY_IMPL(medmap_fast_cuda, CUDA, m) {
  m.impl("fuse_sum_fwd", &fuse_sum_fwd_cuda);
  m.impl("fuse_sum_bwd", &fuse_sum_bwd_cuda);
  m.impl("masked_copy", &masked_copy_cuda);
}
