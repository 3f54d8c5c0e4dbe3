// Torch bindings for the CUDA alignment kernels: the schemas (the same names
// and arguments as the medmap_fast_C ones), argument validation, and
// translation of tensors into the descriptors of alignment_kernels.h.
// register_cuda.cpp owns the TORCH_LIBRARY block of medmap_fast_cuda; this
// file adds to it.

#include "torch_glue.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "alignment_kernels.h"

namespace {

namespace gpu = medmap_fast::gpu;

using medmap_fast::glue::acc_dtype_for;
using medmap_fast::glue::current_stream;
using medmap_fast::glue::describe_input;
using medmap_fast::glue::describe_inputs;
using medmap_fast::glue::describe_output;
using medmap_fast::glue::describe_outputs;
using medmap_fast::glue::given;
using medmap_fast::glue::indexed;
using medmap_fast::glue::kernel_dtype;
using medmap_fast::glue::workspace;
using medmap_fast::glue::ws_ptr;

// What every argument of one call is checked against.
struct Ref {
  const char* op;
  at::ScalarType dtype;  // features
  at::Device device;
};

Ref reference_from(const at::Tensor& t, const std::string& name, const char* op, int64_t dim,
                   const char* dims) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", dims, ", got sizes ",
              t.sizes());
  kernel_dtype(t, name, op);
  return Ref{op, t.scalar_type(), t.device()};
}

void check_device(const at::Tensor& t, const std::string& name, const Ref& ref) {
  TORCH_CHECK(t.defined(), ref.op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device, ref.op, ": ", name, " is on ", t.device(),
              " but the inputs are on ", ref.device);
}

void check_sizes(const at::Tensor& t, const std::string& name, const Ref& ref,
                 at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, ref.op, ": ", name, " has sizes ", t.sizes(), " but ", want,
              " is required");
}

// A feature-sized tensor: same device, dtype and sizes as the reference one.
void check_feature(const at::Tensor& t, const std::string& name, const Ref& ref,
                   at::IntArrayRef sizes) {
  check_device(t, name, ref);
  TORCH_CHECK(t.scalar_type() == ref.dtype, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but the features have dtype ", ref.dtype);
  check_sizes(t, name, ref, sizes);
}

// A small tensor: contiguous, in the accumulation dtype of the features.
void check_acc(const at::Tensor& t, const std::string& name, const Ref& ref,
               at::IntArrayRef sizes) {
  check_device(t, name, ref);
  const at::ScalarType want = acc_dtype_for(ref.dtype);
  TORCH_CHECK(t.scalar_type() == want, ref.op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              want, " is required for ", ref.dtype, " features");
  check_sizes(t, name, ref, sizes);
  TORCH_CHECK(t.is_contiguous(), ref.op, ": ", name, " must be contiguous");
}

void check_mask(const at::Tensor& t, const std::string& name, const Ref& ref,
                at::IntArrayRef sizes) {
  check_device(t, name, ref);
  TORCH_CHECK(t.scalar_type() == at::kBool, ref.op, ": ", name, " has dtype ", t.scalar_type(),
              " but bool is required");
  check_sizes(t, name, ref, sizes);
  TORCH_CHECK(t.is_contiguous(), ref.op, ": ", name, " must be contiguous");
}

// Outputs are written by many threads at once: an output whose elements
// alias each other would make the result depend on scheduling.
void check_writable(const at::Tensor& t, const std::string& name, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has internally overlapping memory (e.g. an expanded tensor) and cannot be "
              "written");
}

void check_modality_count(size_t M, const char* name, const char* op) {
  TORCH_CHECK(M >= 1, op, ": ", name, " must hold at least one tensor");
  TORCH_CHECK(M <= static_cast<size_t>(gpu::kMaxModalities), op, ": ", name, " holds ", M,
              " tensors but the CUDA kernels support at most ", gpu::kMaxModalities,
              " modalities");
}

const uint8_t* mask_ptr(const at::Tensor& t) {
  return static_cast<const uint8_t*>(t.const_data_ptr());
}

// The features of a call: count, shared device/dtype/sizes.
struct Features {
  Ref ref;
  int64_t M;
  gpu::AlignShape shape;
};

Features check_features(at::TensorList feats, const char* op) {
  check_modality_count(feats.size(), "feats", op);
  const Ref ref = reference_from(feats[0], "feats[0]", op, 3, "(B, C, S)");
  const at::IntArrayRef sizes = feats[0].sizes();
  for (size_t k = 1; k < feats.size(); ++k) check_feature(feats[k], indexed("feats", k), ref, sizes);
  const int64_t M = static_cast<int64_t>(feats.size());
  return Features{ref, M, gpu::AlignShape{sizes[0], M, sizes[1], sizes[2]}};
}

void check_grad_feats(at::TensorList grad_feats, const Features& f) {
  TORCH_CHECK(static_cast<int64_t>(grad_feats.size()) == f.M, f.ref.op, ": grad_feats holds ",
              grad_feats.size(), " tensors but feats holds ", f.M);
  const std::vector<int64_t> sizes{f.shape.B, f.shape.C, f.shape.S};
  for (size_t k = 0; k < grad_feats.size(); ++k) {
    const std::string name = indexed("grad_feats", k);
    check_feature(grad_feats[k], name, f.ref, sizes);
    check_writable(grad_feats[k], name, f.ref.op);
  }
}

// ---- anchor alignment --------------------------------------------------------

void anchor_fwd_cuda(at::TensorList feats, const at::Tensor& coef, const at::Tensor& present,
                     const at::Tensor& sq, const std::optional<at::Tensor>& anchor) {
  const char* op = "medmap_fast_cuda::anchor_fwd";
  const Features f = check_features(feats, op);
  const gpu::AlignShape& sh = f.shape;
  check_acc(coef, "coef", f.ref, {sh.B, f.M, sh.C});
  check_mask(present, "present", f.ref, {sh.B, f.M});
  check_acc(sq, "sq", f.ref, {sh.B, f.M, sh.C});
  const bool want_anchor = given(anchor);
  if (want_anchor) {
    check_feature(*anchor, "anchor", f.ref, {sh.B, sh.C, sh.S});
    check_writable(*anchor, "anchor", op);
  }

  const c10::cuda::CUDAGuard guard(f.ref.device);
  const gpu::DType dtype = kernel_dtype(feats[0], "feats[0]", op);
  const gpu::TensorPack fd = describe_inputs(feats);
  gpu::StridedTensor3 ad{};
  if (want_anchor) ad = describe_output(*anchor);
  const gpu::StridedTensor3* ap = want_anchor ? &ad : nullptr;
  const size_t bytes = gpu::anchor_fwd_workspace_bytes(dtype, sh, fd, ap);
  const at::Tensor ws = workspace(bytes, f.ref.device);
  C10_CUDA_CHECK(gpu::launch_anchor_fwd(dtype, sh, fd, coef.const_data_ptr(), mask_ptr(present),
                                        sq.mutable_data_ptr(), ap, ws_ptr(ws), bytes,
                                        current_stream(f.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void anchor_bwd_cuda(at::TensorList feats, const at::Tensor& coef, const at::Tensor& present,
                     const at::Tensor& G, bool detach, at::TensorList grad_feats,
                     const std::optional<at::Tensor>& grad_coef) {
  const char* op = "medmap_fast_cuda::anchor_bwd";
  const Features f = check_features(feats, op);
  const gpu::AlignShape& sh = f.shape;
  check_acc(coef, "coef", f.ref, {sh.B, f.M, sh.C});
  check_mask(present, "present", f.ref, {sh.B, f.M});
  check_acc(G, "G", f.ref, {sh.B, f.M, sh.C});
  check_grad_feats(grad_feats, f);
  const bool want_coef = given(grad_coef);
  if (want_coef) check_acc(*grad_coef, "grad_coef", f.ref, {sh.B, f.M, sh.C});

  const c10::cuda::CUDAGuard guard(f.ref.device);
  const gpu::DType dtype = kernel_dtype(feats[0], "feats[0]", op);
  const gpu::TensorPack fd = describe_inputs(feats);
  const gpu::TensorPack gd = describe_outputs(grad_feats);
  const size_t bytes = gpu::anchor_bwd_workspace_bytes(dtype, sh, fd, gd, want_coef);
  const at::Tensor ws = workspace(bytes, f.ref.device);
  C10_CUDA_CHECK(gpu::launch_anchor_bwd(
      dtype, sh, fd, coef.const_data_ptr(), mask_ptr(present), G.const_data_ptr(), detach, gd,
      want_coef ? grad_coef->mutable_data_ptr() : nullptr, ws_ptr(ws), bytes,
      current_stream(f.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- moment matching ---------------------------------------------------------

void moments_fwd_cuda(at::TensorList feats, const std::optional<at::Tensor>& coef,
                      const at::Tensor& present, const at::Tensor& mean, const at::Tensor& m2) {
  const char* op = "medmap_fast_cuda::moments_fwd";
  const Features f = check_features(feats, op);
  const gpu::AlignShape& sh = f.shape;
  const bool with_anchor = given(coef);
  const int64_t slots = f.M + (with_anchor ? 1 : 0);
  if (with_anchor) check_acc(*coef, "coef", f.ref, {sh.B, f.M, sh.C});
  check_mask(present, "present", f.ref, {sh.B, f.M});
  check_acc(mean, "mean", f.ref, {sh.B, slots, sh.C});
  check_acc(m2, "m2", f.ref, {sh.B, slots, sh.C});

  const c10::cuda::CUDAGuard guard(f.ref.device);
  const gpu::DType dtype = kernel_dtype(feats[0], "feats[0]", op);
  const gpu::TensorPack fd = describe_inputs(feats);
  const size_t bytes = gpu::moments_fwd_workspace_bytes(dtype, sh, fd, with_anchor);
  const at::Tensor ws = workspace(bytes, f.ref.device);
  C10_CUDA_CHECK(gpu::launch_moments_fwd(dtype, sh, fd,
                                         with_anchor ? coef->const_data_ptr() : nullptr,
                                         mask_ptr(present), mean.mutable_data_ptr(),
                                         m2.mutable_data_ptr(), ws_ptr(ws), bytes,
                                         current_stream(f.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moments_bwd_cuda(at::TensorList feats, const std::optional<at::Tensor>& coef,
                      const at::Tensor& present, const at::Tensor& mean, const at::Tensor& alpha,
                      const at::Tensor& beta, at::TensorList grad_feats,
                      const std::optional<at::Tensor>& grad_coef) {
  const char* op = "medmap_fast_cuda::moments_bwd";
  const Features f = check_features(feats, op);
  const gpu::AlignShape& sh = f.shape;
  const bool with_anchor = given(coef);
  const int64_t slots = f.M + (with_anchor ? 1 : 0);
  if (with_anchor) check_acc(*coef, "coef", f.ref, {sh.B, f.M, sh.C});
  check_mask(present, "present", f.ref, {sh.B, f.M});
  check_acc(mean, "mean", f.ref, {sh.B, slots, sh.C});
  check_acc(alpha, "alpha", f.ref, {sh.B, slots, sh.C});
  check_acc(beta, "beta", f.ref, {sh.B, slots, sh.C});
  check_grad_feats(grad_feats, f);
  const bool want_coef = given(grad_coef);
  TORCH_CHECK(!want_coef || with_anchor, op, ": grad_coef requires coef (the anchor's moments)");
  if (want_coef) check_acc(*grad_coef, "grad_coef", f.ref, {sh.B, f.M, sh.C});

  const c10::cuda::CUDAGuard guard(f.ref.device);
  const gpu::DType dtype = kernel_dtype(feats[0], "feats[0]", op);
  const gpu::TensorPack fd = describe_inputs(feats);
  const gpu::TensorPack gd = describe_outputs(grad_feats);
  const size_t bytes = gpu::moments_bwd_workspace_bytes(dtype, sh, fd, gd, want_coef);
  const at::Tensor ws = workspace(bytes, f.ref.device);
  C10_CUDA_CHECK(gpu::launch_moments_bwd(
      dtype, sh, fd, with_anchor ? coef->const_data_ptr() : nullptr, mask_ptr(present),
      mean.const_data_ptr(), alpha.const_data_ptr(), beta.const_data_ptr(), gd,
      want_coef ? grad_coef->mutable_data_ptr() : nullptr, ws_ptr(ws), bytes,
      current_stream(f.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- Gaussian KL -------------------------------------------------------------

struct KlArgs {
  Ref ref;
  gpu::KlShape shape;
};

KlArgs check_kl_common(const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& present, const at::Tensor& nu,
                       const at::Tensor& logtau2, const char* op) {
  const Ref ref = reference_from(mu, "mu", op, 3, "(G, R, C)");
  const int64_t G = mu.size(0);
  const int64_t R = mu.size(1);
  const int64_t C = mu.size(2);
  check_feature(logvar, "logvar", ref, mu.sizes());
  TORCH_CHECK(nu.defined() && nu.dim() == 2, op, ": nu must be 2-D (J, C), got ",
              nu.defined() ? nu.sizes() : at::IntArrayRef{});
  const int64_t J = nu.size(0);
  TORCH_CHECK(J >= 1 && J <= gpu::kMaxKlComponents, op, ": nu has ", J,
              " mixture components but the CUDA kernels support 1 to ", gpu::kMaxKlComponents);
  TORCH_CHECK(C <= gpu::kMaxKlChannels, op, ": mu has ", C,
              " channels but the CUDA Gaussian-KL kernels support at most ", gpu::kMaxKlChannels);
  check_acc(nu, "nu", ref, {J, C});
  check_acc(logtau2, "logtau2", ref, {J, C});
  if (given(present)) check_mask(*present, "present", ref, {G});
  return KlArgs{ref, gpu::KlShape{G, R, C, J}};
}

void gkl_fwd_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                  const std::optional<at::Tensor>& present, const at::Tensor& nu,
                  const at::Tensor& logtau2, const at::Tensor& logpi, const at::Tensor& loss,
                  const std::optional<at::Tensor>& resp) {
  const char* op = "medmap_fast_cuda::gkl_fwd";
  const KlArgs k = check_kl_common(mu, logvar, present, nu, logtau2, op);
  const gpu::KlShape& sh = k.shape;
  check_acc(logpi, "logpi", k.ref, {sh.J});
  check_acc(loss, "loss", k.ref, {sh.G, sh.R});
  const bool want_resp = given(resp);
  if (want_resp) check_acc(*resp, "resp", k.ref, {sh.G, sh.R, sh.J});

  const c10::cuda::CUDAGuard guard(k.ref.device);
  const gpu::DType dtype = kernel_dtype(mu, "mu", op);
  const size_t bytes = gpu::gkl_fwd_workspace_bytes(dtype, sh);
  const at::Tensor ws = workspace(bytes, k.ref.device);
  C10_CUDA_CHECK(gpu::launch_gkl_fwd(
      dtype, sh, describe_input(mu), describe_input(logvar),
      given(present) ? mask_ptr(*present) : nullptr, nu.const_data_ptr(),
      logtau2.const_data_ptr(), logpi.const_data_ptr(), loss.mutable_data_ptr(),
      want_resp ? resp->mutable_data_ptr() : nullptr, ws_ptr(ws), bytes,
      current_stream(k.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gkl_bwd_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                  const std::optional<at::Tensor>& present, const at::Tensor& nu,
                  const at::Tensor& logtau2, const std::optional<at::Tensor>& resp,
                  const at::Tensor& w, const std::optional<at::Tensor>& grad_mu,
                  const std::optional<at::Tensor>& grad_logvar,
                  const std::optional<at::Tensor>& stats) {
  const char* op = "medmap_fast_cuda::gkl_bwd";
  const KlArgs k = check_kl_common(mu, logvar, present, nu, logtau2, op);
  const gpu::KlShape& sh = k.shape;
  const bool have_resp = given(resp);
  if (have_resp) {
    check_acc(*resp, "resp", k.ref, {sh.G, sh.R, sh.J});
  } else {
    TORCH_CHECK(sh.J == 1, op, ": resp may only be omitted when J == 1, got J = ", sh.J);
  }
  // w may be a broadcast view (zero strides), so only dtype and sizes are checked.
  check_device(w, "w", k.ref);
  TORCH_CHECK(w.scalar_type() == acc_dtype_for(k.ref.dtype), op, ": w has dtype ",
              w.scalar_type(), " but ", acc_dtype_for(k.ref.dtype), " is required for ",
              k.ref.dtype, " features");
  check_sizes(w, "w", k.ref, {sh.G, sh.R});
  const std::vector<int64_t> feat_sizes{sh.G, sh.R, sh.C};
  if (given(grad_mu)) {
    check_feature(*grad_mu, "grad_mu", k.ref, feat_sizes);
    check_writable(*grad_mu, "grad_mu", op);
  }
  if (given(grad_logvar)) {
    check_feature(*grad_logvar, "grad_logvar", k.ref, feat_sizes);
    check_writable(*grad_logvar, "grad_logvar", op);
  }
  if (given(stats)) check_acc(*stats, "stats", k.ref, {3, sh.J, sh.C});

  const c10::cuda::CUDAGuard guard(k.ref.device);
  const gpu::DType dtype = kernel_dtype(mu, "mu", op);
  const size_t bytes = gpu::gkl_bwd_workspace_bytes(dtype, sh, given(stats));
  const at::Tensor ws = workspace(bytes, k.ref.device);
  gpu::StridedTensor3 gmu{};
  gpu::StridedTensor3 glv{};
  if (given(grad_mu)) gmu = describe_output(*grad_mu);
  if (given(grad_logvar)) glv = describe_output(*grad_logvar);
  const gpu::RowWeights wd{w.const_data_ptr(), w.stride(0), w.stride(1)};
  C10_CUDA_CHECK(gpu::launch_gkl_bwd(
      dtype, sh, describe_input(mu), describe_input(logvar),
      given(present) ? mask_ptr(*present) : nullptr, nu.const_data_ptr(),
      logtau2.const_data_ptr(), have_resp ? resp->const_data_ptr() : nullptr, wd,
      given(grad_mu) ? &gmu : nullptr, given(grad_logvar) ? &glv : nullptr,
      given(stats) ? stats->mutable_data_ptr() : nullptr, ws_ptr(ws), bytes,
      current_stream(k.ref.device)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medmap_fast_cuda, m) {
  m.def(
      "anchor_fwd(Tensor[] feats, Tensor coef, Tensor present, Tensor(a!) sq, "
      "Tensor(b!)? anchor) -> ()");
  m.def(
      "anchor_bwd(Tensor[] feats, Tensor coef, Tensor present, Tensor G, bool detach, "
      "Tensor(a!)[] grad_feats, Tensor(b!)? grad_coef) -> ()");
  m.def(
      "moments_fwd(Tensor[] feats, Tensor? coef, Tensor present, Tensor(a!) mean, "
      "Tensor(b!) m2) -> ()");
  m.def(
      "moments_bwd(Tensor[] feats, Tensor? coef, Tensor present, Tensor mean, Tensor alpha, "
      "Tensor beta, Tensor(a!)[] grad_feats, Tensor(b!)? grad_coef) -> ()");
  m.def(
      "gkl_fwd(Tensor mu, Tensor logvar, Tensor? present, Tensor nu, Tensor logtau2, "
      "Tensor logpi, Tensor(a!) loss, Tensor(b!)? resp) -> ()");
  m.def(
      "gkl_bwd(Tensor mu, Tensor logvar, Tensor? present, Tensor nu, Tensor logtau2, "
      "Tensor? resp, Tensor w, Tensor(a!)? grad_mu, Tensor(b!)? grad_logvar, "
      "Tensor(c!)? stats) -> ()");
}

TORCH_LIBRARY_IMPL(medmap_fast_cuda, CUDA, m) {
  m.impl("anchor_fwd", &anchor_fwd_cuda);
  m.impl("anchor_bwd", &anchor_bwd_cuda);
  m.impl("moments_fwd", &moments_fwd_cuda);
  m.impl("moments_bwd", &moments_bwd_cuda);
  m.impl("gkl_fwd", &gkl_fwd_cuda);
  m.impl("gkl_bwd", &gkl_bwd_cuda);
}
