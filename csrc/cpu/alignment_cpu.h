#pragma once

// CPU kernels of the MedMAP alignment ops (anchor alignment, moment matching,
// Gaussian KL to an anchor). This header is the contract every backend
// (cpu, cuda, triton) implements with the same names, arguments and results.
//
// Conventions shared by every kernel here:
//  * Feature-like tensors are 3-D (B, C, S) views with arbitrary strides
//    (NCS, channels-last, or a channel slice of a wider tensor); all the
//    modalities of one call share one set of strides. Outputs of that shape
//    are written through their own strides. Their dtype is float32, float16,
//    bfloat16 or float64 (one dtype per call).
//  * "acc" is the accumulation dtype: float64 for float64 features, float32
//    otherwise. Every small tensor (coef, sums, moments, per-row losses...)
//    is contiguous in the acc dtype. Arithmetic is done in acc; low-precision
//    values are converted on load and rounded once on store.
//  * present is a contiguous (B, M) bool tensor. A modality absent for a
//    sample is never read for that sample (it may hold NaN or garbage) and
//    gets exact zeros in every output that belongs to it.
//  * a[b,c,s] = sum over present k, in ascending k, of coef[b,k,c] * f_k[b,c,s]
//    is the per-sample anchor; coef (B, M, C) is 0 for missing modalities.
//  * Reductions are deterministic: the result must not depend on the number
//    of threads or on scheduling (fixed chunking and a fixed combine order,
//    no atomics on floats), so two runs give bitwise-equal results.
//  * Empty extents (B, C or S = 0) are legal: sums are 0, nothing is read.
//    Means over S = 0 voxels are undefined: the ops refuse such features
//    before any kernel runs, so the 0 a kernel leaves there is never used.

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace medmap_fast::cpu {

// ---- anchor alignment (SPEC section 2) -------------------------------------

// sq[b,k,c] = present[b,k] ? sum_s (f_k[b,c,s] - a[b,c,s])^2 : 0.
// When anchor is given ((B, C, S), features' dtype) it receives a.
void anchor_fwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& sq,
    const std::optional<at::Tensor>& anchor);

// Gradient of L = sum_{b,k,c} G[b,k,c] * sq[b,k,c], with r_k = f_k - a:
//   da          = detach ? 0 : -2 * sum_{present k} G[b,k,c] * r_k[b,c,s]
//   grad_f_k    = present ? 2 * G[b,k,c] * r_k + coef[b,k,c] * da : 0
//   grad_coef   = present ? sum_s f_k[b,c,s] * da[b,c,s] : 0   (when given)
// G is (B, M, C) acc; grad_feats are (B, C, S) in the features' dtype.
void anchor_bwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& G,
    bool detach,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef);

// ---- moment matching (SPEC section 4) --------------------------------------

// With A = (coef given ? 1 : 0), mean and m2 are (B, M + A, C) acc:
//   k < M:  mean = present ? (1/S) sum_s f_k : 0,  m2 = present ? sum_s (f_k - mean)^2 : 0
//   k == M: the same moments of the anchor a (all 0 when no modality is present).
// m2 must be accurate for data with a large offset (e.g. 100 + randn):
// two-pass or per-chunk (mean, m2) merged with Chan's formula, never
// sum(x^2) - S * mean^2.
void moments_fwd(
    at::TensorList feats,
    const std::optional<at::Tensor>& coef,
    const at::Tensor& present,
    const at::Tensor& mean,
    const at::Tensor& m2);

// Gradient given per-(b, k, c) coefficients alpha, beta (B, M + A, C) acc and
// the forward's mean:
//   da          = alpha[b,M,c] + beta[b,M,c] * (a - mean[b,M,c])     (A == 1 only)
//   grad_f_k    = present ? alpha[b,k,c] + beta[b,k,c] * (f_k - mean[b,k,c])
//                           + (A ? coef[b,k,c] * da : 0) : 0
//   grad_coef   = present ? sum_s f_k * da : 0    (when given; requires coef)
void moments_bwd(
    at::TensorList feats,
    const std::optional<at::Tensor>& coef,
    const at::Tensor& present,
    const at::Tensor& mean,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef);

// ---- Gaussian KL to a (mixture) anchor (SPEC section 3) --------------------
// Rows are (g, r) pairs of (G, R, C) views mu and logvar with arbitrary
// strides (logvar's may be 0: a broadcast constant); present is (G,) bool or
// absent (every row kept). nu and logtau2 are (J, C) acc, logpi (J,) acc with
// logsumexp(logpi) = 0. For a kept row, with var = exp(logvar):
//   KL_j   = 0.5 * sum_c [ (var_c + (mu_c - nu_jc)^2) * exp(-logtau2_jc)
//                          - 1 - logvar_c + logtau2_jc ]
//   z_j    = logpi_j - KL_j
//   loss   = -logsumexp_j z_j            (stable: max-shifted)
//   resp_j = softmax_j z_j
// Dropped rows get loss 0 and resp 0. NaN/inf in a kept row propagate into
// that row's loss (never silently dropped by the max shift).
// loss is (G, R) acc; resp, when given, (G, R, J) acc.
void gkl_fwd(
    const at::Tensor& mu,
    const at::Tensor& logvar,
    const std::optional<at::Tensor>& present,
    const at::Tensor& nu,
    const at::Tensor& logtau2,
    const at::Tensor& logpi,
    const at::Tensor& loss,
    const std::optional<at::Tensor>& resp);

// Gradient of L = sum over kept rows of w[g,r] * loss[g,r]; w is (G, R) acc
// with arbitrary strides (0 for a broadcast scalar). resp absent means J == 1
// (resp = 1). With A_c = sum_j resp_j exp(-logtau2_jc) and
// B_c = sum_j resp_j nu_jc exp(-logtau2_jc):
//   grad_mu[g,r,c]     = w * (mu_c * A_c - B_c)
//   grad_logvar[g,r,c] = w * 0.5 * (var_c * A_c - 1)
// (0 for dropped rows; each written only when given, mu's dtype, any strides)
// and, when stats (3, J, C) acc is given, sums over kept rows:
//   stats[0,j,c] = sum w * resp_j                    (the same for every c)
//   stats[1,j,c] = sum w * resp_j * (mu_c - nu_jc)
//   stats[2,j,c] = sum w * resp_j * ((mu_c - nu_jc)^2 + var_c)
void gkl_bwd(
    const at::Tensor& mu,
    const at::Tensor& logvar,
    const std::optional<at::Tensor>& present,
    const at::Tensor& nu,
    const at::Tensor& logtau2,
    const std::optional<at::Tensor>& resp,
    const at::Tensor& w,
    const std::optional<at::Tensor>& grad_mu,
    const std::optional<at::Tensor>& grad_logvar,
    const std::optional<at::Tensor>& stats);

} // namespace medmap_fast::cpu
