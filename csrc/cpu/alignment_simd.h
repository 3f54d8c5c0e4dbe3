#pragma once

// Vector helpers of the alignment kernels that need instructions beyond the
// SSE2 baseline the library is compiled for. Every function here carries its
// own target attribute and is only called after avx2_available() said yes,
// so the library still loads and runs on older x86 CPUs.

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEDMAP_FAST_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define MEDMAP_FAST_AVX2 __attribute__((target("avx2,fma")))
#else
#define MEDMAP_FAST_HAVE_AVX2_PATH 0
#define MEDMAP_FAST_AVX2
#endif

namespace medmap_fast::cpu::simd {

// True when the AVX2 + FMA code may run. MEDMAP_FAST_CPU_NO_AVX2=1 forces
// the portable code, so that tests can cover it on any machine; it is read
// on every call (a getenv is negligible next to a kernel) so a test can flip
// it within one process.
inline bool avx2_available() {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  static const bool cpu_has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!cpu_has) {
    return false;
  }
  const char* off = std::getenv("MEDMAP_FAST_CPU_NO_AVX2");
  return off == nullptr || off[0] == '\0' || off[0] == '0';
#else
  return false;
#endif
}

#if MEDMAP_FAST_HAVE_AVX2_PATH

// exp(x) for 8 floats, within about 1 ulp of the correctly rounded result
// over the whole float range, subnormal results included.
//
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) from its Taylor series to degree
// 7 (the truncation error, below 6e-9 relative, is under half an ulp), and
// the 2^n scaling applied as two factors so that n may leave the normal
// exponent range on either side: results round once into the subnormals and
// overflow cleanly to infinity. NaN inputs pass the clamps unchanged (the
// min/max intrinsics return their second operand when either is NaN) and
// come out NaN.
MEDMAP_FAST_AVX2 inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
  const __m256 n = _mm256_round_ps(
      _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split so that n * hi is exact for every n reached here.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// log(x) for 8 floats, within about 1 ulp, for x > 0 finite normal or
// subnormal, +inf -> +inf, 0 -> -inf, x < 0 or NaN -> NaN.
//
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(t) with
// t = (m - 1) / (m + 1), |t| < 0.1716, from the odd series to t^13 (the
// truncation error is below 1e-12 relative). log 2 is split in two parts so
// that e * hi is exact.
MEDMAP_FAST_AVX2 inline __m256 log_ps(__m256 x) {
  // Subnormals: scale into the normal range first.
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(
      x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);  // * 2^23
  const __m256 eadj = _mm256_and_ps(tiny, _mm256_set1_ps(23.0f));
  const __m256i bits = _mm256_castps_si256(xs);
  // Take the exponent relative to sqrt(1/2) so that m lands around 1.
  const __m256i off = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3));
  const __m256i ei = _mm256_srai_epi32(off, 23);
  const __m256i mbits = _mm256_sub_epi32(bits, _mm256_slli_epi32(ei, 23));
  const __m256 m = _mm256_castsi256_ps(mbits);
  const __m256 e = _mm256_sub_ps(_mm256_cvtepi32_ps(ei), eadj);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  const __m256 t2 = _mm256_mul_ps(t, t);
  __m256 p = _mm256_set1_ps(2.0f / 13.0f);
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 11.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 9.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 7.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 5.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 3.0f));
  p = _mm256_mul_ps(_mm256_mul_ps(p, t2), t);  // series beyond its first term
  // log x = e*hi + (2t + (p + e*lo)), summed small to large.
  __m256 y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), p);
  y = _mm256_add_ps(y, _mm256_add_ps(t, t));
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), y);
  // Special inputs: the bit tricks above do not produce these.
  const __m256 zero = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  y = _mm256_blendv_ps(y, _mm256_set1_ps(-__builtin_inff()),
                       _mm256_cmp_ps(x, zero, _CMP_EQ_OQ));
  y = _mm256_blendv_ps(y, inf, _mm256_cmp_ps(x, inf, _CMP_EQ_OQ));
  // x < 0 or NaN: NaN.
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_nanf("")),
                       _mm256_cmp_ps(x, zero, _CMP_NGE_UQ));
  return y;
}

#endif

} // namespace medmap_fast::cpu::simd
