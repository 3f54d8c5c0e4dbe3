#pragma once

// CPU kernels of the fused normalisation + activation (+ residual) op
// (SPEC section 5). This header is the contract every backend (cpu, cuda,
// triton) implements with the same names, arguments and results.
//
// Conventions:
//  * x, residual, dy and the outputs y, dx, dres are 3-D (B, C, S) views
//    (S = flattened voxels) with arbitrary strides; NCS (voxels innermost)
//    and channels-last (channels innermost) are the fast cases. The inputs
//    of one call share one dtype: float32, float16, bfloat16 or float64.
//    Outputs are written through their own strides.
//  * "acc" is float64 for float64 data, float32 otherwise. weight, bias,
//    mean, rstd, dweight, dbias are contiguous in acc. Arithmetic is in acc;
//    low-precision values are converted on load and rounded once on store.
//  * groups G divides C; group g of sample b holds channels
//    [g*C/G, (g+1)*C/G) over all S voxels (instance norm: G = C).
//    B >= 1, C >= 1, S >= 1 (the Python layer handles empty batches).
//  * Statistics must stay accurate for data far from zero (100 + 50 randn):
//    never E[x^2] - E[x]^2; two passes, or per-chunk two-pass moments merged
//    with Chan's formula.
//  * Reductions are deterministic: fixed chunking that depends on shapes
//    only and a fixed combine order; no float atomics. Two runs, whatever
//    the thread count, give bitwise-equal results.
//  * The activation is a leaky ReLU with slope `slope`: act(z) = z > 0 ? z :
//    slope * z, act'(z) = z > 0 ? 1 : slope (ReLU is slope 0, identity
//    slope 1). residual_mode: 0 none, 1 residual added before the
//    activation, 2 residual added after it.

#include <optional>

#include <ATen/core/Tensor.h>

namespace medmap_fast::cpu {

// mean[b,g], var[b,g]: mean and population variance over group (b, g);
// rstd[b,g] = 1 / sqrt(var + eps).
// xhat = (x - mean[b,g]) * rstd[b,g];  z = xhat * weight[c] + bias[c]
// mode 0: y = act(z);  mode 1: y = act(z + residual);  mode 2: y = act(z) + residual.
// residual is given iff mode != 0.
void norm_act_fwd(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& y,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    int64_t groups,
    double slope,
    int64_t residual_mode,
    double eps);

// Backward from the saved input and statistics (the activation is
// recomputed, never saved):
//   z' = z (+ residual in mode 1);  g = dy * act'(z')
//   dbias[c]   = sum over b, s of g
//   dweight[c] = sum over b, s of g * xhat
//   m1[b,g] = mean over the group of g * weight[c]
//   m2[b,g] = mean over the group of g * weight[c] * xhat
//   dx = rstd[b,g] * (g * weight[c] - m1[b,g] - xhat * m2[b,g])
//   dres = g (only in mode 1, and only when dres is given; in mode 2 the
//   residual's gradient is dy itself and the caller takes it from there).
// residual is given iff mode == 1 (mode 2 does not need it).
void norm_act_bwd(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& dy,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& dx,
    const std::optional<at::Tensor>& dres,
    const at::Tensor& dweight,
    const at::Tensor& dbias,
    int64_t groups,
    double slope,
    int64_t residual_mode);

}  // namespace medmap_fast::cpu
