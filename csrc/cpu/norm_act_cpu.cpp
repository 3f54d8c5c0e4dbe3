#include "norm_act_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "alignment_simd.h"
#include "cpu_common.h"
#include "masked_fusion_cpu.h"

namespace medmap_fast::cpu {

namespace {

using namespace common;

// ---------------------------------------------------------------------------
// Work decomposition.
//
// Every pass walks the data in chunks whose extent depends only on the shape.
// A chunk's partial results (moments in the forward, gradient sums in the
// backward) go to their own slot, and slots are combined per group in a fixed
// order, so the results are bitwise identical for any thread count and for
// either of the two schedules below (which only change when a chunk is
// visited, never what it computes):
//
//  * group tasks (NCS): one task runs both passes over one (b, g) group, so
//    that the second pass finds the group in cache instead of DRAM;
//  * phases: the first pass over all chunks, then the per-group
//    combination, then the second pass; used for channels-last data, whose
//    groups interleave in memory, and for groups too large to stay cached or
//    too few to keep every thread busy.
//
// Two tilings:
//  * NCS (voxels unit stride, and the fallback for arbitrary strides): a chunk
//    is kNcsChunk voxels of one (b, c); every element of it shares one
//    channel, and its sums go into kNcsLanes lanes.
//  * channels-last (channels unit stride): a chunk is a block of voxel rows
//    of one sample, about kClChunk elements; element i of a chunk is channel
//    i % C, so a run of L = R * C lanes keeps every channel apart and the
//    loops stay flat and vectorisable for any C.
//
// Within a chunk, element i adds into lane i % L, so no loop reassociates a
// sum; lanes fold in a fixed tree order.
constexpr int64_t kNcsChunk = 2048;
constexpr int64_t kNcsLanes = 64;
constexpr int64_t kClChunk = 4096;
constexpr int64_t kLaneTarget = 256;
// Group tasks are used while a group's inputs fit comfortably in the shared
// L3 next to the other threads' groups.
constexpr int64_t kGroupTaskBytes = int64_t(4) << 20;
// Work per thread below which spreading a loop over threads costs more than
// it saves.
constexpr int64_t kGrainElems = 32768;

struct Geo {
  bool cl;
  int64_t B, C, S, G, cg;
  int64_t P;     // lane period: 1 (NCS) or C (channels-last)
  int64_t R;     // lane rows, a power of two
  int64_t L;     // lanes, R * P
  int64_t step;  // voxels per chunk
  int64_t nch;   // chunks along S
  int64_t maxn;  // elements of the largest chunk

  int64_t voxels(int64_t j) const {
    return std::min(step, S - j * step);
  }
  // Chunks of one sample: (c, j) in NCS, j in channels-last.
  int64_t per_sample() const {
    return cl ? nch : C * nch;
  }
  // Partial-result slot of channel c in chunk j of sample b.
  int64_t slot(int64_t b, int64_t c, int64_t j) const {
    return cl ? (b * nch + j) * C + c : (b * C + c) * nch + j;
  }
};

Geo make_geo(bool cl, int64_t B, int64_t C, int64_t S, int64_t G) {
  Geo g{};
  g.cl = cl;
  g.B = B;
  g.C = C;
  g.S = S;
  g.G = G;
  g.cg = C / G;
  if (!cl) {
    g.P = 1;
    g.R = kNcsLanes;
    g.step = std::min(S, kNcsChunk);
  } else {
    g.P = C;
    g.step = std::min(S, std::max<int64_t>(1, kClChunk / C));
    g.R = std::min(pow2_ceil(divup(kLaneTarget, C)), pow2_floor(g.step));
  }
  g.L = g.R * g.P;
  g.nch = divup(S, g.step);
  g.maxn = g.step * g.P;
  return g;
}

// ---------------------------------------------------------------------------
// Argument checks

// An output must not write one element twice, nor partly alias an input
// (full aliasing is fine: every element is read before it is written).
void check_out(
    const char* op,
    const char* name,
    const at::Tensor& out,
    std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(
      at::has_internal_overlap(out) != at::MemOverlap::Yes,
      op, ": ", name, " must not have overlapping elements");
  for (const at::Tensor* in : inputs) {
    if (in != nullptr) {
      TORCH_CHECK(
          at::get_overlap_status(out, *in) != at::MemOverlapStatus::Partial,
          op, ": ", name, " partially overlaps one of the inputs");
    }
  }
}

bool overlaps_any(const at::Tensor& out, std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* in : inputs) {
    if (in != nullptr && at::get_overlap_status(out, *in) != at::MemOverlapStatus::No) {
      return true;
    }
  }
  return false;
}

struct Shape {
  int64_t B, C, S, G;
  at::ScalarType dtype, acc;
};

Shape check_x(const char* op, const at::Tensor& x, int64_t groups, int64_t mode) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(
      x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(
      x.dim() == 3, op, ": x must be 3-D (B, C, S), got shape ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kHalf ||
          dt == at::kBFloat16,
      op, ": x must be float32, float64, float16 or bfloat16, got ", dt);
  const int64_t C = x.size(1);
  const int64_t S = x.size(2);
  TORCH_CHECK(C >= 1, op, ": x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK(S >= 1, op, ": x must have at least one voxel, got shape ", x.sizes());
  TORCH_CHECK(groups >= 1, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(
      C % groups == 0, op, ": groups (", groups, ") must divide the ", C,
      " channels");
  TORCH_CHECK(
      mode >= 0 && mode <= 2, op, ": residual_mode must be 0, 1 or 2, got ",
      mode);
  return {x.size(0), C, S, groups, dt, acc_dtype(dt)};
}

// The parameters both directions take, checked in the same order.
void check_affine(
    const char* op,
    const Shape& d,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& residual) {
  check_small(op, "weight", weight, d.acc, {d.C});
  check_small(op, "bias", bias, d.acc, {d.C});
  if (given(residual)) {
    check_tensor(op, "residual", *residual, d.dtype, x.sizes());
  }
}

void check_stats(
    const char* op,
    const Shape& d,
    const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_small(op, "mean", mean, d.acc, {d.B, d.G});
  check_small(op, "rstd", rstd, d.acc, {d.B, d.G});
}

// ---------------------------------------------------------------------------
// Tiling choice

// Channels-last tiling when every tensor has unit channel stride and not all
// of them have unit voxel stride; NCS (with strided gathers where needed)
// otherwise.
bool choose_cl(std::initializer_list<const at::Tensor*> ts) {
  bool s_in = true;
  bool c_in = true;
  for (const at::Tensor* t : ts) {
    if (t != nullptr) {
      s_in = s_in && unit_s(*t);
      c_in = c_in && unit_c(*t);
    }
  }
  return !s_in && c_in;
}

// ---------------------------------------------------------------------------
// Vector code. Everything with a target attribute runs only after
// simd::avx2_available() said yes (MEDMAP_FAST_CPU_NO_AVX2 forces the
// portable loops). The AVX2 loops use FMA where the portable ones round the
// product first, so the two may differ in the last bits; each on its own is
// deterministic.

#if MEDMAP_FAST_HAVE_AVX2_PATH
#define MEDMAP_FAST_NA_F16C __attribute__((target("avx2,fma,f16c")))

bool f16c_available() {
  static const bool has = __builtin_cpu_supports("f16c");
  return has;
}

// Lanes j < m of a vector (for the ragged end of a lane window).
MEDMAP_FAST_AVX2 inline __m256i head_mask(int64_t m) {
  return _mm256_cmpgt_epi32(
      _mm256_set1_epi32(static_cast<int>(m)),
      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

MEDMAP_FAST_NA_F16C void half_to_float_avx2(const c10::Half* s, int64_t n, float* d) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(
        d + i,
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i))));
  }
  // The tail goes through the same instruction so that every element
  // converts identically.
  if (i < n) {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, u + i, (n - i) * sizeof(uint16_t));
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp))));
    std::memcpy(d + i, out, (n - i) * sizeof(float));
  }
}

MEDMAP_FAST_NA_F16C void float_to_half_avx2(const float* s, int64_t n, c10::Half* d) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(u + i),
        _mm256_cvtps_ph(_mm256_loadu_ps(s + i), kRound));
  }
  if (i < n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, s + i, (n - i) * sizeof(float));
    alignas(16) uint16_t out[8];
    _mm_store_si128(
        reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(_mm256_load_ps(tmp), kRound));
    std::memcpy(u + i, out, (n - i) * sizeof(uint16_t));
  }
}

MEDMAP_FAST_AVX2 void bf16_to_float_avx2(const c10::BFloat16* s, int64_t n, float* d) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) {
    d[i] = static_cast<float>(s[i]);  // exact, like the vector version
  }
}

// Round to nearest even, NaN to the canonical 0x7fc0: what c10::BFloat16
// does, so the scalar tail agrees bit for bit.
MEDMAP_FAST_AVX2 void float_to_bf16_avx2(const float* s, int64_t n, c10::BFloat16* d) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i half_ulp = _mm256_set1_epi32(0x7fff);
  const __m256i qnan = _mm256_set1_epi32(0x7fc0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_loadu_ps(s + i);
    const __m256i b = _mm256_castps_si256(f);
    const __m256i bias =
        _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), one), half_ulp);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
    r = _mm256_blendv_epi8(
        r, qnan, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    // Values are below 2^16, so the saturating pack is exact; it packs
    // within 128-bit halves, hence the qword shuffle.
    const __m256i packed =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(u + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) {
    d[i] = c10::BFloat16(s[i]);
  }
}

MEDMAP_FAST_AVX2 void sum_lanes_avx2(int64_t n, int64_t L, float* lane, const float* x) {
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int64_t m = std::min(L, n - i0);
    const float* xi = x + i0;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      _mm256_storeu_ps(
          lane + j, _mm256_add_ps(_mm256_loadu_ps(lane + j), _mm256_loadu_ps(xi + j)));
    }
    if (j < m) {
      const __m256i k = head_mask(m - j);
      _mm256_maskstore_ps(
          lane + j, k,
          _mm256_add_ps(_mm256_maskload_ps(lane + j, k), _mm256_maskload_ps(xi + j, k)));
    }
  }
}

// Coefficient vector j of a lane-expanded array; in NCS chunks every lane
// holds the same value, which then stays in a register (same values, so the
// same results either way).
template <bool Bcast>
MEDMAP_FAST_AVX2 inline __m256 coef(const float* p, int64_t j, __m256 all) {
  if constexpr (Bcast) {
    return all;
  } else {
    return _mm256_loadu_ps(p + j);
  }
}

template <bool Bcast>
MEDMAP_FAST_AVX2 inline __m256 coef(const float* p, int64_t j, __m256i k, __m256 all) {
  if constexpr (Bcast) {
    return all;
  } else {
    return _mm256_maskload_ps(p + j, k);
  }
}

template <bool Bcast>
MEDMAP_FAST_AVX2 void dev_lanes_avx2(
    int64_t n, int64_t L, float* lane, const float* x, const float* mu) {
  const __m256 vmu = _mm256_set1_ps(mu[0]);
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int64_t m = std::min(L, n - i0);
    const float* xi = x + i0;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xi + j), coef<Bcast>(mu, j, vmu));
      _mm256_storeu_ps(lane + j, _mm256_fmadd_ps(d, d, _mm256_loadu_ps(lane + j)));
    }
    if (j < m) {
      const __m256i k = head_mask(m - j);
      const __m256 d =
          _mm256_sub_ps(_mm256_maskload_ps(xi + j, k), coef<Bcast>(mu, j, k, vmu));
      _mm256_maskstore_ps(lane + j, k, _mm256_fmadd_ps(d, d, _mm256_maskload_ps(lane + j, k)));
    }
  }
}

// z = (x - mu) * a + b (+ r in mode 1); y = act(z) (+ r in mode 2).
template <int Mode>
MEDMAP_FAST_AVX2 inline __m256 fwd_vec(
    __m256 x, __m256 r, __m256 mu, __m256 a, __m256 b, __m256 slope) {
  __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(x, mu), a, b);
  if constexpr (Mode == 1) {
    z = _mm256_add_ps(z, r);
  }
  const __m256 pos = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
  __m256 y = _mm256_blendv_ps(_mm256_mul_ps(z, slope), z, pos);
  if constexpr (Mode == 2) {
    y = _mm256_add_ps(y, r);
  }
  return y;
}

template <int Mode, bool Bcast>
MEDMAP_FAST_AVX2 void fwd_out_avx2(
    int64_t n, int64_t L, float* y, const float* x, const float* r,
    const float* mu, const float* a, const float* b, float slope) {
  const __m256 vs = _mm256_set1_ps(slope);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 vmu = _mm256_set1_ps(mu[0]);
  const __m256 va = _mm256_set1_ps(a[0]);
  const __m256 vb = _mm256_set1_ps(b[0]);
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int64_t m = std::min(L, n - i0);
    const float* xi = x + i0;
    const float* ri = Mode != 0 ? r + i0 : nullptr;
    float* yi = y + i0;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      const __m256 rv = Mode != 0 ? _mm256_loadu_ps(ri + j) : zero;
      _mm256_storeu_ps(
          yi + j,
          fwd_vec<Mode>(
              _mm256_loadu_ps(xi + j), rv, coef<Bcast>(mu, j, vmu),
              coef<Bcast>(a, j, va), coef<Bcast>(b, j, vb), vs));
    }
    if (j < m) {
      const __m256i k = head_mask(m - j);
      const __m256 rv = Mode != 0 ? _mm256_maskload_ps(ri + j, k) : zero;
      _mm256_maskstore_ps(
          yi + j, k,
          fwd_vec<Mode>(
              _mm256_maskload_ps(xi + j, k), rv, coef<Bcast>(mu, j, k, vmu),
              coef<Bcast>(a, j, k, va), coef<Bcast>(b, j, k, vb), vs));
    }
  }
}

// g = dy * act'(z') and d = x - mu, with z' recomputed exactly as forward.
template <bool ResIn>
MEDMAP_FAST_AVX2 inline __m256 grad_vec(
    __m256 x, __m256 r, __m256 dy, __m256 mu, __m256 a, __m256 b, __m256 slope,
    __m256* d) {
  *d = _mm256_sub_ps(x, mu);
  __m256 z = _mm256_fmadd_ps(*d, a, b);
  if constexpr (ResIn) {
    z = _mm256_add_ps(z, r);
  }
  const __m256 pos = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
  return _mm256_blendv_ps(_mm256_mul_ps(dy, slope), dy, pos);
}

template <bool ResIn, bool Bcast>
MEDMAP_FAST_AVX2 void bwd_sums_avx2(
    int64_t n, int64_t L, float* lg, float* lgd, const float* x, const float* r,
    const float* dy, const float* mu, const float* a, const float* b, float slope) {
  const __m256 vs = _mm256_set1_ps(slope);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 vmu = _mm256_set1_ps(mu[0]);
  const __m256 va = _mm256_set1_ps(a[0]);
  const __m256 vb = _mm256_set1_ps(b[0]);
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int64_t m = std::min(L, n - i0);
    const float* xi = x + i0;
    const float* ri = ResIn ? r + i0 : nullptr;
    const float* gi = dy + i0;
    int64_t j = 0;
    __m256 d;
    for (; j + 8 <= m; j += 8) {
      const __m256 rv = ResIn ? _mm256_loadu_ps(ri + j) : zero;
      const __m256 g = grad_vec<ResIn>(
          _mm256_loadu_ps(xi + j), rv, _mm256_loadu_ps(gi + j),
          coef<Bcast>(mu, j, vmu), coef<Bcast>(a, j, va), coef<Bcast>(b, j, vb), vs, &d);
      _mm256_storeu_ps(lg + j, _mm256_add_ps(_mm256_loadu_ps(lg + j), g));
      _mm256_storeu_ps(lgd + j, _mm256_fmadd_ps(g, d, _mm256_loadu_ps(lgd + j)));
    }
    if (j < m) {
      const __m256i k = head_mask(m - j);
      const __m256 rv = ResIn ? _mm256_maskload_ps(ri + j, k) : zero;
      const __m256 g = grad_vec<ResIn>(
          _mm256_maskload_ps(xi + j, k), rv, _mm256_maskload_ps(gi + j, k),
          coef<Bcast>(mu, j, k, vmu), coef<Bcast>(a, j, k, va), coef<Bcast>(b, j, k, vb),
          vs, &d);
      _mm256_maskstore_ps(lg + j, k, _mm256_add_ps(_mm256_maskload_ps(lg + j, k), g));
      _mm256_maskstore_ps(
          lgd + j, k, _mm256_fmadd_ps(g, d, _mm256_maskload_ps(lgd + j, k)));
    }
  }
}

// dx = g * k1 + (d * k2 + k3), dres = g.
template <bool ResIn, bool Dres, bool Bcast>
MEDMAP_FAST_AVX2 void bwd_out_avx2(
    int64_t n, int64_t L, float* dx, float* dres, const float* x, const float* r,
    const float* dy, const float* mu, const float* a, const float* b,
    const float* k1, const float* k2, const float* k3, float slope) {
  const __m256 vs = _mm256_set1_ps(slope);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 vmu = _mm256_set1_ps(mu[0]);
  const __m256 va = _mm256_set1_ps(a[0]);
  const __m256 vb = _mm256_set1_ps(b[0]);
  const __m256 v1 = _mm256_set1_ps(k1[0]);
  const __m256 v2 = _mm256_set1_ps(k2[0]);
  const __m256 v3 = _mm256_set1_ps(k3[0]);
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int64_t m = std::min(L, n - i0);
    const float* xi = x + i0;
    const float* ri = ResIn ? r + i0 : nullptr;
    const float* gi = dy + i0;
    float* oi = dx + i0;
    float* qi = Dres ? dres + i0 : nullptr;
    int64_t j = 0;
    __m256 d;
    for (; j + 8 <= m; j += 8) {
      const __m256 rv = ResIn ? _mm256_loadu_ps(ri + j) : zero;
      const __m256 g = grad_vec<ResIn>(
          _mm256_loadu_ps(xi + j), rv, _mm256_loadu_ps(gi + j),
          coef<Bcast>(mu, j, vmu), coef<Bcast>(a, j, va), coef<Bcast>(b, j, vb), vs, &d);
      const __m256 t = _mm256_fmadd_ps(d, coef<Bcast>(k2, j, v2), coef<Bcast>(k3, j, v3));
      _mm256_storeu_ps(oi + j, _mm256_fmadd_ps(g, coef<Bcast>(k1, j, v1), t));
      if constexpr (Dres) {
        _mm256_storeu_ps(qi + j, g);
      }
    }
    if (j < m) {
      const __m256i k = head_mask(m - j);
      const __m256 rv = ResIn ? _mm256_maskload_ps(ri + j, k) : zero;
      const __m256 g = grad_vec<ResIn>(
          _mm256_maskload_ps(xi + j, k), rv, _mm256_maskload_ps(gi + j, k),
          coef<Bcast>(mu, j, k, vmu), coef<Bcast>(a, j, k, va), coef<Bcast>(b, j, k, vb),
          vs, &d);
      const __m256 t =
          _mm256_fmadd_ps(d, coef<Bcast>(k2, j, k, v2), coef<Bcast>(k3, j, k, v3));
      _mm256_maskstore_ps(oi + j, k, _mm256_fmadd_ps(g, coef<Bcast>(k1, j, k, v1), t));
      if constexpr (Dres) {
        _mm256_maskstore_ps(qi + j, k, g);
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------
// Portable loops (float64, and float32 without AVX2). One lane window per
// call, __restrict__ parameters so that gcc vectorises without alias checks.

// z > 0 ? a : b (false for NaN), from integer operations on the bits: gcc
// does not if-convert a floating-point compare under the default
// -ftrapping-math, which left these loops scalar. Positive floats other than
// NaN are exactly the bit patterns in [1, +inf].
template <typename A>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kInf = 0x7f800000u;
};
template <>
struct Bits<double> {
  using U = uint64_t;
  static constexpr U kInf = 0x7ff0000000000000ull;
};

template <typename A>
C10_ALWAYS_INLINE A pick_positive(A z, A a, A b) {
  using U = typename Bits<A>::U;
  U uz, ua, ub;
  std::memcpy(&uz, &z, sizeof(U));
  std::memcpy(&ua, &a, sizeof(U));
  std::memcpy(&ub, &b, sizeof(U));
  const U m = U(0) - static_cast<U>(uz - 1 < Bits<A>::kInf);
  const U r = (ua & m) | (ub & ~m);
  A out;
  std::memcpy(&out, &r, sizeof(U));
  return out;
}

template <typename A>
void sum_win(int64_t m, A* __restrict__ lane, const A* __restrict__ x) {
  for (int64_t j = 0; j < m; ++j) {
    lane[j] += x[j];
  }
}

template <typename A>
void dev_win(int64_t m, A* __restrict__ lane, const A* __restrict__ x, const A* __restrict__ mu) {
  for (int64_t j = 0; j < m; ++j) {
    const A d = x[j] - mu[j];
    lane[j] += d * d;
  }
}

template <int Mode, typename A>
void fwd_win(
    int64_t m, A* __restrict__ y, const A* __restrict__ x, const A* __restrict__ r,
    const A* __restrict__ mu, const A* __restrict__ a, const A* __restrict__ b, A slope) {
  for (int64_t j = 0; j < m; ++j) {
    A z = (x[j] - mu[j]) * a[j] + b[j];
    if constexpr (Mode == 1) {
      z += r[j];
    }
    A o = pick_positive(z, z, slope * z);
    if constexpr (Mode == 2) {
      o += r[j];
    }
    y[j] = o;
  }
}

template <bool ResIn, typename A>
void bwd_sums_win(
    int64_t m, A* __restrict__ lg, A* __restrict__ lgd, const A* __restrict__ x,
    const A* __restrict__ r, const A* __restrict__ dy, const A* __restrict__ mu,
    const A* __restrict__ a, const A* __restrict__ b, A slope) {
  for (int64_t j = 0; j < m; ++j) {
    const A d = x[j] - mu[j];
    A z = d * a[j] + b[j];
    if constexpr (ResIn) {
      z += r[j];
    }
    const A g = pick_positive(z, dy[j], slope * dy[j]);
    lg[j] += g;
    lgd[j] += g * d;
  }
}

template <bool ResIn, bool Dres, typename A>
void bwd_out_win(
    int64_t m, A* __restrict__ dx, A* __restrict__ dres, const A* __restrict__ x,
    const A* __restrict__ r, const A* __restrict__ dy, const A* __restrict__ mu,
    const A* __restrict__ a, const A* __restrict__ b, const A* __restrict__ k1,
    const A* __restrict__ k2, const A* __restrict__ k3, A slope) {
  for (int64_t j = 0; j < m; ++j) {
    const A d = x[j] - mu[j];
    A z = d * a[j] + b[j];
    if constexpr (ResIn) {
      z += r[j];
    }
    const A g = pick_positive(z, dy[j], slope * dy[j]);
    dx[j] = g * k1[j] + (d * k2[j] + k3[j]);
    if constexpr (Dres) {
      dres[j] = g;
    }
  }
}

// Chunk-level entry points: the AVX2 loops for float when allowed, the
// portable ones otherwise.
template <typename A>
void sum_lanes(bool vec, int64_t n, int64_t L, A* lane, const A* x) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<A, float>) {
    if (vec) {
      return sum_lanes_avx2(n, L, lane, x);
    }
  }
#endif
  (void)vec;
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    sum_win(std::min(L, n - i0), lane, x + i0);
  }
}

template <typename A>
void dev_lanes(
    bool vec, bool bcast, int64_t n, int64_t L, A* lane, const A* x, const A* mu) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<A, float>) {
    if (vec) {
      return bcast ? dev_lanes_avx2<true>(n, L, lane, x, mu)
                   : dev_lanes_avx2<false>(n, L, lane, x, mu);
    }
  }
#endif
  (void)vec;
  (void)bcast;
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    dev_win(std::min(L, n - i0), lane, x + i0, mu);
  }
}

template <int Mode, typename A>
void fwd_out(
    bool vec, bool bcast, int64_t n, int64_t L, A* y, const A* x, const A* r, const A* mu,
    const A* a, const A* b, A slope) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<A, float>) {
    if (vec) {
      return bcast ? fwd_out_avx2<Mode, true>(n, L, y, x, r, mu, a, b, slope)
                   : fwd_out_avx2<Mode, false>(n, L, y, x, r, mu, a, b, slope);
    }
  }
#endif
  (void)vec;
  (void)bcast;
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    fwd_win<Mode>(
        std::min(L, n - i0), y + i0, x + i0, Mode != 0 ? r + i0 : nullptr, mu, a, b,
        slope);
  }
}

template <bool ResIn, typename A>
void bwd_sums(
    bool vec, bool bcast, int64_t n, int64_t L, A* lg, A* lgd, const A* x, const A* r,
    const A* dy, const A* mu, const A* a, const A* b, A slope) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<A, float>) {
    if (vec) {
      return bcast
          ? bwd_sums_avx2<ResIn, true>(n, L, lg, lgd, x, r, dy, mu, a, b, slope)
          : bwd_sums_avx2<ResIn, false>(n, L, lg, lgd, x, r, dy, mu, a, b, slope);
    }
  }
#endif
  (void)vec;
  (void)bcast;
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    bwd_sums_win<ResIn>(
        std::min(L, n - i0), lg, lgd, x + i0, ResIn ? r + i0 : nullptr, dy + i0, mu,
        a, b, slope);
  }
}

template <bool ResIn, bool Dres, typename A>
void bwd_out(
    bool vec, bool bcast, int64_t n, int64_t L, A* dx, A* dres, const A* x, const A* r,
    const A* dy, const A* mu, const A* a, const A* b, const A* k1, const A* k2,
    const A* k3, A slope) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<A, float>) {
    if (vec) {
      return bcast ? bwd_out_avx2<ResIn, Dres, true>(
                         n, L, dx, dres, x, r, dy, mu, a, b, k1, k2, k3, slope)
                   : bwd_out_avx2<ResIn, Dres, false>(
                         n, L, dx, dres, x, r, dy, mu, a, b, k1, k2, k3, slope);
    }
  }
#endif
  (void)vec;
  (void)bcast;
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    bwd_out_win<ResIn, Dres>(
        std::min(L, n - i0), dx + i0, Dres ? dres + i0 : nullptr, x + i0,
        ResIn ? r + i0 : nullptr, dy + i0, mu, a, b, k1, k2, k3, slope);
  }
}

// Folds L lanes into their first P in a fixed tree order.
template <typename A>
void fold(const Geo& g, A* lane) {
  for (int64_t h = g.R / 2; h >= 1; h /= 2) {
    const int64_t n = h * g.P;
    for (int64_t j = 0; j < n; ++j) {
      lane[j] += lane[j + n];
    }
  }
}

// ---------------------------------------------------------------------------
// Moving chunks between the tensors and contiguous accumulation-type arrays.

// Converts n elements between the storage and the accumulation type, with
// the AVX2 (F16C for float16) conversions where the vector path is on.
template <typename From, typename To>
void convert_run(const From* __restrict__ s, int64_t n, To* __restrict__ d, bool vec) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<From, c10::Half> && std::is_same_v<To, float>) {
    if (vec && f16c_available()) {
      return half_to_float_avx2(s, n, d);
    }
  }
  if constexpr (std::is_same_v<From, c10::BFloat16> && std::is_same_v<To, float>) {
    if (vec) {
      return bf16_to_float_avx2(s, n, d);
    }
  }
  if constexpr (std::is_same_v<From, float> && std::is_same_v<To, c10::Half>) {
    if (vec && f16c_available()) {
      return float_to_half_avx2(s, n, d);
    }
  }
  if constexpr (std::is_same_v<From, float> && std::is_same_v<To, c10::BFloat16>) {
    if (vec) {
      return float_to_bf16_avx2(s, n, d);
    }
  }
#endif
  (void)vec;
  for (int64_t i = 0; i < n; ++i) {
    d[i] = static_cast<To>(s[i]);
  }
}

template <typename A, typename T>
void load_run(const T* __restrict__ s, int64_t n, A* __restrict__ d, bool vec) {
  if constexpr (std::is_same_v<T, A>) {
    (void)vec;
    std::memcpy(d, s, n * sizeof(A));
  } else {
    convert_run(s, n, d, vec);
  }
}

// Non-temporal stores for outputs far larger than the caches: a plain store
// first reads the line it overwrites. Only float32/float64 results are
// streamed (the values are the same either way).
bool use_stream(at::ScalarType dt, int64_t bytes) {
  return MEDMAP_FAST_CPU_SSE2 && (dt == at::kFloat || dt == at::kDouble) &&
      bytes >= nontemporal_min_bytes();
}

template <typename T, typename A>
void store_run(T* __restrict__ d, const A* __restrict__ s, int64_t n, bool vec, bool stream) {
  if constexpr (std::is_same_v<T, A>) {
    (void)vec;
    copy_run(d, s, n, stream);
    return;
  } else {
    (void)stream;
    convert_run(s, n, d, vec);
  }
}

// Start of the chunk in a tensor: chunk j of (b, c) in NCS, chunk j of b in
// channels-last (c is ignored).
template <typename T>
T* chunk_base(const View<T>& v, const Geo& g, int64_t b, int64_t c, int64_t s0) {
  return v.p + b * v.sb + (g.cl ? 0 : c * v.sc) + s0 * v.ss;
}

// Whether the chunk's elements are one contiguous run in element order.
template <typename T>
bool chunk_contiguous(const View<T>& v, const Geo& g, int64_t nv) {
  if (!g.cl) {
    return v.ss == 1 || nv == 1;
  }
  return (v.sc == 1 || g.C == 1) && (v.ss == g.C || nv == 1);
}

// The chunk's elements of an input as a contiguous accumulation-type array:
// in place when the data already is one, else gathered/converted into buf.
template <typename A, typename T>
const A* fetch(
    const View<const T>& v, const Geo& g, int64_t b, int64_t c, int64_t s0,
    int64_t nv, A* buf, bool vec) {
  const T* p = chunk_base(v, g, b, c, s0);
  if (chunk_contiguous(v, g, nv)) {
    if constexpr (std::is_same_v<T, A>) {
      return p;
    }
    load_run(p, nv * g.P, buf, vec);
    return buf;
  }
  if (!g.cl) {
    for (int64_t i = 0; i < nv; ++i) {
      buf[i] = static_cast<A>(p[i * v.ss]);
    }
    return buf;
  }
  const int64_t C = g.C;
  for (int64_t r = 0; r < nv; ++r) {
    const T* q = p + r * v.ss;
    A* d = buf + r * C;
    if (v.sc == 1 || C == 1) {
      load_run(q, C, d, vec);
    } else {
      for (int64_t cc = 0; cc < C; ++cc) {
        d[cc] = static_cast<A>(q[cc * v.sc]);
      }
    }
  }
  return buf;
}

// Where a chunk of results is computed: straight into the output when it is
// a contiguous run of the accumulation type, else into buf (and then written
// out by flush). Streamed outputs, and outputs that alias an input (the loops
// take their arrays as non-aliasing), also go through buf.
template <typename A, typename T>
A* sink(const View<T>& v, const Geo& g, int64_t b, int64_t c, int64_t s0, int64_t nv,
        A* buf, bool staged) {
  if constexpr (std::is_same_v<T, A>) {
    if (!staged && chunk_contiguous(v, g, nv)) {
      return chunk_base(v, g, b, c, s0);
    }
  }
  return buf;
}

template <typename T, typename A>
void flush(
    const View<T>& v, const Geo& g, int64_t b, int64_t c, int64_t s0, int64_t nv,
    const A* src, const A* buf, bool vec, bool stream) {
  if (src != buf) {
    return;  // already computed in place
  }
  T* p = chunk_base(v, g, b, c, s0);
  if (chunk_contiguous(v, g, nv)) {
    store_run(p, src, nv * g.P, vec, stream);
    return;
  }
  if (!g.cl) {
    for (int64_t i = 0; i < nv; ++i) {
      p[i * v.ss] = static_cast<T>(src[i]);
    }
    return;
  }
  const int64_t C = g.C;
  for (int64_t r = 0; r < nv; ++r) {
    T* q = p + r * v.ss;
    const A* s = src + r * C;
    if (v.sc == 1 || C == 1) {
      store_run(q, s, C, vec, false);
    } else {
      for (int64_t cc = 0; cc < C; ++cc) {
        q[cc * v.sc] = static_cast<T>(s[cc]);
      }
    }
  }
}

// Per-thread scratch, carved from one allocation into 64-byte aligned arrays.
template <typename A>
class Scratch {
 public:
  explicit Scratch(int64_t elems) : mem_(static_cast<size_t>(elems) + 64 / sizeof(A)) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(mem_.data());
    used_ = ((64 - (p & 63)) & 63) / sizeof(A);
  }
  A* take(int64_t n) {
    A* p = mem_.data() + used_;
    used_ += round(n);
    TORCH_INTERNAL_ASSERT(used_ <= mem_.size());
    return p;
  }
  static int64_t round(int64_t n) {
    const int64_t per_line = 64 / static_cast<int64_t>(sizeof(A));
    return divup(n, per_line) * per_line;
  }

 private:
  std::vector<A> mem_;
  size_t used_ = 0;
};

// Per-channel values vals(c) expanded to lanes: lane j sees channel j % P of
// the chunk, or channel c for an NCS chunk.
template <typename A, typename F>
void expand(const Geo& g, int64_t c, A* out, F vals) {
  if (!g.cl) {
    std::fill(out, out + g.L, vals(c));
    return;
  }
  for (int64_t cc = 0; cc < g.C; ++cc) {
    out[cc] = vals(cc);
  }
  for (int64_t r = 1; r < g.R; ++r) {
    std::copy(out, out + g.C, out + r * g.C);
  }
}

// Picks a schedule. Group tasks need NCS data, groups small enough to stay
// cached between the passes and enough of them to share out evenly.
bool use_group_tasks(const Geo& g, int64_t group_bytes) {
  if (g.cl) {
    return false;
  }
  const int64_t tasks = g.B * g.G;
  const int64_t nt = at::get_num_threads();
  return group_bytes <= kGroupTaskBytes && tasks >= nt &&
      (tasks % nt == 0 || tasks >= 4 * nt);
}

// Runs a two-pass computation: first(t, b, c, j) on every chunk, merge(b, g)
// on every group once its chunks are done, then second(t, b, c, j) on every
// chunk. t is the thread's Local (scratch arrays); c is 0 for channels-last
// chunks, which hold every channel.
template <typename Local, typename A, typename F1, typename FM, typename F2>
void two_pass(
    const Geo& g, bool group_tasks, int64_t scratch, bool stream,
    F1 first, FM merge, F2 second) {
  if (group_tasks) {
    at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
      Scratch<A> sc(scratch);
      Local t(sc, g);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / g.G;
        const int64_t grp = task % g.G;
        const int64_t c0 = grp * g.cg;
        for (int64_t c = c0; c < c0 + g.cg; ++c) {
          for (int64_t j = 0; j < g.nch; ++j) {
            first(t, b, c, j);
          }
        }
        merge(b, grp);
        for (int64_t c = c0; c < c0 + g.cg; ++c) {
          for (int64_t j = 0; j < g.nch; ++j) {
            second(t, b, c, j);
          }
        }
      }
      stream_fence(stream);
    });
    return;
  }
  const int64_t per = g.per_sample();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / g.maxn);
  auto chunks = [&](auto f) {
    at::parallel_for(0, g.B * per, grain, [&](int64_t begin, int64_t end) {
      Scratch<A> sc(scratch);
      Local t(sc, g);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / per;
        const int64_t r = it % per;
        if (g.cl) {
          f(t, b, int64_t(0), r);
        } else {
          f(t, b, r / g.nch, r % g.nch);
        }
      }
      stream_fence(stream);
    });
  };
  // Two parallel regions and nothing else: every region ends in a barrier,
  // which on a shared machine waits for the most delayed thread. So the
  // merges (one read per chunk and channel) run on the calling thread, and
  // the passes are not split into windows of samples that might stay in L3
  // in between (measured no faster).
  chunks(first);
  for (int64_t k = 0; k < g.B * g.G; ++k) {
    merge(k / g.G, k % g.G);
  }
  chunks(second);
}

bool vector_path(at::ScalarType dt) {
  return dt != at::kDouble && simd::avx2_available();
}

// ---------------------------------------------------------------------------
// State shared by the forward and the backward

// Per-thread coefficients of z = (x - mu) * a + b, expanded over the lanes of
// one (b, c) (NCS) or one sample (channels-last).
template <typename A>
struct ZCoefs {
  A *mu, *a, *b;
  int64_t key = -1;  // coefficients in mu/a/b: of b*C + c (NCS) or b
};

template <typename T>
struct NormActBase {
  using A = at::opmath_type<T>;
  Geo g;
  View<const T> x, res;
  const A* w;
  const A* bias;
  A slope;
  bool vec = false;
  bool stream = false;
  bool staged = false;  // outputs are computed in scratch first (see sink)

  int64_t key_of(int64_t b, int64_t c) const {
    return g.cl ? b : b * g.C + c;
  }

  // One code path for both directions: the backward must reproduce the
  // forward's z bit for bit, so that act' is evaluated on the same side of
  // zero.
  void coefs(ZCoefs<A>& t, const A* mean, const A* rstd, int64_t b, int64_t c) const {
    const int64_t key = key_of(b, c);
    if (key == t.key) {
      return;
    }
    t.key = key;
    const A* mb = mean + b * g.G;
    const A* rb = rstd + b * g.G;
    const int64_t cg = g.cg;
    expand(g, c, t.mu, [&](int64_t cc) { return mb[cc / cg]; });
    expand(g, c, t.a, [&](int64_t cc) {
      return static_cast<A>(
          static_cast<double>(rb[cc / cg]) * static_cast<double>(w[cc]));
    });
    expand(g, c, t.b, [&](int64_t cc) { return bias[cc]; });
  }

  // Fills the fields set the same way in both directions.
  void init(
      bool cl,
      const Shape& d,
      const at::Tensor& x_t,
      const std::optional<at::Tensor>& residual,
      const at::Tensor& weight,
      const at::Tensor& bias_t,
      double slope_v) {
    g = make_geo(cl, d.B, d.C, d.S, d.G);
    x = in_view<T>(x_t);
    res = given(residual) ? in_view<T>(*residual) : x;
    w = weight.const_data_ptr<A>();
    bias = bias_t.const_data_ptr<A>();
    slope = static_cast<A>(slope_v);
    vec = vector_path(d.dtype);
  }
};

// ---------------------------------------------------------------------------
// Forward

template <typename T>
struct Fwd : NormActBase<T> {
  using Base = NormActBase<T>;
  using typename Base::A;
  using Base::g;
  using Base::x;
  using Base::res;
  using Base::slope;
  using Base::vec;
  using Base::stream;
  using Base::staged;
  View<T> y;
  A* mean;
  A* rstd;
  int64_t mode;
  double eps;
  std::vector<double> pmean, pm2;

  struct Local : ZCoefs<A> {
    A *bx, *br, *by, *lane;
    Local(Scratch<A>& sc, const Geo& g) {
      bx = sc.take(g.maxn);
      br = sc.take(g.maxn);
      by = sc.take(g.maxn);
      lane = sc.take(g.L);
      this->mu = sc.take(g.L);
      this->a = sc.take(g.L);
      this->b = sc.take(g.L);
    }
    static int64_t need(const Geo& g) {
      return 3 * Scratch<A>::round(g.maxn) + 4 * Scratch<A>::round(g.L);
    }
  };

  // Two-pass moments of chunk j about the chunk's own mean, which are exact
  // enough in the accumulation type because a chunk is short.
  void stats(Local& t, int64_t b, int64_t c, int64_t j) {
    const int64_t s0 = j * g.step;
    const int64_t nv = g.voxels(j);
    const int64_t n = nv * g.P;
    const A* xp = fetch(x, g, b, c, s0, nv, t.bx, vec);
    std::fill(t.lane, t.lane + g.L, A(0));
    sum_lanes(vec, n, g.L, t.lane, xp);
    fold(g, t.lane);
    const A cnt = static_cast<A>(nv);
    for (int64_t p = 0; p < g.P; ++p) {
      t.mu[p] = t.lane[p] / cnt;
    }
    if (g.P == 1) {
      // One value over the R lanes: a fill, not R - 1 one-element copies
      // (those were 40% of the forward at 8^3, where chunks are short).
      std::fill(t.mu + 1, t.mu + g.R, t.mu[0]);
    } else {
      for (int64_t r = 1; r < g.R; ++r) {
        std::copy(t.mu, t.mu + g.P, t.mu + r * g.P);
      }
    }
    std::fill(t.lane, t.lane + g.L, A(0));
    dev_lanes(vec, g.P == 1, n, g.L, t.lane, xp, t.mu);
    fold(g, t.lane);
    for (int64_t p = 0; p < g.P; ++p) {
      const int64_t s = g.slot(b, g.cl ? p : c, j);
      pmean[s] = static_cast<double>(t.mu[p]);
      pm2[s] = static_cast<double>(t.lane[p]);
    }
    t.key = -1;  // mu was overwritten
  }

  // Group statistics from the chunk moments, in double: the mean from the
  // chunk means, the squared deviations as the chunks' own plus the spread
  // of their means. No large terms cancel, whatever the data's offset.
  void merge(int64_t b, int64_t grp) {
    const int64_t c0 = grp * g.cg;
    double s = 0;
    for (int64_t c = c0; c < c0 + g.cg; ++c) {
      for (int64_t j = 0; j < g.nch; ++j) {
        s += static_cast<double>(g.voxels(j)) * pmean[g.slot(b, c, j)];
      }
    }
    const double N = static_cast<double>(g.cg) * static_cast<double>(g.S);
    const double mu = s / N;
    double m2 = 0;
    for (int64_t c = c0; c < c0 + g.cg; ++c) {
      for (int64_t j = 0; j < g.nch; ++j) {
        const int64_t k = g.slot(b, c, j);
        const double d = pmean[k] - mu;
        m2 += pm2[k] + static_cast<double>(g.voxels(j)) * d * d;
      }
    }
    mean[b * g.G + grp] = static_cast<A>(mu);
    rstd[b * g.G + grp] = static_cast<A>(1.0 / std::sqrt(m2 / N + eps));
  }

  void output(Local& t, int64_t b, int64_t c, int64_t j) {
    this->coefs(t, mean, rstd, b, c);
    const int64_t s0 = j * g.step;
    const int64_t nv = g.voxels(j);
    const int64_t n = nv * g.P;
    const A* xp = fetch(x, g, b, c, s0, nv, t.bx, vec);
    const A* rp = mode != 0 ? fetch(res, g, b, c, s0, nv, t.br, vec) : nullptr;
    A* yp = sink(y, g, b, c, s0, nv, t.by, staged);
    switch (mode) {
      case 0:
        fwd_out<0>(vec, g.P == 1, n, g.L, yp, xp, rp, t.mu, t.a, t.b, slope);
        break;
      case 1:
        fwd_out<1>(vec, g.P == 1, n, g.L, yp, xp, rp, t.mu, t.a, t.b, slope);
        break;
      default:
        fwd_out<2>(vec, g.P == 1, n, g.L, yp, xp, rp, t.mu, t.a, t.b, slope);
        break;
    }
    flush(y, g, b, c, s0, nv, yp, t.by, vec, stream);
  }

  void run() {
    pmean.assign(g.B * g.C * g.nch, 0.0);
    pm2.assign(g.B * g.C * g.nch, 0.0);
    const int64_t elt = static_cast<int64_t>(sizeof(T)) * (mode != 0 ? 2 : 1);
    two_pass<Local, A>(
        g, use_group_tasks(g, g.cg * g.S * elt),
        Local::need(g), stream,
        [&](Local& t, int64_t b, int64_t c, int64_t j) { stats(t, b, c, j); },
        [&](int64_t b, int64_t grp) { merge(b, grp); },
        [&](Local& t, int64_t b, int64_t c, int64_t j) { output(t, b, c, j); });
  }
};

// ---------------------------------------------------------------------------
// Backward

template <typename T>
struct Bwd : NormActBase<T> {
  using Base = NormActBase<T>;
  using typename Base::A;
  using Base::g;
  using Base::x;
  using Base::res;
  using Base::w;
  using Base::slope;
  using Base::vec;
  using Base::stream;
  using Base::staged;
  using Base::key_of;
  View<const T> dy;
  View<T> dx, dres;
  const A* mean;
  const A* rstd;
  bool res_in, want_dres;
  std::vector<double> pg, pgd;  // per chunk slot: sums of g and g * (x - mean)
  std::vector<double> tg, tgd;  // the same per (b, c)
  std::vector<A> k1, k2, k3;    // per (b, c): dx = g * k1 + (x - mean) * k2 + k3

  struct Local : ZCoefs<A> {
    A *bx, *br, *bdy, *bo, *bq, *lg, *lgd, *k1, *k2, *k3;
    int64_t kkey = -1;  // coefficients in k1/k2/k3
    Local(Scratch<A>& sc, const Geo& g) {
      bx = sc.take(g.maxn);
      br = sc.take(g.maxn);
      bdy = sc.take(g.maxn);
      bo = sc.take(g.maxn);
      bq = sc.take(g.maxn);
      lg = sc.take(g.L);
      lgd = sc.take(g.L);
      this->mu = sc.take(g.L);
      this->a = sc.take(g.L);
      this->b = sc.take(g.L);
      k1 = sc.take(g.L);
      k2 = sc.take(g.L);
      k3 = sc.take(g.L);
    }
    static int64_t need(const Geo& g) {
      return 5 * Scratch<A>::round(g.maxn) + 8 * Scratch<A>::round(g.L);
    }
  };

  void sums(Local& t, int64_t b, int64_t c, int64_t j) {
    this->coefs(t, mean, rstd, b, c);
    const int64_t s0 = j * g.step;
    const int64_t nv = g.voxels(j);
    const int64_t n = nv * g.P;
    const A* xp = fetch(x, g, b, c, s0, nv, t.bx, vec);
    const A* rp = res_in ? fetch(res, g, b, c, s0, nv, t.br, vec) : nullptr;
    const A* gp = fetch(dy, g, b, c, s0, nv, t.bdy, vec);
    std::fill(t.lg, t.lg + g.L, A(0));
    std::fill(t.lgd, t.lgd + g.L, A(0));
    if (res_in) {
      bwd_sums<true>(vec, g.P == 1, n, g.L, t.lg, t.lgd, xp, rp, gp, t.mu, t.a, t.b, slope);
    } else {
      bwd_sums<false>(vec, g.P == 1, n, g.L, t.lg, t.lgd, xp, rp, gp, t.mu, t.a, t.b, slope);
    }
    fold(g, t.lg);
    fold(g, t.lgd);
    for (int64_t p = 0; p < g.P; ++p) {
      const int64_t s = g.slot(b, g.cl ? p : c, j);
      pg[s] = static_cast<double>(t.lg[p]);
      pgd[s] = static_cast<double>(t.lgd[p]);
    }
  }

  void merge(int64_t b, int64_t grp) {
    const int64_t c0 = grp * g.cg;
    const double r = static_cast<double>(rstd[b * g.G + grp]);
    double s1 = 0;
    double s2 = 0;
    for (int64_t c = c0; c < c0 + g.cg; ++c) {
      double sg = 0;
      double sgd = 0;
      for (int64_t j = 0; j < g.nch; ++j) {
        const int64_t k = g.slot(b, c, j);
        sg += pg[k];
        sgd += pgd[k];
      }
      tg[b * g.C + c] = sg;
      tgd[b * g.C + c] = sgd;
      s1 += static_cast<double>(w[c]) * sg;
      s2 += static_cast<double>(w[c]) * sgd;
    }
    const double N = static_cast<double>(g.cg) * static_cast<double>(g.S);
    const double m1 = s1 / N;
    const double m2 = r * s2 / N;  // mean of g * w * xhat
    for (int64_t c = c0; c < c0 + g.cg; ++c) {
      k1[b * g.C + c] = static_cast<A>(r * static_cast<double>(w[c]));
      k2[b * g.C + c] = static_cast<A>(-r * r * m2);
      k3[b * g.C + c] = static_cast<A>(-r * m1);
    }
  }

  void kcoefs(Local& t, int64_t b, int64_t c) {
    const int64_t key = key_of(b, c);
    if (key == t.kkey) {
      return;
    }
    t.kkey = key;
    const A* p1 = k1.data() + b * g.C;
    const A* p2 = k2.data() + b * g.C;
    const A* p3 = k3.data() + b * g.C;
    expand(g, c, t.k1, [&](int64_t cc) { return p1[cc]; });
    expand(g, c, t.k2, [&](int64_t cc) { return p2[cc]; });
    expand(g, c, t.k3, [&](int64_t cc) { return p3[cc]; });
  }

  template <bool ResIn, bool Dres>
  void output_as(Local& t, int64_t b, int64_t c, int64_t j) {
    const int64_t s0 = j * g.step;
    const int64_t nv = g.voxels(j);
    const int64_t n = nv * g.P;
    const A* xp = fetch(x, g, b, c, s0, nv, t.bx, vec);
    const A* rp = ResIn ? fetch(res, g, b, c, s0, nv, t.br, vec) : nullptr;
    const A* gp = fetch(dy, g, b, c, s0, nv, t.bdy, vec);
    A* op = sink(dx, g, b, c, s0, nv, t.bo, staged);
    A* qp = Dres ? sink(dres, g, b, c, s0, nv, t.bq, staged) : nullptr;
    bwd_out<ResIn, Dres>(
        vec, g.P == 1, n, g.L, op, qp, xp, rp, gp, t.mu, t.a, t.b, t.k1, t.k2, t.k3, slope);
    flush(dx, g, b, c, s0, nv, op, t.bo, vec, stream);
    if constexpr (Dres) {
      flush(dres, g, b, c, s0, nv, qp, t.bq, vec, stream);
    }
  }

  void output(Local& t, int64_t b, int64_t c, int64_t j) {
    this->coefs(t, mean, rstd, b, c);
    kcoefs(t, b, c);
    if (!res_in) {
      output_as<false, false>(t, b, c, j);
    } else if (want_dres) {
      output_as<true, true>(t, b, c, j);
    } else {
      output_as<true, false>(t, b, c, j);
    }
  }

  void run(A* dweight, A* dbias) {
    const int64_t slots = g.B * g.C * g.nch;
    pg.assign(slots, 0.0);
    pgd.assign(slots, 0.0);
    tg.assign(g.B * g.C, 0.0);
    tgd.assign(g.B * g.C, 0.0);
    k1.assign(g.B * g.C, A(0));
    k2.assign(g.B * g.C, A(0));
    k3.assign(g.B * g.C, A(0));
    const int64_t elt = static_cast<int64_t>(sizeof(T)) * (res_in ? 3 : 2);
    two_pass<Local, A>(
        g, use_group_tasks(g, g.cg * g.S * elt),
        Local::need(g), stream,
        [&](Local& t, int64_t b, int64_t c, int64_t j) { sums(t, b, c, j); },
        [&](int64_t b, int64_t grp) { merge(b, grp); },
        [&](Local& t, int64_t b, int64_t c, int64_t j) { output(t, b, c, j); });
    for (int64_t c = 0; c < g.C; ++c) {
      double sw = 0;
      double sb = 0;
      for (int64_t b = 0; b < g.B; ++b) {
        sw += static_cast<double>(rstd[b * g.G + c / g.cg]) * tgd[b * g.C + c];
        sb += tg[b * g.C + c];
      }
      dweight[c] = static_cast<A>(sw);
      dbias[c] = static_cast<A>(sb);
    }
  }
};

} // namespace

// ---------------------------------------------------------------------------
// Entry points

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
    double eps) {
  constexpr const char* op = "norm_act_fwd";
  const Shape d = check_x(op, x, groups, residual_mode);
  const bool has_res = given(residual);
  TORCH_CHECK(
      has_res == (residual_mode != 0), op, ": residual must be ",
      residual_mode != 0 ? "given when residual_mode is 1 or 2"
                         : "None when residual_mode is 0");
  check_affine(op, d, x, weight, bias, residual);
  check_tensor(op, "y", y, d.dtype, x.sizes());
  check_stats(op, d, mean, rstd);
  if (d.B == 0) {
    return;
  }
  check_out(op, "y", y, {&x, has_res ? &*residual : nullptr});
  const bool cl = choose_cl({&x, &y, has_res ? &*residual : nullptr});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    using A = at::opmath_type<scalar_t>;
    Fwd<scalar_t> f;
    f.init(cl, d, x, residual, weight, bias, slope);
    f.y = out_view<scalar_t>(y);
    f.mean = mean.mutable_data_ptr<A>();
    f.rstd = rstd.mutable_data_ptr<A>();
    f.mode = residual_mode;
    f.eps = eps;
    f.stream = use_stream(d.dtype, y.numel() * y.element_size());
    f.staged = f.stream || overlaps_any(y, {&x, has_res ? &*residual : nullptr});
    f.run();
  });
}

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
    int64_t residual_mode) {
  constexpr const char* op = "norm_act_bwd";
  const Shape d = check_x(op, x, groups, residual_mode);
  const bool has_res = given(residual);
  TORCH_CHECK(
      has_res == (residual_mode == 1), op, ": residual must be ",
      residual_mode == 1 ? "given when residual_mode is 1"
                         : "None unless residual_mode is 1");
  const bool want_dres = given(dres);
  TORCH_CHECK(
      !want_dres || residual_mode == 1, op,
      ": dres must be None unless residual_mode is 1");
  check_affine(op, d, x, weight, bias, residual);
  check_tensor(op, "dy", dy, d.dtype, x.sizes());
  check_stats(op, d, mean, rstd);
  check_tensor(op, "dx", dx, d.dtype, x.sizes());
  if (want_dres) {
    check_tensor(op, "dres", *dres, d.dtype, x.sizes());
  }
  check_small(op, "dweight", dweight, d.acc, {d.C});
  check_small(op, "dbias", dbias, d.acc, {d.C});
  if (d.B == 0) {
    dweight.zero_();
    dbias.zero_();
    return;
  }
  const at::Tensor* res_p = has_res ? &*residual : nullptr;
  check_out(op, "dx", dx, {&x, &dy, res_p});
  if (want_dres) {
    check_out(op, "dres", *dres, {&x, &dy, res_p});
    const at::MemOverlapStatus o = at::get_overlap_status(dx, *dres);
    TORCH_CHECK(
        o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial,
        op, ": dx and dres must not overlap");
  }
  const bool cl = choose_cl(
      {&x, &dy, &dx, res_p, want_dres ? &*dres : nullptr});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    using A = at::opmath_type<scalar_t>;
    Bwd<scalar_t> k;
    k.init(cl, d, x, residual, weight, bias, slope);
    k.dy = in_view<scalar_t>(dy);
    k.dx = out_view<scalar_t>(dx);
    k.dres = want_dres ? out_view<scalar_t>(*dres) : k.dx;
    k.mean = mean.const_data_ptr<A>();
    k.rstd = rstd.const_data_ptr<A>();
    k.res_in = has_res;
    k.want_dres = want_dres;
    k.stream = use_stream(
        d.dtype, dx.numel() * dx.element_size() * (want_dres ? 2 : 1));
    k.staged = k.stream || overlaps_any(dx, {&x, &dy, res_p}) ||
        (want_dres && overlaps_any(*dres, {&x, &dy, res_p}));
    k.run(dweight.mutable_data_ptr<A>(), dbias.mutable_data_ptr<A>());
  });
}

} // namespace medmap_fast::cpu
