#pragma once

// Harness shared by the C++ tests of the CPU kernels: pass/fail counting,
// the summary line and the exit status (nonzero if any check fails).

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include <ATen/ATen.h>

namespace medmap_fast::test {

struct Results {
  int passed = 0;
  int failed = 0;

  void check(bool ok, const std::string& what) {
    if (ok) {
      ++passed;
    } else {
      ++failed;
      std::printf("FAIL: %s\n", what.c_str());
    }
  }

  // Prints the summary and returns the process exit status.
  int report() const {
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
  }
};

// The results of tests that record through the free check() below.
inline Results& results() {
  static Results r;
  return r;
}

inline void check(bool ok, const std::string& what) {
  results().check(ok, what);
}

inline const double kNaN = std::numeric_limits<double>::quiet_NaN();

// Accumulation dtype of the kernels for data of dtype t.
inline at::ScalarType acc_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Error allowed relative to the scale of a result: the storage rounding of
// the output plus accumulation-type arithmetic. float32's share depends on
// how long the kernel's sums are, so each test gives its own.
inline double tol_of(at::ScalarType t, double float_tol) {
  switch (t) {
    case at::kDouble:
      return 1e-10;
    case at::kFloat:
      return float_tol;
    case at::kHalf:
      return 2e-3;
    default:
      return 1.6e-2;
  }
}

inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ca = a.contiguous();
  const at::Tensor cb = b.contiguous();
  return a.sizes() == b.sizes() &&
      std::memcmp(ca.const_data_ptr(), cb.const_data_ptr(), ca.numel() * ca.element_size()) == 0;
}

// ---------------------------------------------------------------------------
// Layouts

enum Layout { kNcs, kCl, kNcsSlice, kClSlice, kStepS, kNumLayouts };
inline const char* layout_name(int l) {
  static const char* n[] = {"ncs", "cl", "ncs-slice", "cl-slice", "step-s"};
  return n[l];
}

// A (B, C, S) view with the given layout holding the values of x; the
// padding around views holds NaN so that a stray read shows.
inline at::Tensor with_layout(const at::Tensor& x, int l) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  const auto o = x.options();
  switch (l) {
    case kNcs:
      return x.clone();
    case kCl:
      return x.permute({0, 2, 1}).contiguous().permute({0, 2, 1});
    case kNcsSlice: {
      at::Tensor v = at::full({B, C + 3, S}, kNaN, o).narrow(1, 1, C);
      v.copy_(x);
      return v;
    }
    case kClSlice: {
      at::Tensor v = at::full({B, S, C + 3}, kNaN, o).narrow(2, 2, C).permute({0, 2, 1});
      v.copy_(x);
      return v;
    }
    default: {
      at::Tensor v = at::full({B, C, 2 * S}, kNaN, o).slice(2, 0, 2 * S, 2);
      v.copy_(x);
      return v;
    }
  }
}

inline at::Tensor nan_out(int64_t B, int64_t C, int64_t S, at::ScalarType dt, int l) {
  return with_layout(at::full({B, C, S}, kNaN, at::TensorOptions().dtype(dt)), l);
}

} // namespace medmap_fast::test
