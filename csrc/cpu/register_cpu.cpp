// Schemas of the medmap_fast_C operator library and their CPU kernels.
// The schemas are defined once here; device backends only add
// TORCH_LIBRARY_IMPL blocks for their dispatch key in their own files.

#include <torch/library.h>

#include "alignment_cpu.h"
#include "masked_fusion_cpu.h"
#include "norm_act_cpu.h"

TORCH_LIBRARY(medmap_fast_C, m) {
  m.def(
      "fuse_sum_fwd(Tensor[] feats, Tensor coef, Tensor present, "
      "Tensor(a!) out) -> ()");
  m.def(
      "fuse_sum_bwd(Tensor grad, Tensor[] feats, Tensor coef, Tensor present, "
      "Tensor(a!)[] grad_feats, Tensor(b!)? grad_coef) -> ()");
  m.def("masked_copy(Tensor[] src, Tensor present, Tensor(a!)[] dst) -> ()");
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
  m.def(
      "norm_act_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
      "Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd, int groups, float slope, "
      "int residual_mode, float eps) -> ()");
  m.def(
      "norm_act_bwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
      "Tensor dy, Tensor mean, Tensor rstd, Tensor(a!) dx, Tensor(b!)? dres, "
      "Tensor(c!) dweight, Tensor(d!) dbias, int groups, float slope, "
      "int residual_mode) -> ()");
}

TORCH_LIBRARY_IMPL(medmap_fast_C, CPU, m) {
  m.impl("fuse_sum_fwd", &medmap_fast::cpu::fuse_sum_fwd);
  m.impl("fuse_sum_bwd", &medmap_fast::cpu::fuse_sum_bwd);
  m.impl("masked_copy", &medmap_fast::cpu::masked_copy);
  m.impl("anchor_fwd", &medmap_fast::cpu::anchor_fwd);
  m.impl("anchor_bwd", &medmap_fast::cpu::anchor_bwd);
  m.impl("moments_fwd", &medmap_fast::cpu::moments_fwd);
  m.impl("moments_bwd", &medmap_fast::cpu::moments_bwd);
  m.impl("gkl_fwd", &medmap_fast::cpu::gkl_fwd);
  m.impl("gkl_bwd", &medmap_fast::cpu::gkl_bwd);
  m.impl("norm_act_fwd", &medmap_fast::cpu::norm_act_fwd);
  m.impl("norm_act_bwd", &medmap_fast::cpu::norm_act_bwd);
}
