// Checks the CPU alignment kernels against float64 references built from
// ATen ops, over several memory layouts, all feature dtypes and presence
// masks with absent modalities (which hold NaN, so any read of them shows).
// Also checks that results are bitwise identical across thread counts, that
// outputs of absent modalities are exact zeros, that NaN in a kept gkl row
// reaches its loss, and that bad arguments are rejected.
//
// Exit status is nonzero if any check fails.

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
#include "../cpu/alignment_cpu.h"

namespace al = medmap_fast::cpu;

namespace {

using namespace medmap_fast::test;

double tol_of(at::ScalarType t) {
  return medmap_fast::test::tol_of(t, 2e-5);
}

// |got - want| <= tol * (|want| + scale), NaN only where want is NaN.
bool close(const at::Tensor& got, const at::Tensor& want, double tol, double scale = -1) {
  const at::Tensor g = got.to(at::kDouble);
  const at::Tensor w = want.to(at::kDouble);
  if (scale < 0) {
    scale = w.numel() > 0 ? w.abs().nan_to_num(0).max().item<double>() : 1.0;
  }
  const at::Tensor err = (g - w).abs();
  const at::Tensor ok = (err <= tol * (w.abs() + scale + 1)) | (g.isnan() & w.isnan());
  return ok.all().item<bool>();
}

// ---------------------------------------------------------------------------
// float64 references (same maths as tests/alignment_contract.py)

at::Tensor stack_kept(const std::vector<at::Tensor>& f, const at::Tensor& present) {
  at::Tensor s = at::stack(f, 1).to(at::kDouble);  // (B, M, C, S)
  return at::where(present.view({present.size(0), present.size(1), 1, 1}), s, at::zeros({}, s.options()));
}

at::Tensor anchor_of(const at::Tensor& f, const at::Tensor& coef) {
  return (coef.to(at::kDouble).unsqueeze(-1) * f).sum(1);
}

struct FeatCase {
  int64_t B, M, C, S;
  at::ScalarType dt;
  int layout;
  at::Tensor present, coef;
  std::vector<at::Tensor> feats;
  std::string tag;
};

FeatCase make_case(int64_t B, int64_t M, int64_t C, int64_t S, at::ScalarType dt, int l, double offset) {
  FeatCase fc{B, M, C, S, dt, l, {}, {}, {}, {}};
  fc.present = at::rand({B, M}) < 0.7;
  fc.present.select(0, 0).fill_(true);
  if (B > 1) {
    fc.present.select(0, 1).fill_(false);  // a sample with nothing present
  }
  const auto acc = at::TensorOptions().dtype(acc_of(dt));
  fc.coef = at::rand({B, M, C}, acc) * fc.present.unsqueeze(-1);
  for (int64_t k = 0; k < M; ++k) {
    at::Tensor x = (at::randn({B, C, S}, at::kDouble) + offset).to(dt);
    for (int64_t b = 0; b < B; ++b) {
      if (!fc.present[b][k].item<bool>()) {
        x.select(0, b).fill_(kNaN);
      }
    }
    fc.feats.push_back(with_layout(x, l));
  }
  fc.tag = "B=" + std::to_string(B) + " M=" + std::to_string(M) + " C=" + std::to_string(C) +
      " S=" + std::to_string(S) + " " + std::string(c10::toString(dt)) + " " + layout_name(l);
  return fc;
}

// Runs fn under 1 and 2 threads and returns whether every output matched.
bool same_across_threads(const std::function<std::vector<at::Tensor>()>& fn) {
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  const auto a = fn();
  at::set_num_threads(2);
  const auto b = fn();
  const auto c = fn();
  at::set_num_threads(saved);
  for (size_t i = 0; i < a.size(); ++i) {
    if (!bitwise_equal(a[i], b[i]) || !bitwise_equal(b[i], c[i])) {
      return false;
    }
  }
  return true;
}

bool absent_zero(const std::vector<at::Tensor>& g, const at::Tensor& present) {
  for (size_t k = 0; k < g.size(); ++k) {
    for (int64_t b = 0; b < present.size(0); ++b) {
      if (!present[b][k].item<bool>()) {
        const at::Tensor x = g[k].select(0, b);
        if (x.numel() > 0 && !(x.to(at::kDouble) == 0).all().item<bool>()) {
          return false;
        }
      }
    }
  }
  return true;
}

void test_anchor(const FeatCase& fc) {
  const double tol = tol_of(fc.dt);
  const auto acc = at::TensorOptions().dtype(acc_of(fc.dt));
  const at::Tensor f = stack_kept(fc.feats, fc.present);
  const at::Tensor a = anchor_of(f, fc.coef);
  const at::Tensor r = f - a.unsqueeze(1);
  const at::Tensor sq_ref = (r * r).sum(-1) * fc.present.unsqueeze(-1);

  auto fwd = [&] {
    at::Tensor sq = at::full({fc.B, fc.M, fc.C}, kNaN, acc);
    at::Tensor an = nan_out(fc.B, fc.C, fc.S, fc.dt, fc.layout);
    al::anchor_fwd(fc.feats, fc.coef, fc.present, sq, an);
    return std::vector<at::Tensor>{sq, an};
  };
  const auto out = fwd();
  check(close(out[0], sq_ref, tol), "anchor_fwd sq " + fc.tag);
  check(close(out[1], a, tol), "anchor_fwd anchor " + fc.tag);
  check(same_across_threads(fwd), "anchor_fwd deterministic " + fc.tag);

  const at::Tensor G = at::rand({fc.B, fc.M, fc.C}, acc);
  for (bool detach : {false, true}) {
    auto bwd = [&] {
      std::vector<at::Tensor> gf;
      for (int64_t k = 0; k < fc.M; ++k) {
        gf.push_back(nan_out(fc.B, fc.C, fc.S, fc.dt, fc.layout));
      }
      at::Tensor gc = at::full({fc.B, fc.M, fc.C}, kNaN, acc);
      al::anchor_bwd(fc.feats, fc.coef, fc.present, G, detach, gf, gc);
      gf.push_back(gc);
      return gf;
    };
    const auto g = bwd();
    const at::Tensor p = fc.present.view({fc.B, fc.M, 1, 1});
    const at::Tensor Gd = G.to(at::kDouble).unsqueeze(-1) * p;
    const at::Tensor da = detach ? at::zeros_like(a) : -2 * (Gd * r).sum(1);
    const at::Tensor gf_ref = (2 * Gd * r + fc.coef.to(at::kDouble).unsqueeze(-1) * da.unsqueeze(1)) * p;
    const at::Tensor gc_ref = (f * da.unsqueeze(1)).sum(-1) * fc.present.unsqueeze(-1);
    const std::string t = fc.tag + (detach ? " detach" : "");
    for (int64_t k = 0; k < fc.M; ++k) {
      check(close(g[k], gf_ref.select(1, k), tol), "anchor_bwd grad_feats " + t);
    }
    check(close(g[fc.M], gc_ref, tol), "anchor_bwd grad_coef " + t);
    check(absent_zero({g.begin(), g.begin() + fc.M}, fc.present), "anchor_bwd absent zeros " + t);
    check(same_across_threads(bwd), "anchor_bwd deterministic " + t);
  }
}

void test_moments(const FeatCase& fc, bool with_coef) {
  const double tol = tol_of(fc.dt);
  const auto acc = at::TensorOptions().dtype(acc_of(fc.dt));
  const int64_t K = fc.M + (with_coef ? 1 : 0);
  at::Tensor f = stack_kept(fc.feats, fc.present);
  const at::Tensor f_only = f;
  if (with_coef) {
    f = at::cat({f, anchor_of(f, fc.coef).unsqueeze(1)}, 1);
  }
  at::Tensor keep = at::ones({fc.B, K}, at::kBool);
  keep.narrow(1, 0, fc.M).copy_(fc.present);
  const at::Tensor mean_ref = f.mean(-1) * keep.unsqueeze(-1);
  const at::Tensor m2_ref = (f - f.mean(-1, true)).pow(2).sum(-1) * keep.unsqueeze(-1);
  const std::optional<at::Tensor> coef = with_coef ? std::optional<at::Tensor>(fc.coef) : std::nullopt;
  const std::string t = fc.tag + (with_coef ? " anchor" : "");

  auto fwd = [&] {
    at::Tensor mean = at::full({fc.B, K, fc.C}, kNaN, acc);
    at::Tensor m2 = at::full({fc.B, K, fc.C}, kNaN, acc);
    al::moments_fwd(fc.feats, coef, fc.present, mean, m2);
    return std::vector<at::Tensor>{mean, m2};
  };
  const auto out = fwd();
  check(close(out[0], mean_ref, tol), "moments_fwd mean " + t);
  // m2 is a sum over S of squared deviations: compare relative to its size.
  check(close(out[1], m2_ref, tol, static_cast<double>(fc.S)), "moments_fwd m2 " + t);
  check(same_across_threads(fwd), "moments_fwd deterministic " + t);

  const at::Tensor alpha = at::randn({fc.B, K, fc.C}, acc);
  const at::Tensor beta = at::randn({fc.B, K, fc.C}, acc);
  const at::Tensor mean = out[0];
  auto bwd = [&] {
    std::vector<at::Tensor> gf;
    for (int64_t k = 0; k < fc.M; ++k) {
      gf.push_back(nan_out(fc.B, fc.C, fc.S, fc.dt, fc.layout));
    }
    std::optional<at::Tensor> gc;
    if (with_coef) {
      gc = at::full({fc.B, fc.M, fc.C}, kNaN, acc);
    }
    al::moments_bwd(fc.feats, coef, fc.present, mean, alpha, beta, gf, gc);
    if (gc) {
      gf.push_back(*gc);
    }
    return gf;
  };
  const auto g = bwd();
  const at::Tensor md = mean.to(at::kDouble), ad = alpha.to(at::kDouble), bd = beta.to(at::kDouble);
  const at::Tensor p = fc.present.view({fc.B, fc.M, 1, 1});
  auto head = [&](const at::Tensor& x) { return x.narrow(1, 0, fc.M).unsqueeze(-1); };
  at::Tensor gf_ref = head(ad) + head(bd) * (f_only - head(md));
  if (with_coef) {
    const at::Tensor a = anchor_of(f_only, fc.coef);
    const at::Tensor da = ad.select(1, fc.M).unsqueeze(-1) +
        bd.select(1, fc.M).unsqueeze(-1) * (a - md.select(1, fc.M).unsqueeze(-1));
    gf_ref = gf_ref + fc.coef.to(at::kDouble).unsqueeze(-1) * da.unsqueeze(1);
    const at::Tensor gc_ref = (f_only * da.unsqueeze(1)).sum(-1) * fc.present.unsqueeze(-1);
    check(close(g[fc.M], gc_ref, tol), "moments_bwd grad_coef " + t);
  }
  gf_ref = gf_ref * p;
  for (int64_t k = 0; k < fc.M; ++k) {
    check(close(g[k], gf_ref.select(1, k), tol), "moments_bwd grad_feats " + t);
  }
  check(absent_zero({g.begin(), g.begin() + fc.M}, fc.present), "moments_bwd absent zeros " + t);
  check(same_across_threads(bwd), "moments_bwd deterministic " + t);
}

// ---------------------------------------------------------------------------
// Gaussian KL

void test_gkl(int64_t G, int64_t R, int64_t C, int64_t J, at::ScalarType dt, bool permuted, bool scalar_lv) {
  const double tol = tol_of(dt);
  const auto o = at::TensorOptions().dtype(dt);
  const auto acc = at::TensorOptions().dtype(acc_of(dt));
  at::Tensor mu = permuted ? at::randn({G, C, R}, o).permute({0, 2, 1}) : at::randn({G, R, C}, o);
  at::Tensor lv = scalar_lv ? at::full({}, 0.2, o).expand({G, R, C})
                            : (0.3 * at::randn({G, R, C}, at::kDouble)).to(dt);
  at::Tensor present = at::rand({G}) < 0.7;
  present[0] = true;
  if (G > 1) {
    present[1] = false;
    mu.select(0, 1).fill_(kNaN);  // dropped: must never be read
  }
  const at::Tensor nu = at::randn({J, C}, acc);
  const at::Tensor lt = 0.3 * at::randn({J, C}, acc);
  const at::Tensor logpi = at::log_softmax(at::randn({J}, acc), 0);
  const std::string t = "gkl G=" + std::to_string(G) + " R=" + std::to_string(R) + " C=" +
      std::to_string(C) + " J=" + std::to_string(J) + " " + c10::toString(dt) +
      (permuted ? " permuted" : "") + (scalar_lv ? " scalar-logvar" : "");

  // Reference (float64), with dropped rows zeroed before use.
  const at::Tensor keep = present.view({G, 1}).expand({G, R});
  const at::Tensor mud = at::where(present.view({G, 1, 1}), mu.to(at::kDouble), at::zeros({}, at::kDouble));
  const at::Tensor lvd = lv.to(at::kDouble).expand({G, R, C});
  const at::Tensor var = lvd.exp();
  const at::Tensor diff = mud.unsqueeze(-2) - nu.to(at::kDouble);
  const at::Tensor ltd = lt.to(at::kDouble);
  const at::Tensor kl = 0.5 * ((var.unsqueeze(-2) + diff * diff) * at::exp(-ltd) - 1 - lvd.unsqueeze(-2) + ltd).sum(-1);
  const at::Tensor z = logpi.to(at::kDouble) - kl;
  const at::Tensor zero = at::zeros({}, at::kDouble);
  const at::Tensor loss_ref = at::where(keep, -at::logsumexp(z, -1), zero);
  const at::Tensor resp_ref = at::where(keep.unsqueeze(-1), at::softmax(z, -1), zero);

  auto fwd = [&] {
    at::Tensor loss = at::full({G, R}, kNaN, acc);
    at::Tensor resp = at::full({G, R, J}, kNaN, acc);
    al::gkl_fwd(mu, lv, present, nu, lt, logpi, loss, resp);
    return std::vector<at::Tensor>{loss, resp};
  };
  const auto out = fwd();
  check(close(out[0], loss_ref, tol), "gkl_fwd loss " + t);
  check(close(out[1], resp_ref, tol), "gkl_fwd resp " + t);
  check(same_across_threads(fwd), "gkl_fwd deterministic " + t);

  const at::Tensor w = at::rand({G, R}, acc);
  auto bwd = [&] {
    at::Tensor gm = at::full({G, R, C}, kNaN, o);
    at::Tensor gl = at::full({G, C, R}, kNaN, o).permute({0, 2, 1});
    at::Tensor st = at::full({3, J, C}, kNaN, acc);
    al::gkl_bwd(mu, lv, present, nu, lt, out[1], w, gm, gl, st);
    return std::vector<at::Tensor>{gm, gl, st};
  };
  const auto g = bwd();
  const at::Tensor r = resp_ref;
  const at::Tensor wd = w.to(at::kDouble) * keep;
  const at::Tensor inv = at::exp(-ltd);
  const at::Tensor A = (r.unsqueeze(-1) * inv).sum(-2);
  const at::Tensor Bc = (r.unsqueeze(-1) * nu.to(at::kDouble) * inv).sum(-2);
  const at::Tensor gm_ref = wd.unsqueeze(-1) * (mud * A - Bc);
  const at::Tensor gl_ref = wd.unsqueeze(-1) * 0.5 * (var * A - 1);
  const at::Tensor wr = (wd.unsqueeze(-1) * r).unsqueeze(-1);
  const at::Tensor st_ref = at::stack({
      wr.expand({G, R, J, C}).sum({0, 1}), (wr * diff).sum({0, 1}),
      (wr * (diff * diff + var.unsqueeze(-2))).sum({0, 1})});
  check(close(g[0], gm_ref, tol), "gkl_bwd grad_mu " + t);
  check(close(g[1], gl_ref, tol), "gkl_bwd grad_logvar " + t);
  check(close(g[2], st_ref, tol, static_cast<double>(G * R)), "gkl_bwd stats " + t);
  if (G > 1) {
    check((g[0].select(0, 1).to(at::kDouble) == 0).all().item<bool>() &&
              (g[1].select(0, 1).to(at::kDouble) == 0).all().item<bool>(),
          "gkl_bwd dropped rows zero " + t);
  }
  check(same_across_threads(bwd), "gkl_bwd deterministic " + t);

  // NaN in a kept row reaches that row's loss and no other.
  at::Tensor mun = mu.clone();
  mun[0][0][0] = kNaN;
  at::Tensor loss = at::empty({G, R}, acc);
  al::gkl_fwd(mun, lv, present, nu, lt, logpi, loss, std::nullopt);
  check(std::isnan(loss[0][0].item<double>()), "gkl_fwd NaN propagates " + t);
  if (R > 1) {
    check(!std::isnan(loss[0][1].item<double>()), "gkl_fwd NaN stays in its row " + t);
  }
}

void test_errors() {
  const at::Tensor f = at::randn({2, 3, 10});
  const at::Tensor present = at::ones({2, 1}, at::kBool);
  bool threw = false;
  try {
    al::anchor_fwd({f}, at::zeros({2, 1, 3}, at::kDouble), present, at::zeros({2, 1, 3}), std::nullopt);
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "anchor_fwd rejects a coef of the wrong dtype");
  threw = false;
  try {
    al::moments_fwd({f}, std::nullopt, present, at::zeros({2, 2, 3}), at::zeros({2, 1, 3}));
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "moments_fwd rejects a mean of the wrong shape");
  threw = false;
  try {
    const at::Tensor mu = at::randn({2, 5, 3});
    al::gkl_bwd(mu, mu, std::nullopt, at::zeros({2, 3}), at::zeros({2, 3}), std::nullopt,
                at::ones({2, 5}), std::nullopt, std::nullopt, std::nullopt);
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "gkl_bwd requires resp when J > 1");
}

} // namespace

int main() {
  at::manual_seed(0);
  struct Shape {
    int64_t B, M, C, S;
  };
  const Shape shapes[] = {{2, 3, 5, 37}, {3, 4, 16, 5000}, {2, 2, 1, 300}, {2, 3, 70, 33}};
  for (const auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (int l = 0; l < kNumLayouts; ++l) {
      for (const auto& s : shapes) {
        const FeatCase fc = make_case(s.B, s.M, s.C, s.S, dt, l, 2.0);
        test_anchor(fc);
        test_moments(make_case(s.B, s.M, s.C, s.S, dt, l, 100.0), true);
        test_moments(fc, false);
      }
    }
    // Both the AVX2 code and the portable code (forced by the variable) run
    // on an AVX2 machine.
    for (const char* no_avx2 : {"0", "1"}) {
      setenv("MEDMAP_FAST_CPU_NO_AVX2", no_avx2, 1);
      for (bool perm : {false, true}) {
        for (bool scalar_lv : {false, true}) {
          test_gkl(3, 200, 16, 4, dt, perm, scalar_lv);
          test_gkl(2, 37, 5, 1, dt, perm, scalar_lv);
        }
      }
    }
    unsetenv("MEDMAP_FAST_CPU_NO_AVX2");
  }
  // Empty extents: sums are zero.
  {
    const at::Tensor f = at::randn({2, 3, 0});
    const at::Tensor present = at::ones({2, 1}, at::kBool);
    at::Tensor sq = at::full({2, 1, 3}, kNaN);
    al::anchor_fwd({f}, at::ones({2, 1, 3}), present, sq, std::nullopt);
    check((sq == 0).all().item<bool>(), "anchor_fwd S = 0 gives zeros");
    at::Tensor mean = at::full({2, 1, 3}, kNaN), m2 = at::full({2, 1, 3}, kNaN);
    al::moments_fwd({f}, std::nullopt, present, mean, m2);
    check((mean == 0).all().item<bool>() && (m2 == 0).all().item<bool>(), "moments_fwd S = 0 gives zeros");
  }
  test_errors();
  return medmap_fast::test::results().report();
}
