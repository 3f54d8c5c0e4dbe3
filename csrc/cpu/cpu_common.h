#pragma once

// Small helpers shared by the CPU kernels: integer arithmetic for the work
// decomposition, argument checks, strided (B, C, S) views and non-temporal
// stores. Everything here is header-only and inline so that each kernel file
// still sees the bodies and vectorises them as before.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#define MEDMAP_FAST_CPU_SSE2 1
#else
#define MEDMAP_FAST_CPU_SSE2 0
#endif

#include <ATen/ATen.h>

namespace medmap_fast::cpu::common {

inline int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t pow2_floor(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) {
    p *= 2;
  }
  return p;
}

inline int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) {
    p *= 2;
  }
  return p;
}

// ---------------------------------------------------------------------------
// Argument checks

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

inline void check_tensor(
    const char* op,
    const char* name,
    const at::Tensor& t,
    at::ScalarType dtype,
    at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
      t.device());
  TORCH_CHECK(
      t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
      ", got ", t.scalar_type());
  TORCH_CHECK(
      t.sizes() == sizes, op, ": ", name, " must have shape ", sizes,
      ", got ", t.sizes());
}

inline void check_small(
    const char* op,
    const char* name,
    const at::Tensor& t,
    at::ScalarType dtype,
    at::IntArrayRef sizes) {
  check_tensor(op, name, t, dtype, sizes);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// ---------------------------------------------------------------------------
// Strided (B, C, S) views

template <typename T>
struct View {
  T* p;
  int64_t sb, sc, ss;
};

template <typename T>
View<const T> in_view(const at::Tensor& t) {
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1),
          t.stride(2)};
}

template <typename T>
View<T> out_view(const at::Tensor& t) {
  return {static_cast<T*>(t.mutable_data_ptr()), t.stride(0), t.stride(1),
          t.stride(2)};
}

// A stride along a dimension of extent 1 is never used, so such dimensions
// count as unit-stride for layout selection.
inline bool unit_s(const at::Tensor& t) {
  return t.size(2) <= 1 || t.stride(2) == 1;
}

inline bool unit_c(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1;
}

// ---------------------------------------------------------------------------
// Non-temporal stores. A plain store first reads the line it writes into,
// which for an output far larger than the caches is a wasted read of every
// byte written. The values written are identical either way; a task that
// streamed ends with a store fence so that its data is ordered before the
// task is seen as finished.

inline void stream_fence(bool stream) {
#if MEDMAP_FAST_CPU_SSE2
  if (stream) {
    _mm_sfence();
  }
#else
  (void)stream;
#endif
}

// Copies n elements, streaming float32/float64 runs of at least 256 bytes
// whose destination can reach 16-byte alignment.
template <typename T>
inline void copy_run(T* __restrict__ d, const T* __restrict__ s, int64_t n, bool stream) {
#if MEDMAP_FAST_CPU_SSE2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int64_t w = 16 / sizeof(T);
    const uintptr_t mis = reinterpret_cast<uintptr_t>(d) & 15;
    if (stream && n * int64_t(sizeof(T)) >= 256 && mis % sizeof(T) == 0) {
      const int64_t head = std::min<int64_t>(n, ((16 - mis) & 15) / sizeof(T));
      int64_t i = 0;
      for (; i < head; ++i) {
        d[i] = s[i];
      }
      for (; i + w <= n; i += w) {
        if constexpr (std::is_same_v<T, float>) {
          _mm_stream_ps(d + i, _mm_loadu_ps(s + i));
        } else {
          _mm_stream_pd(d + i, _mm_loadu_pd(s + i));
        }
      }
      for (; i < n; ++i) {
        d[i] = s[i];
      }
      return;
    }
  }
#endif
  (void)stream;
  std::memcpy(static_cast<void*>(d), static_cast<const void*>(s), n * sizeof(T));
}

template <typename T>
inline void zero_run(T* __restrict__ d, int64_t n, bool stream) {
#if MEDMAP_FAST_CPU_SSE2
  const uintptr_t mis = reinterpret_cast<uintptr_t>(d) & 15;
  if (stream && n * int64_t(sizeof(T)) >= 256 && mis % sizeof(T) == 0) {
    char* c = reinterpret_cast<char*>(d);
    const int64_t nb = n * int64_t(sizeof(T));
    const int64_t head = std::min<int64_t>(nb, (16 - mis) & 15);
    std::memset(c, 0, head);
    int64_t i = head;
    const __m128i z = _mm_setzero_si128();
    for (; i + 16 <= nb; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(c + i), z);
    }
    std::memset(c + i, 0, nb - i);
    return;
  }
#endif
  (void)stream;
  std::memset(static_cast<void*>(d), 0, n * sizeof(T));
}

} // namespace medmap_fast::cpu::common
