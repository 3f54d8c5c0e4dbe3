#pragma once

// CPU kernels for modality fusion under a per-sample presence mask.
//
// All feature-like tensors are 3-D (B, C, S) with arbitrary strides; the
// kernels write outputs through their strides so callers may pass views into
// larger buffers. A modality that is absent for a sample is never read for
// that sample, so it may hold uninitialised memory.

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace medmap_fast::cpu {

// out[b,c,s] = sum over present k (ascending) of coef[b,k,c] * feats[k][b,c,s],
// accumulated in float (double for float64) and rounded once. The coef of an
// absent modality is not used either (it may be NaN, e.g. a weight computed
// from that modality's garbage features): it must not turn the sum into NaN.
void fuse_sum_fwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& out);

// grad_feats[k][b,c,s] = present[b,k] ? coef[b,k,c] * grad[b,c,s] : 0.
// When grad_coef is given:
//   grad_coef[b,k,c] = present[b,k] ? sum_s feats[k][b,c,s] * grad[b,c,s] : 0,
// reduced with a fixed, thread-count independent order. Without grad_coef,
// feats is not touched at all.
void fuse_sum_bwd(
    const at::Tensor& grad,
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef);

// dst[k][b,c,s] = present[b,k] ? src[k][b,c,s] : 0.
void masked_copy(
    at::TensorList src,
    const at::Tensor& present,
    at::TensorList dst);

// Calls that write at least this many bytes in total use non-temporal
// (cache-bypassing) stores on x86: their output would not stay in cache
// anyway, and streaming avoids reading every destination line before
// overwriting it. Values are identical either way. A negative value restores
// the default (16 MiB); 0 streams everything, which tests use to cover
// that path on small tensors.
int64_t nontemporal_min_bytes();
void set_nontemporal_min_bytes(int64_t bytes);

} // namespace medmap_fast::cpu
