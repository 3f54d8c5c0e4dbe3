// Checks the CPU norm + activation kernels against a float64 loop reference
// written straight from the formulas of norm_act_cpu.h, over several memory
// layouts, all data dtypes, every residual mode and several slopes; both the
// AVX2 and the portable code; plain and non-temporal stores; both work
// schedules (group tasks and phases, which must agree bit for bit); results
// bitwise identical across thread counts; and rejected arguments.
//
// Exit status is nonzero if any check fails.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "test_common.h"
#include "../cpu/masked_fusion_cpu.h"
#include "../cpu/norm_act_cpu.h"

namespace na = medmap_fast::cpu;

namespace {

using namespace medmap_fast::test;

// Error allowed relative to the scale of a result: the storage rounding of
// the output plus float32 arithmetic on well-conditioned sums.
double tol_of(at::ScalarType t) {
  return medmap_fast::test::tol_of(t, 1e-4);
}

std::vector<double> values(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + d.numel());
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) {
    m = std::max(m, std::abs(x));
  }
  return m;
}

// |got - want| <= tol * (|want| + scale) everywhere (NaN fails).
bool close(const at::Tensor& got, const std::vector<double>& want, double tol, double scale) {
  const std::vector<double> g = values(got);
  if (g.size() != want.size()) {
    return false;
  }
  for (size_t i = 0; i < g.size(); ++i) {
    if (!(std::abs(g[i] - want[i]) <= tol * (std::abs(want[i]) + scale))) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// Reference, in double, from the contract's formulas.

struct Ref {
  std::vector<double> y, mean, rstd;
  std::vector<double> dx, dres, dweight, dbias;
};

void ref_fwd(
    const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& bias,
    const std::vector<double>* r, int64_t B, int64_t C, int64_t S, int64_t G, double slope,
    int mode, double eps, Ref& out) {
  const int64_t cg = C / G;
  out.y.assign(B * C * S, 0);
  out.mean.assign(B * G, 0);
  out.rstd.assign(B * G, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const double* p = x.data() + (b * C + g * cg) * S;
      const int64_t n = cg * S;
      double s = 0;
      for (int64_t i = 0; i < n; ++i) {
        s += p[i];
      }
      const double mu = s / n;
      double v = 0;
      for (int64_t i = 0; i < n; ++i) {
        v += (p[i] - mu) * (p[i] - mu);
      }
      out.mean[b * G + g] = mu;
      out.rstd[b * G + g] = 1.0 / std::sqrt(v / n + eps);
    }
    for (int64_t c = 0; c < C; ++c) {
      const double mu = out.mean[b * G + c / cg];
      const double rs = out.rstd[b * G + c / cg];
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (b * C + c) * S + s;
        double z = (x[i] - mu) * rs * w[c] + bias[c];
        if (mode == 1) {
          z += (*r)[i];
        }
        double y = z > 0 ? z : slope * z;
        if (mode == 2) {
          y += (*r)[i];
        }
        out.y[i] = y;
      }
    }
  }
}

void ref_bwd(
    const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& bias,
    const std::vector<double>* r, const std::vector<double>& dy, const std::vector<double>& mean,
    const std::vector<double>& rstd, int64_t B, int64_t C, int64_t S, int64_t G, double slope,
    int mode, Ref& out) {
  const int64_t cg = C / G;
  const int64_t n = B * C * S;
  out.dx.assign(n, 0);
  out.dres.assign(n, 0);
  out.dweight.assign(C, 0);
  out.dbias.assign(C, 0);
  std::vector<double> g(n), xh(n);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (b * C + c) * S + s;
        xh[i] = (x[i] - mean[b * G + c / cg]) * rstd[b * G + c / cg];
        double z = xh[i] * w[c] + bias[c];
        if (mode == 1) {
          z += (*r)[i];
        }
        g[i] = dy[i] * (z > 0 ? 1.0 : slope);
        out.dres[i] = g[i];
        out.dbias[c] += g[i];
        out.dweight[c] += g[i] * xh[i];
      }
    }
    for (int64_t gr = 0; gr < G; ++gr) {
      double m1 = 0, m2 = 0;
      for (int64_t c = gr * cg; c < (gr + 1) * cg; ++c) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (b * C + c) * S + s;
          m1 += g[i] * w[c];
          m2 += g[i] * w[c] * xh[i];
        }
      }
      m1 /= static_cast<double>(cg * S);
      m2 /= static_cast<double>(cg * S);
      for (int64_t c = gr * cg; c < (gr + 1) * cg; ++c) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (b * C + c) * S + s;
          out.dx[i] = rstd[b * G + gr] * (g[i] * w[c] - m1 - xh[i] * m2);
        }
      }
    }
  }
}

struct Case {
  int64_t B, C, S, G;
  at::ScalarType dt;
  int layout;
  int mode;
  double slope;
  bool with_dres;
  std::string tag;
};

struct Inputs {
  at::Tensor x, w, bias, r, dy;
};

Inputs make_inputs(const Case& k) {
  const auto acc = at::TensorOptions().dtype(acc_of(k.dt));
  Inputs in;
  // Far from zero, so that a variance formula that cancels would show.
  in.x = with_layout((at::randn({k.B, k.C, k.S}, at::kDouble) * 50 + 100).to(k.dt), k.layout);
  in.w = at::randn({k.C}, acc);
  in.bias = at::randn({k.C}, acc);
  if (k.mode != 0) {
    in.r = with_layout(at::randn({k.B, k.C, k.S}, at::kDouble).to(k.dt), k.layout);
  }
  // act' jumps at z' = 0: where z' is within rounding of zero, the kernel and
  // the float64 reference may take different sides, so dy is zero there.
  Ref zr;
  const std::vector<double> rv = k.mode != 0 ? values(in.r) : std::vector<double>();
  ref_fwd(values(in.x), values(in.w), values(in.bias), k.mode != 0 ? &rv : nullptr, k.B, k.C, k.S,
          k.G, 1.0, k.mode == 1 ? 1 : 0, 1e-5, zr);
  const double zmax = max_abs(zr.y);
  at::Tensor dy = at::randn({k.B, k.C, k.S}, at::kDouble);
  double* d = dy.mutable_data_ptr<double>();
  for (size_t i = 0; i < zr.y.size(); ++i) {
    if (std::abs(zr.y[i]) < 1e-4 * zmax) {
      d[i] = 0;
    }
  }
  in.dy = with_layout(dy.to(k.dt), k.layout);
  return in;
}

struct Outputs {
  at::Tensor y, mean, rstd, dx, dres, dweight, dbias;
};

Outputs run(const Case& k, const Inputs& in) {
  const auto acc = at::TensorOptions().dtype(acc_of(k.dt));
  Outputs o;
  o.y = nan_out(k.B, k.C, k.S, k.dt, k.layout);
  o.mean = at::full({k.B, k.G}, kNaN, acc);
  o.rstd = at::full({k.B, k.G}, kNaN, acc);
  const std::optional<at::Tensor> r = k.mode != 0 ? std::optional<at::Tensor>(in.r) : std::nullopt;
  na::norm_act_fwd(in.x, in.w, in.bias, r, o.y, o.mean, o.rstd, k.G, k.slope, k.mode, 1e-5);
  o.dx = nan_out(k.B, k.C, k.S, k.dt, k.layout);
  std::optional<at::Tensor> dres;
  if (k.mode == 1 && k.with_dres) {
    o.dres = nan_out(k.B, k.C, k.S, k.dt, (k.layout + 1) % kNumLayouts);
    dres = o.dres;
  }
  o.dweight = at::full({k.C}, kNaN, acc);
  o.dbias = at::full({k.C}, kNaN, acc);
  const std::optional<at::Tensor> rb = k.mode == 1 ? r : std::nullopt;
  na::norm_act_bwd(
      in.x, in.w, in.bias, rb, in.dy, o.mean, o.rstd, o.dx, dres, o.dweight, o.dbias, k.G,
      k.slope, k.mode);
  return o;
}

void test_case(const Case& k) {
  const Inputs in = make_inputs(k);
  const Outputs o = run(k, in);
  const double tol = tol_of(k.dt);
  const std::vector<double> x = values(in.x), w = values(in.w), bias = values(in.bias);
  const std::vector<double> dy = values(in.dy);
  std::vector<double> r;
  if (k.mode != 0) {
    r = values(in.r);
  }
  Ref ref;
  ref_fwd(x, w, bias, k.mode != 0 ? &r : nullptr, k.B, k.C, k.S, k.G, k.slope, k.mode, 1e-5, ref);
  check(close(o.mean, ref.mean, tol_of(acc_of(k.dt)) * 0.1, 0), k.tag + ": mean");
  check(close(o.rstd, ref.rstd, tol_of(acc_of(k.dt)) * 0.1, 0), k.tag + ": rstd");
  // Terms of y are O(1) (w, bias, xhat, residual ~ randn): when they cancel
  // in every element of a tiny case, max |y| understates the scale.
  check(close(o.y, ref.y, tol, std::max(max_abs(ref.y), 1.0)), k.tag + ": y");

  // The backward reference starts from the kernel's statistics, as the
  // kernel does.
  ref_bwd(x, w, bias, k.mode != 0 ? &r : nullptr, dy, values(o.mean), values(o.rstd), k.B, k.C,
          k.S, k.G, k.slope, k.mode, ref);
  // dx is a difference of terms of size rstd * |g w|; with few voxels per
  // group it cancels to almost nothing, so measure it against those terms.
  const double gw = max_abs(dy) * max_abs(w) * max_abs(values(o.rstd));
  check(close(o.dx, ref.dx, tol, std::max(max_abs(ref.dx), gw)), k.tag + ": dx");
  check(close(o.dbias, ref.dbias, tol, max_abs(ref.dbias) + max_abs(dy)), k.tag + ": dbias");
  check(close(o.dweight, ref.dweight, tol, max_abs(ref.dweight) + max_abs(dy)), k.tag + ": dweight");
  if (o.dres.defined()) {
    check(close(o.dres, ref.dres, tol, max_abs(ref.dres)), k.tag + ": dres");
  }
}

std::vector<at::Tensor> all_outputs(const Outputs& o) {
  std::vector<at::Tensor> v = {o.y, o.mean, o.rstd, o.dx, o.dweight, o.dbias};
  if (o.dres.defined()) {
    v.push_back(o.dres);
  }
  return v;
}

// 1 thread, then 2 threads twice: every output bitwise equal. With B * G = 3
// one thread runs group tasks and two threads run phases, so this also pins
// the two schedules to the same bits.
void test_threads(const Case& k) {
  const Inputs in = make_inputs(k);
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  const auto a = all_outputs(run(k, in));
  at::set_num_threads(2);
  const auto b = all_outputs(run(k, in));
  const auto c = all_outputs(run(k, in));
  at::set_num_threads(saved);
  bool same = true;
  for (size_t i = 0; i < a.size(); ++i) {
    same = same && bitwise_equal(a[i], b[i]) && bitwise_equal(b[i], c[i]);
  }
  check(same, k.tag + ": bitwise equal across thread counts and runs");
}

// y may be x itself: every element is read before it is overwritten.
void test_in_place(at::ScalarType dt, int layout) {
  const Case k{2, 6, 3000, 3, dt, layout, 0, 0.1, false, "in-place"};
  const Inputs in = make_inputs(k);
  const Outputs o = run(k, in);
  at::Tensor xy = in.x.clone();
  if (layout != kNcs) {
    xy = with_layout(in.x, layout);
  }
  const auto acc = at::TensorOptions().dtype(acc_of(dt));
  at::Tensor mean = at::empty({2, 3}, acc), rstd = at::empty({2, 3}, acc);
  na::norm_act_fwd(xy, in.w, in.bias, std::nullopt, xy, mean, rstd, 3, 0.1, 0, 1e-5);
  check(bitwise_equal(xy, o.y), std::string("y aliasing x, ") + layout_name(layout));
}

template <typename F>
void expect_error(F f, const std::string& what) {
  bool threw = false;
  try {
    f();
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, what);
}

void test_errors() {
  const at::Tensor x = at::randn({2, 6, 10});
  const at::Tensor w = at::ones({6}), b = at::zeros({6});
  const at::Tensor mean = at::empty({2, 3}), rstd = at::empty({2, 3});
  at::Tensor y = at::empty_like(x);
  expect_error(
      [&] { na::norm_act_fwd(x, w.to(at::kDouble), b, std::nullopt, y, mean, rstd, 3, 0, 0, 1e-5); },
      "fwd rejects a weight of the wrong dtype");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, std::nullopt, y, mean, rstd, 4, 0, 0, 1e-5); },
      "fwd rejects groups that do not divide C");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, x, y, mean, rstd, 3, 0, 0, 1e-5); },
      "fwd rejects a residual in mode 0");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, std::nullopt, y, mean, rstd, 3, 0, 2, 1e-5); },
      "fwd requires a residual in mode 2");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, std::nullopt, y, mean, rstd, 3, 0, 3, 1e-5); },
      "fwd rejects residual_mode 3");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, std::nullopt, y, at::empty({2, 6}), rstd, 3, 0, 0, 1e-5); },
      "fwd rejects a mean of the wrong shape");
  expect_error(
      [&] {
        na::norm_act_fwd(x, at::ones({12}).slice(0, 0, 12, 2), b, std::nullopt, y, mean, rstd, 3, 0,
                         0, 1e-5);
      },
      "fwd rejects a non-contiguous weight");
  expect_error(
      [&] { na::norm_act_fwd(x, w, b, std::nullopt, y.to(at::kHalf), mean, rstd, 3, 0, 0, 1e-5); },
      "fwd rejects a y of another dtype");
  expect_error(
      [&] {
        const at::Tensor buf = at::randn({121});
        na::norm_act_fwd(buf.narrow(0, 1, 120).view({2, 6, 10}), w, b, std::nullopt,
                         buf.narrow(0, 0, 120).view({2, 6, 10}), mean, rstd, 3, 0, 0, 1e-5);
      },
      "fwd rejects a y that partly overlaps x");
  at::Tensor dx = at::empty_like(x);
  const at::Tensor dw = at::empty({6}), db = at::empty({6});
  expect_error(
      [&] { na::norm_act_bwd(x, w, b, x, x, mean, rstd, dx, std::nullopt, dw, db, 3, 0, 2); },
      "bwd rejects a residual in mode 2");
  expect_error(
      [&] { na::norm_act_bwd(x, w, b, std::nullopt, x, mean, rstd, dx, dx.clone(), dw, db, 3, 0, 0); },
      "bwd rejects dres outside mode 1");
  expect_error(
      [&] { na::norm_act_bwd(x, w, b, x, x, mean, rstd, dx, dx, dw, db, 3, 0, 1); },
      "bwd rejects dres aliasing dx");
  expect_error(
      [&] {
        na::norm_act_bwd(x, w, b, std::nullopt, x, mean, rstd, dx, std::nullopt, at::empty({5}), db,
                         3, 0, 0);
      },
      "bwd rejects a dweight of the wrong shape");
  expect_error(
      [&] {
        na::norm_act_bwd(x, w, b, std::nullopt, x.to(at::kDouble), mean, rstd, dx, std::nullopt, dw,
                         db, 3, 0, 0);
      },
      "bwd rejects a dy of another dtype");
}

std::string tag_of(const Case& k, const char* extra) {
  return "B=" + std::to_string(k.B) + " C=" + std::to_string(k.C) + " S=" + std::to_string(k.S) +
      " G=" + std::to_string(k.G) + " " + std::string(c10::toString(k.dt)) + " " +
      layout_name(k.layout) + " mode=" + std::to_string(k.mode) + " slope=" +
      std::to_string(k.slope) + (k.with_dres ? " dres" : "") + extra;
}

} // namespace

int main() {
  at::manual_seed(0);
  struct Shape {
    int64_t B, C, S, G;
  };
  // Instance norm, group norm with several channels per group, layer norm
  // (G = 1), single voxels, a lone channel, many channels (lane windows with
  // ragged ends), and a group too large for group tasks.
  const Shape shapes[] = {{2, 16, 3000, 16}, {3, 30, 1111, 10}, {1, 30, 257, 1}, {2, 4, 1, 2},
                          {1, 1, 5000, 1},   {2, 300, 23, 3},   {1, 2, 700000, 1}};
  const double slopes[] = {0.0, 0.01, 0.2, 1.0};
  int variant = 0;
  for (const char* no_avx2 : {"0", "1"}) {
    setenv("MEDMAP_FAST_CPU_NO_AVX2", no_avx2, 1);
    const char* extra = no_avx2[0] == '1' ? " portable" : "";
    for (const auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      for (int l = 0; l < kNumLayouts; ++l) {
        for (const auto& s : shapes) {
          if (s.S > 100000 && (l != kNcs || dt == at::kBFloat16)) {
            continue;  // the large case only needs to reach the phase schedule once per dtype
          }
          // Modes, slopes and dres cycle with different periods, so that each
          // meets every shape, layout and dtype somewhere.
          ++variant;
          Case k{s.B, s.C, s.S, s.G, dt, l, variant % 3, slopes[variant % 4], variant % 5 < 3, ""};
          k.tag = tag_of(k, extra);
          test_case(k);
        }
      }
    }
  }
  unsetenv("MEDMAP_FAST_CPU_NO_AVX2");

  // Non-temporal stores for everything, on float32/float64 (the only dtypes
  // streamed), including outputs whose rows are not 16-byte aligned.
  na::set_nontemporal_min_bytes(0);
  for (const auto dt : {at::kFloat, at::kDouble}) {
    for (int l : {kNcs, kCl, kNcsSlice}) {
      for (int mode = 0; mode < 3; ++mode) {
        Case k{3, 30, 1111, 10, dt, l, mode, 0.2, true, ""};
        k.tag = tag_of(k, " streamed");
        test_case(k);
      }
    }
  }
  na::set_nontemporal_min_bytes(-1);

  for (const auto dt : {at::kFloat, at::kHalf, at::kDouble}) {
    for (int l : {kNcs, kCl, kStepS}) {
      Case k{3, 8, 9000, 1, dt, l, 1, 0.01, true, ""};
      k.tag = tag_of(k, " threads");
      test_threads(k);
      Case k2{2, 16, 5000, 16, dt, l, 0, 0.0, false, ""};
      k2.tag = tag_of(k2, " threads");
      test_threads(k2);
    }
    test_in_place(dt, kNcs);
    test_in_place(dt, kCl);
  }

  test_errors();
  return medmap_fast::test::results().report();
}
