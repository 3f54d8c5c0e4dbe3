// Torch bindings for the CUDA normalisation + activation kernels: the schemas
// (the same names and arguments as the medmap_fast_C ones), argument
// validation, and translation of tensors into the descriptors of
// norm_act_kernels.h. register_cuda.cpp owns the TORCH_LIBRARY block of
// medmap_fast_cuda; this file adds to it.

#include "torch_glue.h"

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "norm_act_kernels.h"

namespace {

namespace gpu = medmap_fast::gpu;

using medmap_fast::glue::acc_dtype_for;
using medmap_fast::glue::current_stream;
using medmap_fast::glue::describe_input;
using medmap_fast::glue::describe_output;
using medmap_fast::glue::given;
using medmap_fast::glue::kernel_dtype;
using medmap_fast::glue::workspace;
using medmap_fast::glue::ws_ptr;

// What every argument of one call is checked against: x's device, dtype and
// (B, C, S) sizes, and the group count.
struct Ref {
  const char* op;
  at::ScalarType dtype;
  at::Device device;
  gpu::NormActShape shape;
};

Ref check_x(const at::Tensor& x, int64_t groups, const char* op) {
  TORCH_CHECK(x.defined(), op, ": x is an undefined tensor");
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, C, S), got sizes ", x.sizes());
  kernel_dtype(x, "x", op);
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  const int64_t S = x.size(2);
  TORCH_CHECK(B >= 0 && C >= 1 && S >= 1, op, ": x has sizes ", x.sizes(),
              "; C and S must be at least 1");
  TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": groups = ", groups,
              " must be a positive divisor of the channel count C = ", C);
  return Ref{op, x.scalar_type(), x.device(), gpu::NormActShape{B, C, S, groups}};
}

void check_device(const at::Tensor& t, const char* name, const Ref& ref) {
  TORCH_CHECK(t.defined(), ref.op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device, ref.op, ": ", name, " is on ", t.device(),
              " but x is on ", ref.device);
}

void check_sizes(const at::Tensor& t, const char* name, const Ref& ref, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, ref.op, ": ", name, " has sizes ", t.sizes(), " but ", want,
              " is required");
}

// A (B, C, S) tensor like x: same device, dtype and sizes; any strides.
void check_data(const at::Tensor& t, const char* name, const Ref& ref) {
  check_device(t, name, ref);
  TORCH_CHECK(t.scalar_type() == ref.dtype, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", ref.dtype);
  check_sizes(t, name, ref, {ref.shape.B, ref.shape.C, ref.shape.S});
}

// A small tensor: contiguous, in the accumulation dtype of x.
void check_acc(const at::Tensor& t, const char* name, const Ref& ref, at::IntArrayRef sizes) {
  check_device(t, name, ref);
  const at::ScalarType want = acc_dtype_for(ref.dtype);
  TORCH_CHECK(t.scalar_type() == want, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", want, " is required for ", ref.dtype, " data");
  check_sizes(t, name, ref, sizes);
  TORCH_CHECK(t.is_contiguous(), ref.op, ": ", name, " must be contiguous");
}

// Outputs are written by many threads at once: an output whose elements
// alias each other, or that shares memory with an input other than element
// for element, would make the result depend on scheduling. Full aliasing is
// fine: each element is read by the thread that writes it, before it writes.
void check_writable(const at::Tensor& t, const char* name, const char* op,
                    std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has internally overlapping memory (e.g. an expanded tensor) and cannot be "
              "written");
  for (const at::Tensor* in : inputs) {
    if (in == nullptr) continue;
    TORCH_CHECK(at::get_overlap_status(t, *in) != at::MemOverlapStatus::Partial, op, ": ", name,
                " partially overlaps one of the inputs");
  }
}

void check_mode(int64_t mode, const char* op) {
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": residual_mode must be 0 (none), 1 (added before "
              "the activation) or 2 (added after it), got ", mode);
}

void norm_act_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<at::Tensor>& residual, const at::Tensor& y,
                       const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                       double slope, int64_t residual_mode, double eps) {
  const char* op = "medmap_fast_cuda::norm_act_fwd";
  const Ref ref = check_x(x, groups, op);
  const gpu::NormActShape& sh = ref.shape;
  check_mode(residual_mode, op);
  check_acc(weight, "weight", ref, {sh.C});
  check_acc(bias, "bias", ref, {sh.C});
  const bool have_res = given(residual);
  if (residual_mode == 0) {
    TORCH_CHECK(!have_res, op, ": residual must be None when residual_mode is 0");
  } else {
    TORCH_CHECK(have_res, op, ": residual is required when residual_mode is ", residual_mode);
    check_data(*residual, "residual", ref);
  }
  check_data(y, "y", ref);
  check_writable(y, "y", op, {&x, have_res ? &*residual : nullptr});
  check_acc(mean, "mean", ref, {sh.B, sh.G});
  check_acc(rstd, "rstd", ref, {sh.B, sh.G});

  const c10::cuda::CUDAGuard guard(ref.device);
  if (sh.B == 0) return;  // every output is empty
  const gpu::DType dtype = kernel_dtype(x, "x", op);
  const gpu::StridedTensor3 xd = describe_input(x);
  gpu::StridedTensor3 rd{};
  if (have_res) rd = describe_input(*residual);
  const size_t bytes = gpu::norm_act_fwd_workspace_bytes(dtype, sh, xd);
  const at::Tensor ws = workspace(bytes, ref.device);
  C10_CUDA_CHECK(gpu::launch_norm_act_fwd(
      dtype, sh, xd, weight.const_data_ptr(), bias.const_data_ptr(), have_res ? &rd : nullptr,
      describe_output(y), mean.mutable_data_ptr(), rstd.mutable_data_ptr(), slope,
      static_cast<int>(residual_mode), eps, ws_ptr(ws), bytes, current_stream(ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void norm_act_bwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<at::Tensor>& residual, const at::Tensor& dy,
                       const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dx,
                       const std::optional<at::Tensor>& dres, const at::Tensor& dweight,
                       const at::Tensor& dbias, int64_t groups, double slope,
                       int64_t residual_mode) {
  const char* op = "medmap_fast_cuda::norm_act_bwd";
  const Ref ref = check_x(x, groups, op);
  const gpu::NormActShape& sh = ref.shape;
  check_mode(residual_mode, op);
  check_acc(weight, "weight", ref, {sh.C});
  check_acc(bias, "bias", ref, {sh.C});
  // Only mode 1 puts the residual inside the activation, so only its
  // backward reads the residual or produces a separate residual gradient.
  const bool have_res = given(residual);
  if (residual_mode == 1) {
    TORCH_CHECK(have_res, op, ": residual is required when residual_mode is 1");
    check_data(*residual, "residual", ref);
  } else {
    TORCH_CHECK(!have_res, op, ": residual must be None when residual_mode is ", residual_mode,
                " (only mode 1 reads it)");
  }
  check_data(dy, "dy", ref);
  check_acc(mean, "mean", ref, {sh.B, sh.G});
  check_acc(rstd, "rstd", ref, {sh.B, sh.G});
  const at::Tensor* res_p = have_res ? &*residual : nullptr;
  check_data(dx, "dx", ref);
  check_writable(dx, "dx", op, {&x, &dy, res_p});
  const bool want_dres = given(dres);
  if (want_dres) {
    TORCH_CHECK(residual_mode == 1, op, ": dres may only be given when residual_mode is 1 (in "
                "mode 2 the residual's gradient is dy), got residual_mode ", residual_mode);
    check_data(*dres, "dres", ref);
    check_writable(*dres, "dres", op, {&x, &dy, res_p});
    // Both are written for the same element by the same thread.
    const at::MemOverlapStatus o = at::get_overlap_status(dx, *dres);
    TORCH_CHECK(o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial, op,
                ": dx and dres must not overlap");
  }
  check_acc(dweight, "dweight", ref, {sh.C});
  check_acc(dbias, "dbias", ref, {sh.C});

  const c10::cuda::CUDAGuard guard(ref.device);
  if (sh.B == 0) {
    // Sums over an empty batch.
    dweight.zero_();
    dbias.zero_();
    return;
  }
  const gpu::DType dtype = kernel_dtype(x, "x", op);
  const gpu::StridedTensor3 xd = describe_input(x);
  const gpu::StridedTensor3 dyd = describe_input(dy);
  gpu::StridedTensor3 rd{};
  if (have_res) rd = describe_input(*residual);
  gpu::StridedTensor3 drd{};
  if (want_dres) drd = describe_output(*dres);
  const gpu::StridedTensor3* rp = have_res ? &rd : nullptr;
  const size_t bytes = gpu::norm_act_bwd_workspace_bytes(dtype, sh, xd, dyd, rp);
  const at::Tensor ws = workspace(bytes, ref.device);
  C10_CUDA_CHECK(gpu::launch_norm_act_bwd(
      dtype, sh, xd, weight.const_data_ptr(), bias.const_data_ptr(), rp, dyd,
      mean.const_data_ptr(), rstd.const_data_ptr(), describe_output(dx),
      want_dres ? &drd : nullptr, dweight.mutable_data_ptr(), dbias.mutable_data_ptr(), slope,
      static_cast<int>(residual_mode), ws_ptr(ws), bytes, current_stream(ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medmap_fast_cuda, m) {
  m.def(
      "norm_act_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!) y, "
      "Tensor(b!) mean, Tensor(c!) rstd, int groups, float slope, int residual_mode, "
      "float eps) -> ()");
  m.def(
      "norm_act_bwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor dy, "
      "Tensor mean, Tensor rstd, Tensor(a!) dx, Tensor(b!)? dres, Tensor(c!) dweight, "
      "Tensor(d!) dbias, int groups, float slope, int residual_mode) -> ()");
}

TORCH_LIBRARY_IMPL(medmap_fast_cuda, CUDA, m) {
  m.impl("norm_act_fwd", &norm_act_fwd_cuda);
  m.impl("norm_act_bwd", &norm_act_bwd_cuda);
}
