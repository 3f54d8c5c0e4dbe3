// Schemas of the medmap_fast_C operator library and their CPU kernels.
// The schemas are defined once here; device backends only add
// TORCH_LIBRARY_IMPL blocks for their dispatch key in their own files.

#include <torch/library.h>

#include "masked_fusion_cpu.h"

TORCH_LIBRARY(medmap_fast_C, m) {
  m.def(
      "fuse_sum_fwd(Tensor[] feats, Tensor coef, Tensor present, "
      "Tensor(a!) out) -> ()");
  m.def(
      "fuse_sum_bwd(Tensor grad, Tensor[] feats, Tensor coef, Tensor present, "
      "Tensor(a!)[] grad_feats, Tensor(b!)? grad_coef) -> ()");
  m.def("masked_copy(Tensor[] src, Tensor present, Tensor(a!)[] dst) -> ()");
}

TORCH_LIBRARY_IMPL(medmap_fast_C, CPU, m) {
  m.impl("fuse_sum_fwd", &medmap_fast::cpu::fuse_sum_fwd);
  m.impl("fuse_sum_bwd", &medmap_fast::cpu::fuse_sum_bwd);
  m.impl("masked_copy", &medmap_fast::cpu::masked_copy);
}
