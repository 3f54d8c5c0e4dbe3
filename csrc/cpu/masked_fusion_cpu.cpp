#include "masked_fusion_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_common.h"

namespace medmap_fast::cpu {

namespace {

// Only the helpers whose logic matches; this file's View carries an at()
// accessor of its own.
using common::divup;
using common::stream_fence;
using common::unit_c;
using common::unit_s;

// Work is split into items whose extent depends only on the tensor shape,
// never on the thread count. An item is always computed by the same code
// over the same elements, and the grad_coef partial sums of the items are
// combined in item order afterwards, so every result is bitwise identical for
// any number of threads.
//
// kSeg:   elements of one (b, c) row (S-inner) or of one batch slab (C-inner)
//         handled by one item; big enough to amortise per-item bookkeeping.
// kChunk: elements staged per pass in L1-resident scratch (the float copy of
//         grad, or partial sums when more than kGroup modalities are fused).
// kTile:  target run length in the C-inner layout, rounded to whole rows of
//         C so that packed channels-last data runs as one long loop.
// kLanes: independent partial sums per modality in the S-inner dot product,
//         kept in L1 so the loop vectorises without reassociating the sum.
// kGroup: input streams fused into one loop; more would exhaust registers.
constexpr int64_t kSeg = 16384;
constexpr int64_t kChunk = 2048;
constexpr int64_t kTile = 512;
constexpr int64_t kLanes = 128;
constexpr int64_t kGroup = 4;
constexpr int64_t kGrainElems = 32768;

static_assert(kChunk % kLanes == 0, "chunks must not split a lane group");
static_assert(kSeg % kChunk == 0, "segments must be whole chunks");

// Outputs at least this large are written with non-temporal stores. A plain
// store first reads the line it writes into, so for an output that will not
// stay in cache anyway, streaming saves one read per byte written; the
// backward writes M outputs per input and gains the most.
constexpr int64_t kDefaultStreamMinBytes = int64_t(16) << 20;
std::atomic<int64_t> g_stream_min_bytes{kDefaultStreamMinBytes};

// ---------------------------------------------------------------------------
// Argument checking

struct Idx {
  int64_t i;
};

std::ostream& operator<<(std::ostream& os, Idx x) {
  if (x.i >= 0) {
    os << '[' << x.i << ']';
  }
  return os;
}

void expect_tensor(
    const char* op,
    const char* name,
    int64_t idx,
    const at::Tensor& t,
    at::ScalarType dtype,
    at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), op, ": ", name, Idx{idx}, " is undefined");
  TORCH_CHECK(
      t.device().is_cpu(),
      op, ": ", name, Idx{idx}, " must be a CPU tensor, got device ",
      t.device());
  TORCH_CHECK(
      t.scalar_type() == dtype,
      op, ": ", name, Idx{idx}, " must have dtype ", dtype, ", got ",
      t.scalar_type());
  TORCH_CHECK(
      t.sizes() == sizes,
      op, ": ", name, Idx{idx}, " must have shape ", sizes, ", got ",
      t.sizes());
}

void expect_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void expect_feature_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(
      t == at::kFloat || t == at::kDouble || t == at::kHalf ||
          t == at::kBFloat16,
      op, ": ", name,
      " must be float32, float64, float16 or bfloat16, got ", t);
}

at::ScalarType coef_dtype_for(at::ScalarType feat) {
  return feat == at::kDouble ? at::kDouble : at::kFloat;
}

std::array<int64_t, 3> feature_shape(
    const char* op,
    const char* name,
    int64_t idx,
    const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, Idx{idx}, " is undefined");
  TORCH_CHECK(
      t.dim() == 3,
      op, ": ", name, Idx{idx}, " must be 3-D (B, C, S), got shape ",
      t.sizes());
  return {t.size(0), t.size(1), t.size(2)};
}

void check_coef_present(
    const char* op,
    const at::Tensor& coef,
    const at::Tensor& present,
    at::ScalarType cdtype,
    int64_t B,
    int64_t M,
    int64_t C) {
  expect_tensor(op, "coef", -1, coef, cdtype, {B, M, C});
  expect_contiguous(op, "coef", coef);
  expect_tensor(op, "present", -1, present, at::kBool, {B, M});
  expect_contiguous(op, "present", present);
}

// ---------------------------------------------------------------------------
// Strided 3-D views

template <typename T>
struct View {
  T* data;
  int64_t sb, sc, ss;
  T* at(int64_t b, int64_t c, int64_t s) const {
    return data + b * sb + c * sc + s * ss;
  }
};

template <typename T>
View<const T> in_view(const at::Tensor& t) {
  return {
      static_cast<const T*>(t.const_data_ptr()),
      t.stride(0),
      t.stride(1),
      t.stride(2)};
}

template <typename T>
View<T> out_view(const at::Tensor& t) {
  return {
      static_cast<T*>(t.mutable_data_ptr()),
      t.stride(0),
      t.stride(1),
      t.stride(2)};
}

// ---------------------------------------------------------------------------
// Conversions between the storage type and the arithmetic type.
//
// c10::Half converts through code that gcc does not vectorise (extensions are
// built without F16C), which made float16 several times slower than the
// other dtypes. The versions below compute the same bits (checked against
// c10 for every input) using only selects and IEEE arithmetic that stay
// exact with denormals flushed, so the loops vectorise. bfloat16 and the
// plain types already vectorise through static_cast. They are forced inline
// because a call inside a loop blocks vectorisation, and the large kernel
// bodies otherwise exhaust gcc's inlining budget.

C10_ALWAYS_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

C10_ALWAYS_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Branch-free select; gcc if-converts it where a ?: would stay a branch.
C10_ALWAYS_INLINE uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

C10_ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int32_t em = h & 0x7fff;  // exponent and mantissa
  // Normal: move the exponent from bias 15 to bias 127.
  uint32_t bits = static_cast<uint32_t>(em + (112 << 10)) << 13;
  // Infinity and NaN keep an all-ones exponent; NaNs come out quiet.
  bits = select(em >= 0x7c00, (static_cast<uint32_t>(em) << 13) | 0x7f800000u, bits);
  bits = select(em > 0x7c00, bits | 0x00400000u, bits);
  // Zero and subnormal: mantissa * 2^-24, exact and normal in float.
  const float sub = static_cast<float>(em) * 0x1p-24f;
  bits = select(em < 0x0400, float_bits(sub), bits);
  return bits_float(bits | sign);
}

C10_ALWAYS_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t ax = static_cast<int32_t>(x & 0x7fffffffu);
  // Below 2^-14 the result is subnormal: adding 0.5 (ulp 2^-24) makes the
  // FPU round |f| to a multiple of 2^-24 to nearest even, and the low bits
  // of the sum are then the half's mantissa (0x400 when it rounds up to the
  // smallest normal, which is also the right encoding).
  const uint32_t sub =
      float_bits(bits_float(static_cast<uint32_t>(ax)) + 0.5f) - float_bits(0.5f);
  // Otherwise rebias the exponent and round the mantissa from 23 to 10 bits
  // to nearest even; a carry correctly bumps the exponent, up to infinity.
  const uint32_t t = static_cast<uint32_t>(ax) - (112u << 23);
  uint32_t nrm = (t + 0x0fffu + ((t >> 13) & 1u)) >> 13;
  nrm = select(ax >= (143 << 23), 0x7c00u, nrm);  // |f| >= 2^16: infinity
  uint32_t h = select(ax < (113 << 23), sub, nrm);
  h = select(ax > 0x7f800000, 0x7e00u, h);  // NaN
  return static_cast<uint16_t>(h | sign);
}

template <typename A, typename T>
C10_ALWAYS_INLINE A up(T v) {
  return static_cast<A>(v);
}

template <>
C10_ALWAYS_INLINE float up<float, c10::Half>(c10::Half v) {
  return half_to_float(v.x);
}

template <typename T, typename A>
C10_ALWAYS_INLINE T down(A v) {
  return static_cast<T>(v);
}

template <>
C10_ALWAYS_INLINE c10::Half down<c10::Half, float>(float v) {
  return c10::Half(float_to_half(v), c10::Half::from_bits());
}

// ---------------------------------------------------------------------------
// Non-temporal stores.
//
// Only the 16-byte aligned body of a run is streamed; the ragged ends use
// plain stores. Short runs that do not cover whole cache lines are written
// normally, because a partially filled write-combining buffer is slower than
// an ordinary store. Each parallel task ends with a store fence so that its
// streamed data is ordered before the task is seen as finished.

bool use_stream(int64_t bytes_written) {
  return MEDMAP_FAST_CPU_SSE2 &&
      bytes_written >= g_stream_min_bytes.load(std::memory_order_relaxed);
}

inline bool stream_run(bool stream, const void* p, int64_t nbytes) {
  return stream &&
      (nbytes >= 256 ||
       ((reinterpret_cast<uintptr_t>(p) & 63) == 0 && nbytes % 64 == 0));
}

// Elements before the first 16-byte aligned address of y, capped at n.
template <typename T>
inline int64_t head_to_align16(const T* y, int64_t n) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(y) & 15;
  if (mis % sizeof(T) != 0) {
    return n;  // never aligned; everything goes through plain stores
  }
  return std::min<int64_t>(n, ((16 - mis) & 15) / sizeof(T));
}

inline void copy_bytes(void* dst, const void* src, int64_t nbytes, bool stream) {
#if MEDMAP_FAST_CPU_SSE2
  if (stream_run(stream, dst, nbytes)) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const int64_t head = head_to_align16(d, nbytes);
    std::memcpy(d, s, head);
    const int64_t body = (nbytes - head) & ~int64_t(15);
    for (int64_t i = head; i < head + body; i += 16) {
      _mm_stream_si128(
          reinterpret_cast<__m128i*>(d + i),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + head + body, s + head + body, nbytes - head - body);
    return;
  }
#endif
  std::memcpy(dst, src, nbytes);
}

inline void zero_bytes(void* dst, int64_t nbytes, bool stream) {
#if MEDMAP_FAST_CPU_SSE2
  if (stream_run(stream, dst, nbytes)) {
    char* d = static_cast<char*>(dst);
    const int64_t head = head_to_align16(d, nbytes);
    std::memset(d, 0, head);
    const int64_t body = (nbytes - head) & ~int64_t(15);
    const __m128i z = _mm_setzero_si128();
    for (int64_t i = head; i < head + body; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), z);
    }
    std::memset(d + head + body, 0, nbytes - head - body);
    return;
  }
#endif
  std::memset(dst, 0, nbytes);
}

// SSE2 lanes of the dtypes whose arithmetic type equals the storage type;
// only those are streamed straight from registers. Half and bfloat16 results
// use plain stores: on the SSE2 baseline their conversions, not memory, bound
// the loops, and staging them for streaming measured no faster.
template <typename T>
struct Simd {
  static constexpr bool kEnabled = false;
};

#if MEDMAP_FAST_CPU_SSE2
template <>
struct Simd<float> {
  static constexpr bool kEnabled = true;
  static constexpr int64_t kWidth = 4;
  using V = __m128;
  static V load(const float* p) {
    return _mm_loadu_ps(p);
  }
  static V set1(float v) {
    return _mm_set1_ps(v);
  }
  static V zero() {
    return _mm_setzero_ps();
  }
  static V add(V a, V b) {
    return _mm_add_ps(a, b);
  }
  static V mul(V a, V b) {
    return _mm_mul_ps(a, b);
  }
  static void stream(float* p, V v) {
    _mm_stream_ps(p, v);
  }
};

template <>
struct Simd<double> {
  static constexpr bool kEnabled = true;
  static constexpr int64_t kWidth = 2;
  using V = __m128d;
  static V load(const double* p) {
    return _mm_loadu_pd(p);
  }
  static V set1(double v) {
    return _mm_set1_pd(v);
  }
  static V zero() {
    return _mm_setzero_pd();
  }
  static V add(V a, V b) {
    return _mm_add_pd(a, b);
  }
  static V mul(V a, V b) {
    return _mm_mul_pd(a, b);
  }
  static void stream(double* p, V v) {
    _mm_stream_pd(p, v);
  }
};
#endif

// ---------------------------------------------------------------------------
// Inner loops.
//
// The fast paths read all contributing modalities in the same loop instead of
// one after another: several concurrent input streams keep more cache misses
// in flight, and that, not arithmetic, bounds these loops on one core. They
// run over unit-stride pointers passed as __restrict__ parameters, which gcc
// -O3 trusts enough to vectorise without runtime alias checks.

// A coefficient is one scalar per run (S-inner) or one value per element
// (C-inner, where the run walks over channels).
template <typename A>
inline A coef_at(A w, int64_t) {
  return w;
}

template <typename A>
inline A coef_at(const A* w, int64_t i) {
  return w[i];
}

template <typename S, typename A>
inline typename S::V coef_vec(A w, int64_t) {
  return S::set1(w);
}

template <typename S, typename A>
inline typename S::V coef_vec(const A* w, int64_t i) {
  return S::load(w + i);
}

// y = T(sum of NS weighted streams), added in stream order to an initial
// zero and rounded once. Slots past NS are never read.
template <int NS, typename T, typename A, typename W>
inline void fuse_kernel(
    int64_t n,
    T* __restrict__ y,
    const T* __restrict__ x0,
    const T* __restrict__ x1,
    const T* __restrict__ x2,
    const T* __restrict__ x3,
    W w0,
    W w1,
    W w2,
    W w3) {
  for (int64_t i = 0; i < n; ++i) {
    A s = A(0);
    s += coef_at(w0, i) * up<A>(x0[i]);
    if constexpr (NS > 1) {
      s += coef_at(w1, i) * up<A>(x1[i]);
    }
    if constexpr (NS > 2) {
      s += coef_at(w2, i) * up<A>(x2[i]);
    }
    if constexpr (NS > 3) {
      s += coef_at(w3, i) * up<A>(x3[i]);
    }
    y[i] = down<T>(s);
  }
}

// Offsets a per-element coefficient pointer; scalar coefficients pass through.
template <typename W>
inline W advance(W w, int64_t i) {
  if constexpr (std::is_pointer_v<W>) {
    return w + i;
  } else {
    return w;
  }
}

// Offsets a stream pointer that may be an unused (null) slot.
template <typename T>
inline const T* advance_opt(const T* x, int64_t i) {
  return x != nullptr ? x + i : nullptr;
}

// fuse_kernel writing y with non-temporal stores; same operations in the
// same order, so the values are bitwise equal.
template <int NS, typename T, typename A, typename W>
inline void fuse_kernel_stream(
    int64_t n,
    T* y,
    const T* x0,
    const T* x1,
    const T* x2,
    const T* x3,
    W w0,
    W w1,
    W w2,
    W w3) {
  if constexpr (Simd<T>::kEnabled) {
    using S = Simd<T>;
    const int64_t head = head_to_align16(y, n);
    fuse_kernel<NS, T, A>(head, y, x0, x1, x2, x3, w0, w1, w2, w3);
    int64_t i = head;
    for (; i + S::kWidth <= n; i += S::kWidth) {
      auto s = S::zero();
      s = S::add(s, S::mul(coef_vec<S>(w0, i), S::load(x0 + i)));
      if constexpr (NS > 1) {
        s = S::add(s, S::mul(coef_vec<S>(w1, i), S::load(x1 + i)));
      }
      if constexpr (NS > 2) {
        s = S::add(s, S::mul(coef_vec<S>(w2, i), S::load(x2 + i)));
      }
      if constexpr (NS > 3) {
        s = S::add(s, S::mul(coef_vec<S>(w3, i), S::load(x3 + i)));
      }
      S::stream(y + i, s);
    }
    fuse_kernel<NS, T, A>(
        n - i, y + i, x0 + i, advance_opt(x1, i), advance_opt(x2, i),
        advance_opt(x3, i), advance(w0, i), advance(w1, i), advance(w2, i),
        advance(w3, i));
  } else {
    fuse_kernel<NS, T, A>(n, y, x0, x1, x2, x3, w0, w1, w2, w3);
  }
}

template <int NS, typename T, typename W>
inline void fuse_group(
    int64_t n,
    T* y,
    const T* const* xs,
    const W* ws,
    bool stream) {
  using A = at::opmath_type<T>;
  constexpr int i1 = NS > 1 ? 1 : 0;
  constexpr int i2 = NS > 2 ? 2 : 0;
  constexpr int i3 = NS > 3 ? 3 : 0;
  // Unused stream slots get null pointers (never dereferenced; distinct
  // __restrict__ arguments must not alias).
  auto x = [&](int q) -> const T* { return q < NS ? xs[q] : nullptr; };
  if (stream_run(stream, y, n * int64_t(sizeof(T)))) {
    fuse_kernel_stream<NS, T, A>(
        n, y, x(0), x(1), x(2), x(3), ws[0], ws[i1], ws[i2], ws[i3]);
  } else {
    fuse_kernel<NS, T, A>(
        n, y, x(0), x(1), x(2), x(3), ws[0], ws[i1], ws[i2], ws[i3]);
  }
}

// acc[i] = (kFirst ? 0 : acc[i]) + w * x[i]: one modality at a time, for
// more modalities than one fused loop holds. The additions happen in the
// same order as in fuse_kernel, so the result is the same.
template <bool kFirst, typename T, typename A, typename W>
inline void accumulate(
    int64_t n,
    A* __restrict__ acc,
    const T* __restrict__ x,
    W w) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] = (kFirst ? A(0) : acc[i]) + coef_at(w, i) * up<A>(x[i]);
  }
}

template <typename T, typename A>
inline void store_acc(int64_t n, T* __restrict__ y, const A* __restrict__ acc, bool stream) {
  if constexpr (std::is_same_v<T, A>) {
    copy_bytes(y, acc, n * int64_t(sizeof(T)), stream);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = down<T>(acc[i]);
    }
  }
}

// y = T(sum over ns >= 1 weighted streams). acc (n elements of scratch) is
// used only when there are more streams than one fused loop holds (M > 4 is
// rare, so those take the simpler, slower route).
template <typename T, typename A, typename W>
inline void fuse_streams(
    int64_t ns,
    int64_t n,
    T* y,
    A* acc,
    const T* const* xs,
    const W* ws,
    bool stream) {
  switch (ns) {
    case 1:
      fuse_group<1>(n, y, xs, ws, stream);
      return;
    case 2:
      fuse_group<2>(n, y, xs, ws, stream);
      return;
    case 3:
      fuse_group<3>(n, y, xs, ws, stream);
      return;
    case 4:
      fuse_group<4>(n, y, xs, ws, stream);
      return;
    default:
      break;
  }
  accumulate<true>(n, acc, xs[0], ws[0]);
  for (int64_t q = 1; q < ns; ++q) {
    accumulate<false>(n, acc, xs[q], ws[q]);
  }
  store_acc(n, y, acc, stream);
}

// Backward store of one modality: y[i] = T(w * g[i]).
template <typename T, typename A, typename W>
inline void scale_kernel(
    int64_t n,
    T* __restrict__ y,
    const A* __restrict__ g,
    W w) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = down<T>(coef_at(w, i) * g[i]);
  }
}

// Modalities are stored one after another, not in one fused loop: several
// output streams written in lockstep slow down badly when the outputs sit at
// unlucky relative offsets (e.g. separate allocations a multiple of 4 KiB
// apart), while reads show no such effect.
template <typename T, typename A, typename W>
inline void scale_run(int64_t n, T* y, const A* g, W w, bool stream) {
  if constexpr (Simd<T>::kEnabled) {
    if (stream_run(stream, y, n * int64_t(sizeof(T)))) {
      using S = Simd<T>;
      const int64_t head = head_to_align16(y, n);
      scale_kernel(head, y, g, w);
      int64_t i = head;
      for (; i + S::kWidth <= n; i += S::kWidth) {
        S::stream(y + i, S::mul(coef_vec<S>(w, i), S::load(g + i)));
      }
      scale_kernel(n - i, y + i, g + i, advance(w, i));
      return;
    }
  }
  scale_kernel(n, y, g, w);
}

// l_q[i] += x_q[i] * g[i] for NS fused input streams.
template <int NS, typename T, typename A>
inline void dot_kernel(
    int64_t n,
    const A* __restrict__ g,
    const T* __restrict__ x0,
    const T* __restrict__ x1,
    const T* __restrict__ x2,
    const T* __restrict__ x3,
    A* __restrict__ l0,
    A* __restrict__ l1,
    A* __restrict__ l2,
    A* __restrict__ l3) {
  for (int64_t i = 0; i < n; ++i) {
    const A gi = g[i];
    l0[i] += up<A>(x0[i]) * gi;
    if constexpr (NS > 1) {
      l1[i] += up<A>(x1[i]) * gi;
    }
    if constexpr (NS > 2) {
      l2[i] += up<A>(x2[i]) * gi;
    }
    if constexpr (NS > 3) {
      l3[i] += up<A>(x3[i]) * gi;
    }
  }
}

// Dot products of up to kGroup streams with g. With kCyclic (S-inner) the
// lane arrays are kLanes wide and element i goes to lane i % kLanes, so the
// run is walked in windows of kLanes; otherwise (C-inner) the lane arrays are
// as long as the run.
template <int NS, bool kCyclic, typename T, typename A>
inline void dot_group(const T* const* xs, A* const* ls, const A* g, int64_t n) {
  // Unused slots get null pointers: they are never dereferenced, and distinct
  // __restrict__ arguments must not alias.
  auto x = [&](int q, int64_t i) -> const T* {
    return q < NS ? xs[q] + i : nullptr;
  };
  auto l = [&](int q) -> A* { return q < NS ? ls[q] : nullptr; };
  if constexpr (kCyclic) {
    for (int64_t i = 0; i < n; i += kLanes) {
      dot_kernel<NS>(
          std::min(kLanes, n - i), g + i, x(0, i), x(1, i), x(2, i), x(3, i),
          l(0), l(1), l(2), l(3));
    }
  } else {
    dot_kernel<NS>(
        n, g, x(0, 0), x(1, 0), x(2, 0), x(3, 0), l(0), l(1), l(2), l(3));
  }
}

// Backward of ns >= 1 present modalities over one run:
//   ys[q][i] = T(ws[q] * g[i]), and with kDot the products xs[q][i] * g[i]
//   accumulated into ls[q] as described at dot_group.
template <bool kDot, typename T, typename A, typename W>
inline void scatter_streams(
    int64_t ns,
    int64_t n,
    T* const* ys,
    const W* ws,
    const T* const* xs,
    A* const* ls,
    const A* g,
    bool stream) {
  for (int64_t q = 0; q < ns; ++q) {
    scale_run(n, ys[q], g, ws[q], stream);
  }
  if constexpr (kDot) {
    constexpr bool kCyclic = !std::is_pointer_v<W>;
    for (int64_t j = 0; j < ns; j += kGroup) {
      switch (std::min(kGroup, ns - j)) {
        case 1:
          dot_group<1, kCyclic>(xs + j, ls + j, g, n);
          break;
        case 2:
          dot_group<2, kCyclic>(xs + j, ls + j, g, n);
          break;
        case 3:
          dot_group<3, kCyclic>(xs + j, ls + j, g, n);
          break;
        default:
          dot_group<4, kCyclic>(xs + j, ls + j, g, n);
          break;
      }
    }
  }
}

// Strided fallbacks for layouts that fit neither fast path. The first
// contribution is added to an explicit zero, as in fuse_kernel, so both
// paths agree even on the sign of a zero result.
template <typename T, typename A>
inline void mul_first(A* acc, const T* x, int64_t st, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] = A(0) + w * up<A>(x[i * st]);
  }
}

template <typename T, typename A>
inline void mul_add(A* acc, const T* x, int64_t st, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += w * up<A>(x[i * st]);
  }
}

template <typename T, typename A>
inline void scale_store_strided(T* y, int64_t st, A w, const A* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i * st] = down<T>(w * g[i]);
  }
}

// Same lane assignment as dot_group in the S-inner layout.
template <typename T, typename A>
inline void dot_lanes_strided(
    A* lanes, const T* x, int64_t st, const A* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    lanes[i % kLanes] += up<A>(x[i * st]) * g[i];
  }
}

template <typename T, typename A>
inline void load(
    A* __restrict__ acc, const T* __restrict__ x, int64_t st, int64_t n) {
  if (st == 1) {
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = up<A>(x[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = up<A>(x[i * st]);
    }
  }
}

template <typename T, typename A>
inline void store_strided(T* y, int64_t st, const A* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i * st] = down<T>(acc[i]);
  }
}

template <typename T>
inline void store_zero(T* y, int64_t st, int64_t n, bool stream) {
  if (st == 1) {
    zero_bytes(y, n * int64_t(sizeof(T)), stream);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i * st] = T{};
    }
  }
}

// Zeroes `rows` rows of C unit-stride elements spaced ld apart.
template <typename T>
inline void zero_rows(T* y, int64_t ld, int64_t rows, int64_t C, bool stream) {
  if (ld == C || rows == 1) {
    store_zero(y, 1, rows * C, stream);
  } else {
    for (int64_t j = 0; j < rows; ++j) {
      store_zero(y + j * ld, 1, C, stream);
    }
  }
}

// ---------------------------------------------------------------------------
// Problem description shared by the kernels

template <typename T>
struct Problem {
  using A = at::opmath_type<T>;
  int64_t B, M, C, S;
  const A* coef;
  const bool* present;
  bool has(int64_t b, int64_t k) const {
    return present[b * M + k];
  }
  A w(int64_t b, int64_t k, int64_t c) const {
    return coef[(b * M + k) * C + c];
  }
};

// Geometry of the C-inner (channels-last) decomposition: an item covers
// rows_item positions of s of one sample, processed r rows at a time.
struct CInnerGeom {
  int64_t r, L, rows_item, nblk;
  CInnerGeom(int64_t C, int64_t S) {
    r = std::max<int64_t>(1, kTile / C);
    L = r * C;
    rows_item = r * std::max<int64_t>(1, kSeg / L);
    nblk = divup(S, rows_item);
  }
};

// Coefficient rows of sample b, each repeated r times, so that a packed run
// of r channels-last rows sees an element-wise coefficient vector. Any row of
// the tile is the plain coefficient row.
template <typename A>
void fill_coef_tile(
    std::vector<A>& ct,
    const A* coef,
    const bool* present,
    int64_t b,
    int64_t M,
    int64_t C,
    int64_t r) {
  const int64_t L = r * C;
  for (int64_t k = 0; k < M; ++k) {
    if (!present[b * M + k]) {
      continue;
    }
    const A* row = coef + (b * M + k) * C;
    for (int64_t j = 0; j < r; ++j) {
      std::copy(row, row + C, ct.data() + k * L + j * C);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward

// Rows along s. `unit`: every tensor has unit stride along s; otherwise the
// strided fallback runs.
template <typename T>
void fwd_s_inner(
    const Problem<T>& p,
    const std::vector<View<const T>>& fv,
    const View<T>& out,
    bool unit,
    bool stream) {
  using A = at::opmath_type<T>;
  const int64_t nseg = divup(p.S, kSeg);
  const int64_t grain = divup(kGrainElems, std::min(p.S, kSeg));
  at::parallel_for(0, p.B * p.C * nseg, grain, [&](int64_t begin, int64_t end) {
    A acc[kChunk];
    std::vector<const T*> xs(p.M);
    std::vector<A> ws(p.M);
    std::vector<int64_t> sts(p.M);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t seg = it % nseg;
      const int64_t c = (it / nseg) % p.C;
      const int64_t b = it / nseg / p.C;
      const int64_t s_end = std::min(p.S, (seg + 1) * kSeg);
      for (int64_t s0 = seg * kSeg; s0 < s_end; s0 += kChunk) {
        const int64_t n = std::min(kChunk, s_end - s0);
        int64_t ns = 0;
        for (int64_t k = 0; k < p.M; ++k) {
          if (p.has(b, k)) {
            xs[ns] = fv[k].at(b, c, s0);
            ws[ns] = p.w(b, k, c);
            sts[ns] = fv[k].ss;
            ++ns;
          }
        }
        T* y = out.at(b, c, s0);
        if (ns == 0) {
          store_zero(y, out.ss, n, stream);
        } else if (unit) {
          fuse_streams(ns, n, y, acc, xs.data(), ws.data(), stream);
        } else {
          mul_first(acc, xs[0], sts[0], ws[0], n);
          for (int64_t q = 1; q < ns; ++q) {
            mul_add(acc, xs[q], sts[q], ws[q], n);
          }
          store_strided(y, out.ss, acc, n);
        }
      }
    }
    stream_fence(stream);
  });
}

// Rows along c (channels-last); every tensor has unit stride along c.
template <typename T>
void fwd_c_inner(
    const Problem<T>& p,
    const std::vector<View<const T>>& fv,
    const View<T>& out,
    bool stream) {
  using A = at::opmath_type<T>;
  const CInnerGeom geo(p.C, p.S);
  const int64_t C = p.C;
  const int64_t L = geo.L;
  const int64_t grain = divup(kGrainElems, std::min(p.S, geo.rows_item) * C);
  at::parallel_for(0, p.B * geo.nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(L);
    std::vector<A> ct(p.M * L);
    std::vector<const T*> xs(p.M);
    std::vector<const T*> xr(p.M);
    std::vector<const A*> ws(p.M);
    std::vector<int64_t> lds(p.M);
    int64_t ct_b = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / geo.nblk;
      const int64_t blk = it % geo.nblk;
      if (b != ct_b) {
        fill_coef_tile(ct, p.coef, p.present, b, p.M, C, geo.r);
        ct_b = b;
      }
      const int64_t s_end = std::min(p.S, (blk + 1) * geo.rows_item);
      for (int64_t s0 = blk * geo.rows_item; s0 < s_end; s0 += geo.r) {
        const int64_t rows = std::min(geo.r, s_end - s0);
        bool packed = rows == 1 || out.ss == C;
        int64_t ns = 0;
        for (int64_t k = 0; k < p.M; ++k) {
          if (p.has(b, k)) {
            xs[ns] = fv[k].at(b, 0, s0);
            lds[ns] = fv[k].ss;
            ws[ns] = ct.data() + k * L;
            packed = packed && (rows == 1 || lds[ns] == C);
            ++ns;
          }
        }
        T* y = out.at(b, 0, s0);
        if (ns == 0) {
          zero_rows(y, out.ss, rows, C, stream);
        } else if (packed) {
          fuse_streams(ns, rows * C, y, acc.data(), xs.data(), ws.data(), stream);
        } else {
          for (int64_t j = 0; j < rows; ++j) {
            for (int64_t q = 0; q < ns; ++q) {
              xr[q] = xs[q] + j * lds[q];
            }
            fuse_streams(
                ns, C, y + j * out.ss, acc.data(), xr.data(), ws.data(), stream);
          }
        }
      }
    }
    stream_fence(stream);
  });
}

// ---------------------------------------------------------------------------
// Backward

template <typename T>
void bwd_s_inner(
    const Problem<T>& p,
    const View<const T>& gv,
    const std::vector<View<const T>>& fv,
    const std::vector<View<T>>& gfv,
    at::opmath_type<T>* grad_coef,
    bool unit,
    bool stream) {
  using A = at::opmath_type<T>;
  const int64_t nseg = divup(p.S, kSeg);
  const int64_t grain = divup(kGrainElems, std::min(p.S, kSeg));
  // partial[((b * C + c) * nseg + seg) * M + k]
  std::vector<A> partial(grad_coef ? p.B * p.C * nseg * p.M : 0);
  at::parallel_for(0, p.B * p.C * nseg, grain, [&](int64_t begin, int64_t end) {
    A g[kChunk];
    std::vector<A> lanes(grad_coef ? p.M * kLanes : 0);
    std::vector<T*> ys(p.M);
    std::vector<const T*> xs(p.M);
    std::vector<A> ws(p.M);
    std::vector<A*> ls(p.M);
    std::vector<int64_t> ysts(p.M);
    std::vector<int64_t> xsts(p.M);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t seg = it % nseg;
      const int64_t c = (it / nseg) % p.C;
      const int64_t b = it / nseg / p.C;
      const int64_t s_end = std::min(p.S, (seg + 1) * kSeg);
      std::fill(lanes.begin(), lanes.end(), A(0));
      for (int64_t s0 = seg * kSeg; s0 < s_end; s0 += kChunk) {
        const int64_t n = std::min(kChunk, s_end - s0);
        load(g, gv.at(b, c, s0), gv.ss, n);
        int64_t ns = 0;
        for (int64_t k = 0; k < p.M; ++k) {
          T* y = gfv[k].at(b, c, s0);
          if (!p.has(b, k)) {
            store_zero(y, gfv[k].ss, n, stream);
            continue;
          }
          ys[ns] = y;
          ysts[ns] = gfv[k].ss;
          ws[ns] = p.w(b, k, c);
          if (grad_coef) {
            xs[ns] = fv[k].at(b, c, s0);
            xsts[ns] = fv[k].ss;
            ls[ns] = lanes.data() + k * kLanes;
          }
          ++ns;
        }
        if (ns == 0) {
          continue;
        }
        if (unit) {
          if (grad_coef) {
            scatter_streams<true>(
                ns, n, ys.data(), ws.data(), xs.data(), ls.data(), g, stream);
          } else {
            scatter_streams<false>(
                ns, n, ys.data(), ws.data(), xs.data(), ls.data(), g, stream);
          }
        } else {
          for (int64_t q = 0; q < ns; ++q) {
            scale_store_strided(ys[q], ysts[q], ws[q], g, n);
            if (grad_coef) {
              dot_lanes_strided(ls[q], xs[q], xsts[q], g, n);
            }
          }
        }
      }
      if (grad_coef) {
        for (int64_t k = 0; k < p.M; ++k) {
          A sum = 0;
          for (int64_t j = 0; j < kLanes; ++j) {
            sum += lanes[k * kLanes + j];
          }
          partial[((b * p.C + c) * nseg + seg) * p.M + k] = sum;
        }
      }
    }
    stream_fence(stream);
  });
  if (grad_coef) {
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t k = 0; k < p.M; ++k) {
        for (int64_t c = 0; c < p.C; ++c) {
          A sum = 0;
          if (p.has(b, k)) {
            for (int64_t seg = 0; seg < nseg; ++seg) {
              sum += partial[((b * p.C + c) * nseg + seg) * p.M + k];
            }
          }
          grad_coef[(b * p.M + k) * p.C + c] = sum;
        }
      }
    }
  }
}

template <typename T>
void bwd_c_inner(
    const Problem<T>& p,
    const View<const T>& gv,
    const std::vector<View<const T>>& fv,
    const std::vector<View<T>>& gfv,
    at::opmath_type<T>* grad_coef,
    bool stream) {
  using A = at::opmath_type<T>;
  const CInnerGeom geo(p.C, p.S);
  const int64_t C = p.C;
  const int64_t L = geo.L;
  const int64_t grain = divup(kGrainElems, std::min(p.S, geo.rows_item) * C);
  // partial[((b * nblk + blk) * M + k) * C + c]
  std::vector<A> partial(grad_coef ? p.B * geo.nblk * p.M * C : 0);
  at::parallel_for(0, p.B * geo.nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> g(L);
    std::vector<A> ct(p.M * L);
    std::vector<A> lanes(grad_coef ? p.M * L : 0);
    std::vector<T*> ys(p.M);
    std::vector<T*> yr(p.M);
    std::vector<const T*> xs(p.M);
    std::vector<const T*> xr(p.M);
    std::vector<const A*> ws(p.M);
    std::vector<A*> ls(p.M);
    std::vector<A*> lr(p.M);
    std::vector<int64_t> ldy(p.M);
    std::vector<int64_t> ldx(p.M);
    int64_t ct_b = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / geo.nblk;
      const int64_t blk = it % geo.nblk;
      if (b != ct_b) {
        fill_coef_tile(ct, p.coef, p.present, b, p.M, C, geo.r);
        ct_b = b;
      }
      std::fill(lanes.begin(), lanes.end(), A(0));
      const int64_t s_end = std::min(p.S, (blk + 1) * geo.rows_item);
      for (int64_t s0 = blk * geo.rows_item; s0 < s_end; s0 += geo.r) {
        const int64_t rows = std::min(geo.r, s_end - s0);
        const T* gp = gv.at(b, 0, s0);
        if (gv.ss == C || rows == 1) {
          load(g.data(), gp, 1, rows * C);
        } else {
          for (int64_t j = 0; j < rows; ++j) {
            load(g.data() + j * C, gp + j * gv.ss, 1, C);
          }
        }
        bool packed = true;
        int64_t ns = 0;
        for (int64_t k = 0; k < p.M; ++k) {
          T* y = gfv[k].at(b, 0, s0);
          if (!p.has(b, k)) {
            zero_rows(y, gfv[k].ss, rows, C, stream);
            continue;
          }
          ys[ns] = y;
          ldy[ns] = gfv[k].ss;
          ws[ns] = ct.data() + k * L;
          packed = packed && ldy[ns] == C;
          if (grad_coef) {
            xs[ns] = fv[k].at(b, 0, s0);
            ldx[ns] = fv[k].ss;
            ls[ns] = lanes.data() + k * L;
            packed = packed && ldx[ns] == C;
          }
          ++ns;
        }
        if (ns == 0) {
          continue;
        }
        auto run = [&](T* const* yy, const T* const* xx, A* const* ll,
                       const A* gg, int64_t n) {
          if (grad_coef) {
            scatter_streams<true>(ns, n, yy, ws.data(), xx, ll, gg, stream);
          } else {
            scatter_streams<false>(ns, n, yy, ws.data(), xx, ll, gg, stream);
          }
        };
        if (packed || rows == 1) {
          run(ys.data(), xs.data(), ls.data(), g.data(), rows * C);
        } else {
          for (int64_t j = 0; j < rows; ++j) {
            for (int64_t q = 0; q < ns; ++q) {
              yr[q] = ys[q] + j * ldy[q];
              if (grad_coef) {
                xr[q] = xs[q] + j * ldx[q];
                lr[q] = ls[q] + j * C;
              }
            }
            run(yr.data(), xr.data(), lr.data(), g.data() + j * C, C);
          }
        }
      }
      if (grad_coef) {
        for (int64_t k = 0; k < p.M; ++k) {
          A* dst = partial.data() + ((b * geo.nblk + blk) * p.M + k) * C;
          const A* lk = lanes.data() + k * L;
          for (int64_t c = 0; c < C; ++c) {
            A sum = 0;
            for (int64_t j = 0; j < geo.r; ++j) {
              sum += lk[j * C + c];
            }
            dst[c] = sum;
          }
        }
      }
    }
    stream_fence(stream);
  });
  if (grad_coef) {
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t k = 0; k < p.M; ++k) {
        A* dst = grad_coef + (b * p.M + k) * C;
        std::fill(dst, dst + C, A(0));
        if (!p.has(b, k)) {
          continue;
        }
        for (int64_t blk = 0; blk < geo.nblk; ++blk) {
          const A* src = partial.data() + ((b * geo.nblk + blk) * p.M + k) * C;
          for (int64_t c = 0; c < C; ++c) {
            dst[c] += src[c];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Masked copy; dtype-agnostic, works on raw element bits (all-zero bits are
// the zero of every dtype).

struct Bits128 {
  uint64_t lo, hi;
};

template <typename U>
inline void copy_run(U* __restrict__ d, const U* __restrict__ s, int64_t n, bool stream) {
  const int64_t nbytes = n * int64_t(sizeof(U));
  if (stream_run(stream, d, nbytes)) {
    copy_bytes(d, s, nbytes, true);
  } else if (nbytes <= 256) {
    // Short runs (channels-last rows) are cheaper inline than through a call.
    for (int64_t i = 0; i < n; ++i) {
      d[i] = s[i];
    }
  } else {
    std::memcpy(static_cast<void*>(d), static_cast<const void*>(s), nbytes);
  }
}

template <typename U>
void masked_copy_one(
    const at::Tensor& src,
    const at::Tensor& dst,
    const bool* present,
    int64_t M,
    int64_t k,
    bool stream) {
  const int64_t B = src.size(0);
  const int64_t C = src.size(1);
  const int64_t S = src.size(2);
  const View<const U> sv{
      static_cast<const U*>(src.const_data_ptr()),
      src.stride(0), src.stride(1), src.stride(2)};
  const View<U> dv{
      static_cast<U*>(dst.mutable_data_ptr()),
      dst.stride(0), dst.stride(1), dst.stride(2)};
  // Copying a tensor onto itself is a no-op (and memcpy must not overlap).
  const bool same = static_cast<const void*>(sv.data) == dv.data &&
      sv.sb == dv.sb && sv.sc == dv.sc && sv.ss == dv.ss;

  if (!(unit_s(src) && unit_s(dst)) && unit_c(src) && unit_c(dst)) {
    const int64_t rows_item = std::max<int64_t>(1, kSeg / C);
    const int64_t nblk = divup(S, rows_item);
    const bool packed = (sv.ss == C && dv.ss == C) || S == 1;
    const int64_t grain = divup(kGrainElems, std::min(S, rows_item) * C);
    at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / nblk;
        const int64_t blk = it % nblk;
        const bool has = present[b * M + k];
        if (has && same) {
          continue;
        }
        const int64_t s0 = blk * rows_item;
        const int64_t rows = std::min(S, s0 + rows_item) - s0;
        U* d = dv.at(b, 0, s0);
        const U* s = sv.at(b, 0, s0);
        if (!has) {
          zero_rows(d, dv.ss, rows, C, stream);
        } else if (packed) {
          copy_run(d, s, rows * C, stream);
        } else {
          for (int64_t j = 0; j < rows; ++j) {
            copy_run(d + j * dv.ss, s + j * sv.ss, C, stream);
          }
        }
      }
      stream_fence(stream);
    });
    return;
  }

  // Runs along s; with unit strides each run is one block copy or fill.
  const bool unit = unit_s(src) && unit_s(dst);
  const int64_t nseg = divup(S, kSeg);
  const int64_t grain = divup(kGrainElems, std::min(S, kSeg));
  at::parallel_for(0, B * C * nseg, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t seg = it % nseg;
      const int64_t c = (it / nseg) % C;
      const int64_t b = it / nseg / C;
      const bool has = present[b * M + k];
      if (has && same) {
        continue;
      }
      const int64_t s0 = seg * kSeg;
      const int64_t n = std::min(S, s0 + kSeg) - s0;
      U* d = dv.at(b, c, s0);
      const U* s = sv.at(b, c, s0);
      if (!has) {
        store_zero(d, dv.ss, n, stream);
      } else if (unit) {
        copy_run(d, s, n, stream);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          d[i * dv.ss] = s[i * sv.ss];
        }
      }
    }
    stream_fence(stream);
  });
}

} // namespace

// ---------------------------------------------------------------------------
// Entry points

int64_t nontemporal_min_bytes() {
  return g_stream_min_bytes.load(std::memory_order_relaxed);
}

void set_nontemporal_min_bytes(int64_t bytes) {
  g_stream_min_bytes.store(
      bytes < 0 ? kDefaultStreamMinBytes : bytes, std::memory_order_relaxed);
}

void fuse_sum_fwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& out) {
  constexpr const char* op = "fuse_sum_fwd";
  TORCH_CHECK(!feats.empty(), op, ": feats must contain at least one tensor");
  const auto shape = feature_shape(op, "feats", 0, feats[0]);
  const int64_t B = shape[0], C = shape[1], S = shape[2];
  const int64_t M = static_cast<int64_t>(feats.size());
  const at::ScalarType dtype = feats[0].scalar_type();
  expect_feature_dtype(op, "feats", dtype);
  for (int64_t k = 0; k < M; ++k) {
    expect_tensor(op, "feats", k, feats[k], dtype, shape);
  }
  check_coef_present(op, coef, present, coef_dtype_for(dtype), B, M, C);
  expect_tensor(op, "out", -1, out, dtype, shape);
  if (out.numel() == 0) {
    return;
  }
  at::assert_no_internal_overlap(out);

  bool s_inner = unit_s(out);
  bool c_inner = unit_c(out);
  for (const auto& f : feats) {
    s_inner = s_inner && unit_s(f);
    c_inner = c_inner && unit_c(f);
  }
  const bool stream = use_stream(out.numel() * out.element_size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    using A = at::opmath_type<scalar_t>;
    const Problem<scalar_t> p{
        B, M, C, S, coef.const_data_ptr<A>(), present.const_data_ptr<bool>()};
    std::vector<View<const scalar_t>> fv;
    fv.reserve(M);
    for (const auto& f : feats) {
      fv.push_back(in_view<scalar_t>(f));
    }
    const View<scalar_t> ov = out_view<scalar_t>(out);
    if (!s_inner && c_inner) {
      fwd_c_inner(p, fv, ov, stream);
    } else {
      fwd_s_inner(p, fv, ov, s_inner, stream);
    }
  });
}

void fuse_sum_bwd(
    const at::Tensor& grad,
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef) {
  constexpr const char* op = "fuse_sum_bwd";
  const auto shape = feature_shape(op, "grad", -1, grad);
  const int64_t B = shape[0], C = shape[1], S = shape[2];
  const at::ScalarType dtype = grad.scalar_type();
  expect_feature_dtype(op, "grad", dtype);
  expect_tensor(op, "grad", -1, grad, dtype, shape);
  const int64_t M = static_cast<int64_t>(grad_feats.size());
  TORCH_CHECK(M >= 1, op, ": grad_feats must contain at least one tensor");
  const at::ScalarType cdtype = coef_dtype_for(dtype);
  check_coef_present(op, coef, present, cdtype, B, M, C);
  for (int64_t k = 0; k < M; ++k) {
    expect_tensor(op, "grad_feats", k, grad_feats[k], dtype, shape);
  }
  const bool want_coef = grad_coef.has_value() && grad_coef->defined();
  if (want_coef) {
    TORCH_CHECK(
        static_cast<int64_t>(feats.size()) == M,
        op, ": feats must hold one tensor per modality (", M, "), got ",
        feats.size());
    for (int64_t k = 0; k < M; ++k) {
      expect_tensor(op, "feats", k, feats[k], dtype, shape);
    }
    expect_tensor(op, "grad_coef", -1, *grad_coef, cdtype, {B, M, C});
    expect_contiguous(op, "grad_coef", *grad_coef);
  }
  for (const auto& g : grad_feats) {
    if (g.numel() > 0) {
      at::assert_no_internal_overlap(g);
    }
  }

  bool s_inner = unit_s(grad);
  bool c_inner = unit_c(grad);
  for (const auto& g : grad_feats) {
    s_inner = s_inner && unit_s(g);
    c_inner = c_inner && unit_c(g);
  }
  if (want_coef) {
    for (const auto& f : feats) {
      s_inner = s_inner && unit_s(f);
      c_inner = c_inner && unit_c(f);
    }
  }
  const bool stream = use_stream(M * grad.numel() * grad.element_size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    using A = at::opmath_type<scalar_t>;
    A* gc = want_coef ? grad_coef->mutable_data_ptr<A>() : nullptr;
    if (B * C * S == 0) {
      // An empty sum over s is zero; nothing else to write.
      if (gc != nullptr) {
        std::fill(gc, gc + B * M * C, A(0));
      }
      return;
    }
    const Problem<scalar_t> p{
        B, M, C, S, coef.const_data_ptr<A>(), present.const_data_ptr<bool>()};
    const View<const scalar_t> gv = in_view<scalar_t>(grad);
    std::vector<View<const scalar_t>> fv;
    if (want_coef) {
      fv.reserve(M);
      for (const auto& f : feats) {
        fv.push_back(in_view<scalar_t>(f));
      }
    }
    std::vector<View<scalar_t>> gfv;
    gfv.reserve(M);
    for (const auto& g : grad_feats) {
      gfv.push_back(out_view<scalar_t>(g));
    }
    if (!s_inner && c_inner) {
      bwd_c_inner(p, gv, fv, gfv, gc, stream);
    } else {
      bwd_s_inner(p, gv, fv, gfv, gc, s_inner, stream);
    }
  });
}

// Channels-last pairs whose voxel stride is not C: the modalities are channel
// slices of one concatenated tensor (zero_concat forward writes into them,
// backward reads out of them). Copying one modality at a time would touch
// every voxel's row M times, a cache line here and there, and the hardware's
// adjacent-line prefetch then moves each line about twice. Walking the voxels
// once and handling all M modalities per voxel streams the concatenated
// tensor in order instead.
template <typename U>
void masked_copy_interleaved(
    at::TensorList src,
    at::TensorList dst,
    const bool* present,
    int64_t M) {
  const int64_t B = src[0].size(0);
  const int64_t C = src[0].size(1);
  const int64_t S = src[0].size(2);
  std::vector<View<const U>> sv;
  std::vector<View<U>> dv;
  for (int64_t k = 0; k < M; ++k) {
    sv.push_back(in_view<U>(src[k]));
    dv.push_back(out_view<U>(dst[k]));
  }
  const int64_t rows_item = std::max<int64_t>(1, kSeg / (C * M));
  const int64_t nblk = divup(S, rows_item);
  const int64_t grain = divup(kGrainElems, std::min(S, rows_item) * C * M);
  at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / nblk;
      const int64_t s0 = (it % nblk) * rows_item;
      const int64_t s1 = std::min(S, s0 + rows_item);
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t k = 0; k < M; ++k) {
          U* __restrict__ d = dv[k].at(b, 0, s);
          if (present[b * M + k]) {
            const U* __restrict__ x = sv[k].at(b, 0, s);
            for (int64_t c = 0; c < C; ++c) {
              d[c] = x[c];
            }
          } else {
            std::memset(static_cast<void*>(d), 0, C * sizeof(U));
          }
        }
      }
    }
  });
}

// True when masked_copy_interleaved applies: same shapes, channels innermost
// everywhere, and at least one side not packed (voxel stride != C).
bool interleaved_layout(at::TensorList src, at::TensorList dst) {
  const auto& r = src[0];
  if (r.size(1) <= 1 || r.size(2) <= 1) {
    return false;
  }
  bool packed = true;
  for (size_t k = 0; k < src.size(); ++k) {
    for (const at::Tensor* t : {&src[k], &dst[k]}) {
      if (t->sizes() != r.sizes() || t->stride(1) != 1) {
        return false;
      }
      packed = packed && t->stride(2) == t->size(1);
    }
  }
  return !packed;
}

void masked_copy(
    at::TensorList src,
    const at::Tensor& present,
    at::TensorList dst) {
  constexpr const char* op = "masked_copy";
  const int64_t M = static_cast<int64_t>(src.size());
  TORCH_CHECK(M >= 1, op, ": src must contain at least one tensor");
  TORCH_CHECK(
      static_cast<int64_t>(dst.size()) == M,
      op, ": dst must hold as many tensors as src (", M, "), got ",
      dst.size());
  TORCH_CHECK(present.defined(), op, ": present is undefined");
  TORCH_CHECK(
      present.dim() == 2 && present.size(1) == M,
      op, ": present must have shape (B, ", M, "), got ", present.sizes());
  const int64_t B = present.size(0);
  expect_tensor(op, "present", -1, present, at::kBool, {B, M});
  expect_contiguous(op, "present", present);
  int64_t bytes = 0;
  for (int64_t k = 0; k < M; ++k) {
    const auto shape = feature_shape(op, "src", k, src[k]);
    TORCH_CHECK(
        shape[0] == B,
        op, ": src", Idx{k}, " has batch size ", shape[0],
        " but present has ", B);
    expect_tensor(op, "src", k, src[k], src[k].scalar_type(), shape);
    expect_tensor(op, "dst", k, dst[k], src[k].scalar_type(), shape);
    bytes += dst[k].numel() * dst[k].element_size();
  }
  const bool stream = use_stream(bytes);
  const bool* pr = present.const_data_ptr<bool>();
  if (interleaved_layout(src, dst)) {
    for (int64_t k = 0; k < M; ++k) {
      at::assert_no_internal_overlap(dst[k]);
    }
    switch (src[0].element_size()) {
      case 2:
        return masked_copy_interleaved<uint16_t>(src, dst, pr, M);
      case 4:
        return masked_copy_interleaved<uint32_t>(src, dst, pr, M);
      case 8:
        return masked_copy_interleaved<uint64_t>(src, dst, pr, M);
      default:
        break;  // other element sizes take the per-modality path below
    }
  }
  for (int64_t k = 0; k < M; ++k) {
    const at::Tensor& s = src[k];
    const at::Tensor& d = dst[k];
    if (d.numel() == 0) {
      continue;
    }
    at::assert_no_internal_overlap(d);
    switch (s.element_size()) {
      case 1:
        masked_copy_one<uint8_t>(s, d, pr, M, k, stream);
        break;
      case 2:
        masked_copy_one<uint16_t>(s, d, pr, M, k, stream);
        break;
      case 4:
        masked_copy_one<uint32_t>(s, d, pr, M, k, stream);
        break;
      case 8:
        masked_copy_one<uint64_t>(s, d, pr, M, k, stream);
        break;
      case 16:
        masked_copy_one<Bits128>(s, d, pr, M, k, stream);
        break;
      default:
        TORCH_CHECK(
            false, op, ": unsupported element size ", s.element_size(),
            " of src", Idx{k});
    }
  }
}

} // namespace medmap_fast::cpu
