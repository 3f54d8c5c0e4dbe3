// Checks the CPU fusion kernels against references built from ATen ops in
// double precision, over odd sizes, several memory layouts, all feature
// dtypes and presence masks with none / one / all / mixed modalities present.
// Also checks that results are bitwise identical across thread counts and
// with or without non-temporal stores, that absent modalities are never read
// (they hold NaN), that outputs are written everywhere (they start as NaN)
// and nowhere else, and that bad arguments are rejected.
//
// Exit status is nonzero if any check fails.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "test_common.h"
#include "../cpu/masked_fusion_cpu.h"

namespace mf = medmap_fast::cpu;

namespace {

using medmap_fast::test::Results;

// ---------------------------------------------------------------------------
// Layouts of a (B, C, S) tensor. Each is a view into a base allocation that
// may be larger than the view, so stray writes can be detected.

enum Layout {
  kNcsContig,   // NCDHW-like contiguous
  kNcsStacked,  // slice of a stacked (B, M, C, S) buffer
  kNcsSlice,    // channel slice of a wider (B, C', S) tensor
  kClDense,     // channels_last_3d-like
  kClStacked,   // channels-last slice of (B, M, S, C): packed rows, big batch stride
  kClSlice,     // channel slice of a wider channels-last tensor: row stride > C
  kStepS,       // every other element along s
  kPermuted,    // unit stride along b only
  kNumLayouts
};

const char* layout_name(Layout l) {
  static const char* names[] = {
      "ncs", "ncs-stacked", "ncs-slice", "cl", "cl-stacked", "cl-slice",
      "step-s", "permuted"};
  return names[l];
}

enum Family { kFamNcs, kFamCl, kFamMixed };

const char* family_name(Family f) {
  static const char* names[] = {"NCS", "channels-last", "mixed"};
  return names[f];
}

Layout pick_layout(Family f, std::mt19937& rng) {
  switch (f) {
    case kFamNcs:
      return static_cast<Layout>(kNcsContig + rng() % 3);
    case kFamCl:
      return static_cast<Layout>(kClDense + rng() % 3);
    default:
      return static_cast<Layout>(rng() % kNumLayouts);
  }
}

struct Strided {
  at::Tensor base;
  at::Tensor view;
};

Strided make_strided(
    Layout l, int64_t B, int64_t C, int64_t S, at::ScalarType dt) {
  const auto o = at::TensorOptions().dtype(dt);
  at::Tensor base;
  at::Tensor view;
  switch (l) {
    case kNcsContig:
      base = at::empty({B, C, S}, o);
      view = base;
      break;
    case kNcsStacked:
      base = at::empty({B, 3, C, S}, o);
      view = base.select(1, 1);
      break;
    case kNcsSlice:
      base = at::empty({B, C + 5, S}, o);
      view = base.narrow(1, 2, C);
      break;
    case kClDense:
      base = at::empty({B, S, C}, o);
      view = base.permute({0, 2, 1});
      break;
    case kClStacked:
      base = at::empty({B, 3, S, C}, o);
      view = base.select(1, 1).permute({0, 2, 1});
      break;
    case kClSlice:
      base = at::empty({B, S, C + 5}, o);
      view = base.narrow(2, 2, C).permute({0, 2, 1});
      break;
    case kStepS:
      base = at::empty({B, C, 2 * S}, o);
      view = base.slice(2, 0, 2 * S, 2);
      break;
    default:
      base = at::empty({C, S, B}, o);
      view = base.permute({2, 0, 1});
      break;
  }
  return {base, view};
}

double nan_value() {
  return std::numeric_limits<double>::quiet_NaN();
}

bool is_floating(at::ScalarType dt) {
  return at::isFloatingType(dt);
}

void fill_sentinel(const at::Tensor& t) {
  if (is_floating(t.scalar_type())) {
    t.fill_(nan_value());
  } else if (t.scalar_type() == at::kBool) {
    t.fill_(true);
  } else {
    t.fill_(77);
  }
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return false;
  }
  const at::Tensor ca = a.contiguous();
  const at::Tensor cb = b.contiguous();
  return std::memcmp(
             ca.const_data_ptr(), cb.const_data_ptr(),
             ca.numel() * ca.element_size()) == 0;
}

// A set of output views over one or more base allocations, pre-filled with a
// sentinel so that both missed and stray writes show up.
struct Outputs {
  std::vector<at::Tensor> bases;
  std::vector<at::Tensor> views;
  std::vector<at::Tensor> before;

  void arm() {
    before.clear();
    for (const auto& b : bases) {
      fill_sentinel(b);
      before.push_back(b.clone());
    }
  }

  // True when nothing outside the views changed.
  bool outside_untouched() const {
    for (size_t i = 0; i < bases.size(); ++i) {
      at::Tensor now = bases[i].clone();
      at::Tensor was = before[i].clone();
      for (const auto& v : views) {
        if (v.storage().is_alias_of(bases[i].storage())) {
          now.as_strided(v.sizes(), v.strides(), v.storage_offset()).zero_();
          was.as_strided(v.sizes(), v.strides(), v.storage_offset()).zero_();
        }
      }
      if (!bitwise_equal(now, was)) {
        return false;
      }
    }
    return true;
  }
};

// Output views for one (B, C, S) result per modality: slices of one stacked
// buffer with a spare slot (as a Python caller would allocate them), in the
// NCS or channels-last layout, or separate tensors of the family's layouts.
Outputs make_modality_outputs(
    Family fam,
    int64_t B,
    int64_t M,
    int64_t C,
    int64_t S,
    at::ScalarType dt,
    std::mt19937& rng) {
  Outputs o;
  const auto opt = at::TensorOptions().dtype(dt);
  const bool stacked = fam != kFamMixed && rng() % 2 == 0;
  if (stacked && fam == kFamNcs) {
    at::Tensor base = at::empty({B, M + 1, C, S}, opt);
    o.bases.push_back(base);
    for (int64_t k = 0; k < M; ++k) {
      o.views.push_back(base.select(1, k));
    }
  } else if (stacked) {
    at::Tensor base = at::empty({B, S, M + 1, C}, opt);
    o.bases.push_back(base);
    for (int64_t k = 0; k < M; ++k) {
      o.views.push_back(base.select(2, k).permute({0, 2, 1}));
    }
  } else {
    for (int64_t k = 0; k < M; ++k) {
      Strided s = make_strided(pick_layout(fam, rng), B, C, S, dt);
      o.bases.push_back(s.base);
      o.views.push_back(s.view);
    }
  }
  return o;
}

// Destinations of a zero-filled channel concatenation: channel slices of one
// (B, M*C + 2, S) tensor in the NCS or channels-last layout, or separate
// tensors of the family's layouts.
Outputs make_concat_outputs(
    Family fam,
    int64_t B,
    int64_t M,
    int64_t C,
    int64_t S,
    at::ScalarType dt,
    std::mt19937& rng) {
  Outputs o;
  const auto opt = at::TensorOptions().dtype(dt);
  const bool sliced = fam != kFamMixed && rng() % 2 == 0;
  if (sliced && fam == kFamNcs) {
    at::Tensor base = at::empty({B, M * C + 2, S}, opt);
    o.bases.push_back(base);
    for (int64_t k = 0; k < M; ++k) {
      o.views.push_back(base.narrow(1, 1 + k * C, C));
    }
  } else if (sliced) {
    at::Tensor base = at::empty({B, S, M * C + 2}, opt);
    o.bases.push_back(base);
    for (int64_t k = 0; k < M; ++k) {
      o.views.push_back(base.narrow(2, 1 + k * C, C).permute({0, 2, 1}));
    }
  } else {
    return make_modality_outputs(fam, B, M, C, S, dt, rng);
  }
  return o;
}

Outputs make_single_output(
    Family fam,
    int64_t B,
    int64_t C,
    int64_t S,
    at::ScalarType dt,
    std::mt19937& rng) {
  Strided s = make_strided(pick_layout(fam, rng), B, C, S, dt);
  Outputs o;
  o.bases.push_back(s.base);
  o.views.push_back(s.view);
  return o;
}

// ---------------------------------------------------------------------------
// Masks

enum MaskMode { kNone, kOne, kAll, kMixed };

const char* mask_name(MaskMode m) {
  static const char* names[] = {"none", "one", "all", "mixed"};
  return names[m];
}

at::Tensor make_mask(int64_t B, int64_t M, MaskMode mode, std::mt19937& rng) {
  at::Tensor p = at::zeros({B, M}, at::kBool);
  bool* d = p.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    // Mixed masks give each sample its own pattern, covering the other
    // modes within one batch; the first sample gets a random subset.
    static const MaskMode cycle[] = {kMixed, kOne, kAll, kNone};
    const MaskMode pattern = mode == kMixed ? cycle[b % 4] : mode;
    for (int64_t k = 0; k < M; ++k) {
      bool v = false;
      if (pattern == kAll) {
        v = true;
      } else if (pattern == kMixed) {
        v = rng() % 2 == 0;
      }
      d[b * M + k] = v;
    }
    if (pattern == kOne) {
      d[b * M + static_cast<int64_t>(rng() % M)] = true;
    }
  }
  return p;
}

bool mask_at(const at::Tensor& present, int64_t b, int64_t k) {
  return present.const_data_ptr<bool>()[b * present.size(1) + k];
}

// ---------------------------------------------------------------------------
// Tolerances

double unit_roundoff(at::ScalarType dt) {
  switch (dt) {
    case at::kHalf:
      return std::ldexp(1.0, -11);
    case at::kBFloat16:
      return std::ldexp(1.0, -8);
    case at::kFloat:
      return std::ldexp(1.0, -24);
    default:
      return std::ldexp(1.0, -53);
  }
}

double tiny_for(at::ScalarType dt) {
  // Half results below its normal range lose relative precision.
  return dt == at::kHalf ? 1e-7 : 1e-300;
}

// |got - ref| <= rel_mag * mag + rel_ref * |ref| + tiny, and got finite.
bool close_to(
    const at::Tensor& got,
    const at::Tensor& ref,
    const at::Tensor& mag,
    double rel_mag,
    double rel_ref,
    double tiny,
    std::string* why) {
  const at::Tensor g = got.to(at::kDouble);
  if (!at::isfinite(g).all().item<bool>()) {
    *why = "non-finite values";
    return false;
  }
  const at::Tensor err = (g - ref).abs();
  const at::Tensor tol = mag * rel_mag + ref.abs() * rel_ref + tiny;
  const at::Tensor excess = err - tol;
  const double worst = excess.numel() ? excess.max().item<double>() : -1.0;
  if (worst > 0) {
    *why = "max error " + std::to_string(err.max().item<double>()) +
        " exceeds tolerance";
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------
// One randomised case

struct Size {
  int64_t B, M, C, S;
};

struct RunConfig {
  int threads;
  int64_t stream_min_bytes;  // negative: library default
  const char* name;
};

const RunConfig kConfigs[] = {
    {1, -1, "1 thread"},
    {2, 0, "2 threads, streaming stores"},
    {2, -1, "2 threads"},
};

// Results of one run, copied out for bitwise comparison between configs.
struct RunOutputs {
  at::Tensor out;
  std::vector<at::Tensor> gf;
  at::Tensor gc;
  std::vector<at::Tensor> gf_nocoef;
  std::vector<at::Tensor> copied;
};

void run_case(
    Results& res,
    const Size& sz,
    at::ScalarType dt,
    Family fam,
    MaskMode mm,
    std::mt19937& rng) {
  const int64_t B = sz.B, M = sz.M, C = sz.C, S = sz.S;
  const at::ScalarType adt = dt == at::kDouble ? at::kDouble : at::kFloat;
  char label[256];
  std::snprintf(
      label, sizeof(label), "B=%lld M=%lld C=%lld S=%lld %s %s mask=%s",
      static_cast<long long>(B), static_cast<long long>(M),
      static_cast<long long>(C), static_cast<long long>(S),
      c10::toString(dt), family_name(fam), mask_name(mm));
  const std::string name(label);

  // Inputs. Absent modalities are NaN: reading them would poison results.
  const at::Tensor present = make_mask(B, M, mm, rng);
  std::vector<at::Tensor> feats;
  std::string layouts;
  for (int64_t k = 0; k < M; ++k) {
    const Layout l = pick_layout(fam, rng);
    layouts += std::string(k ? "," : "") + layout_name(l);
    at::Tensor f = make_strided(l, B, C, S, dt).view;
    f.copy_(at::rand({B, C, S}, at::kDouble) * 2 - 1);
    for (int64_t b = 0; b < B; ++b) {
      if (!mask_at(present, b, k)) {
        f.select(0, b).fill_(nan_value());
      }
    }
    feats.push_back(f);
  }
  const at::Tensor coef = at::rand({B, M, C}, adt) * 2 - 1;
  at::Tensor grad = make_strided(pick_layout(fam, rng), B, C, S, dt).view;
  grad.copy_(at::rand({B, C, S}, at::kDouble) * 2 - 1);
  const std::string tag = name + " feats=[" + layouts + "]";

  // Double-precision references.
  const at::Tensor gd = grad.to(at::kDouble);
  at::Tensor ref_out = at::zeros({B, C, S}, at::kDouble);
  at::Tensor mag_out = at::zeros({B, C, S}, at::kDouble);
  std::vector<at::Tensor> ref_gf;
  std::vector<at::Tensor> ref_src;
  at::Tensor ref_gc = at::zeros({B, M, C}, at::kDouble);
  at::Tensor mag_gc = at::zeros({B, M, C}, at::kDouble);
  for (int64_t k = 0; k < M; ++k) {
    const at::Tensor mask = present.select(1, k).view({B, 1, 1});
    const at::Tensor fk = at::where(mask, feats[k].to(at::kDouble), 0.0);
    const at::Tensor ck = coef.select(1, k).to(at::kDouble).unsqueeze(-1);
    ref_out += ck * fk;
    mag_out += ck.abs() * fk.abs();
    ref_gf.push_back(at::where(mask, ck * gd, 0.0));
    ref_gc.select(1, k).copy_((fk * gd).sum(-1));
    mag_gc.select(1, k).copy_((fk.abs() * gd.abs()).sum(-1));
    ref_src.push_back(at::where(mask, feats[k], at::zeros({}, dt)));
  }

  const double u_out = unit_roundoff(dt);
  const double u_acc = unit_roundoff(adt);
  const double tiny = tiny_for(dt);

  RunOutputs first;
  for (size_t ci = 0; ci < sizeof(kConfigs) / sizeof(kConfigs[0]); ++ci) {
    const RunConfig& cfg = kConfigs[ci];
    at::set_num_threads(cfg.threads);
    mf::set_nontemporal_min_bytes(cfg.stream_min_bytes);
    const std::string ctag = tag + " [" + cfg.name + "]";
    RunOutputs cur;

    // Forward.
    Outputs out = make_single_output(fam, B, C, S, dt, rng);
    out.arm();
    mf::fuse_sum_fwd(feats, coef, present, out.views[0]);
    cur.out = out.views[0].clone();

    // Backward with and without grad_coef.
    Outputs gf = make_modality_outputs(fam, B, M, C, S, dt, rng);
    gf.arm();
    at::Tensor gc = at::full({B, M, C}, nan_value(), adt);
    mf::fuse_sum_bwd(grad, feats, coef, present, gf.views, gc);
    for (const auto& v : gf.views) {
      cur.gf.push_back(v.clone());
    }
    cur.gc = gc.clone();

    Outputs gf2 = make_modality_outputs(fam, B, M, C, S, dt, rng);
    gf2.arm();
    mf::fuse_sum_bwd(grad, feats, coef, present, gf2.views, std::nullopt);
    for (const auto& v : gf2.views) {
      cur.gf_nocoef.push_back(v.clone());
    }

    // Masked copy into a zero-filled concatenation.
    Outputs cat = make_concat_outputs(fam, B, M, C, S, dt, rng);
    cat.arm();
    mf::masked_copy(feats, present, cat.views);
    for (const auto& v : cat.views) {
      cur.copied.push_back(v.clone());
    }

    res.check(out.outside_untouched(), ctag + ": fwd wrote outside out");
    res.check(gf.outside_untouched(), ctag + ": bwd wrote outside grad_feats");
    res.check(gf2.outside_untouched(), ctag + ": bwd (no coef) wrote outside grad_feats");
    res.check(cat.outside_untouched(), ctag + ": masked_copy wrote outside dst");

    if (ci == 0) {
      // The message is built after the comparison, which fills in `why`.
      std::string why;
      bool ok = close_to(
          cur.out, ref_out, mag_out, (M + 1) * u_acc, 2 * u_out, tiny, &why);
      res.check(ok, ctag + ": fwd " + why);
      const at::Tensor zero = at::zeros({B, C, S}, at::kDouble);
      for (int64_t k = 0; k < M; ++k) {
        const std::string ks = "[" + std::to_string(k) + "]";
        why.clear();
        ok = close_to(cur.gf[k], ref_gf[k], zero, 0.0, 2 * u_out, tiny, &why);
        res.check(ok, ctag + ": bwd grad_feats" + ks + " " + why);
        res.check(
            bitwise_equal(cur.gf[k], cur.gf_nocoef[k]),
            ctag + ": bwd grad_feats" + ks +
                " differs with and without grad_coef");
        res.check(
            bitwise_equal(cur.copied[k], ref_src[k]),
            ctag + ": masked_copy dst" + ks);
      }
      why.clear();
      // The blocked sum over s has a worst-case error far below this for
      // the tested sizes; a dropped or doubled term is well above it.
      ok = close_to(cur.gc, ref_gc, mag_gc, 512 * u_acc, 0.0, 1e-300, &why);
      res.check(ok, ctag + ": bwd grad_coef " + why);
      first = cur;
    } else {
      bool same = bitwise_equal(cur.out, first.out) &&
          bitwise_equal(cur.gc, first.gc);
      for (int64_t k = 0; k < M; ++k) {
        same = same && bitwise_equal(cur.gf[k], first.gf[k]) &&
            bitwise_equal(cur.gf_nocoef[k], first.gf_nocoef[k]) &&
            bitwise_equal(cur.copied[k], first.copied[k]);
      }
      res.check(same, ctag + ": results differ bitwise from the 1-thread run");
    }
  }
  mf::set_nontemporal_min_bytes(-1);
}

// ---------------------------------------------------------------------------
// Special cases

bool throws_mentioning(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    if (msg.find(needle) == std::string::npos) {
      std::printf("  (message was: %s)\n", e.msg().c_str());
      return false;
    }
    return true;
  }
  return false;
}

void run_validation_tests(Results& res) {
  const int64_t B = 2, M = 3, C = 4, S = 5;
  std::vector<at::Tensor> feats;
  for (int64_t k = 0; k < M; ++k) {
    feats.push_back(at::rand({B, C, S}));
  }
  const at::Tensor coef = at::rand({B, M, C});
  const at::Tensor present = at::ones({B, M}, at::kBool);
  const at::Tensor out = at::empty({B, C, S});
  std::vector<at::Tensor> gfs;
  for (int64_t k = 0; k < M; ++k) {
    gfs.push_back(at::empty({B, C, S}));
  }
  const at::Tensor gc = at::empty({B, M, C});

  res.check(
      throws_mentioning([&] { mf::fuse_sum_fwd({}, coef, present, out); }, "feats"),
      "fwd rejects an empty feats list");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_fwd(
                {feats[0], feats[1], feats[2].to(at::kDouble)}, coef, present, out);
          },
          "feats[2]"),
      "fwd rejects mixed feature dtypes");
  res.check(
      throws_mentioning(
          [&] {
            std::vector<at::Tensor> f = {at::ones({B, C, S}, at::kInt)};
            mf::fuse_sum_fwd(f, coef.narrow(1, 0, 1).contiguous(),
                             present.narrow(1, 0, 1).contiguous(),
                             at::empty({B, C, S}, at::kInt));
          },
          "feats"),
      "fwd rejects integer features");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd({feats[0], feats[1], at::rand({B, C, S + 1})}, coef, present, out); },
          "feats[2]"),
      "fwd rejects mismatched feature shapes");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, coef.to(at::kDouble), present, out); }, "coef"),
      "fwd rejects a float64 coef for float32 features");
  res.check(
      throws_mentioning(
          [&] {
            const at::Tensor t = at::rand({B, C, M}).transpose(1, 2);
            mf::fuse_sum_fwd(feats, t, present, out);
          },
          "coef"),
      "fwd rejects a non-contiguous coef");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, at::rand({B, M + 1, C}), present, out); }, "coef"),
      "fwd rejects a coef with the wrong number of modalities");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, coef, at::ones({B, M}, at::kByte), out); },
          "present"),
      "fwd rejects a non-bool present");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, coef, at::ones({B, M + 1}, at::kBool), out); },
          "present"),
      "fwd rejects a present of the wrong shape");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, coef, present, at::empty({B, C, S + 1})); }, "out"),
      "fwd rejects an out of the wrong shape");
  res.check(
      throws_mentioning(
          [&] { mf::fuse_sum_fwd(feats, coef, present, at::empty({B, C, S}, at::kDouble)); },
          "out"),
      "fwd rejects an out of the wrong dtype");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_fwd(
                feats, coef, present, at::empty({1, C, S}).expand({B, C, S}));
          },
          "overlap"),
      "fwd rejects an out with internal overlap");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_bwd(
                out, feats, coef, present, {gfs[0], gfs[1]}, std::nullopt);
          },
          "coef"),
      "bwd rejects grad_feats that disagree with coef on M");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_bwd(out, {feats[0], feats[1]}, coef, present, gfs, gc);
          },
          "feats"),
      "bwd rejects a feats list of the wrong length when grad_coef is given");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_bwd(
                out, feats, coef, present, gfs,
                std::optional<at::Tensor>(at::empty({B, M, C + 1})));
          },
          "grad_coef"),
      "bwd rejects a grad_coef of the wrong shape");
  res.check(
      throws_mentioning(
          [&] {
            mf::fuse_sum_bwd(
                out, feats, coef, present, {gfs[0], gfs[1], at::empty({B, C, S}, at::kHalf)},
                std::nullopt);
          },
          "grad_feats[2]"),
      "bwd rejects grad_feats of the wrong dtype");
  res.check(
      throws_mentioning(
          [&] { mf::masked_copy(feats, present, {gfs[0], gfs[1]}); }, "dst"),
      "masked_copy rejects a dst list of the wrong length");
  res.check(
      throws_mentioning(
          [&] {
            mf::masked_copy(feats, present, {gfs[0], gfs[1], at::empty({B, C + 1, S})});
          },
          "dst[2]"),
      "masked_copy rejects a dst of the wrong shape");
  res.check(
      throws_mentioning(
          [&] { mf::masked_copy(feats, at::ones({B + 1, M}, at::kBool), gfs); }, "src[0]"),
      "masked_copy rejects a batch size that disagrees with present");
}

void run_edge_tests(Results& res, std::mt19937& rng) {
  // Without grad_coef the features are not needed at all.
  {
    const int64_t B = 2, M = 3, C = 5, S = 9;
    const at::Tensor grad = at::rand({B, C, S});
    const at::Tensor coef = at::rand({B, M, C});
    const at::Tensor present = make_mask(B, M, kMixed, rng);
    std::vector<at::Tensor> gfs;
    for (int64_t k = 0; k < M; ++k) {
      gfs.push_back(at::full({B, C, S}, nan_value()));
    }
    mf::fuse_sum_bwd(grad, {}, coef, present, gfs, std::nullopt);
    bool ok = true;
    for (int64_t k = 0; k < M; ++k) {
      const at::Tensor ref = at::where(
          present.select(1, k).view({B, 1, 1}),
          coef.select(1, k).unsqueeze(-1) * grad, 0.0f);
      ok = ok && bitwise_equal(gfs[k], ref);
    }
    res.check(ok, "bwd without grad_coef accepts an empty feats list");
  }
  // The coefficients of absent modalities are never used: NaN there (a weight
  // computed from that modality's garbage) must leave every output as with 0.
  {
    const int64_t B = 2, M = 3, C = 4, S = 37;
    const at::Tensor present = at::tensor({1, 0, 1, 0, 1, 1}).to(at::kBool).view({B, M});
    const at::Tensor absent = present.logical_not().unsqueeze(-1);
    const at::Tensor coef0 = at::where(absent, 0.0f, at::rand({B, M, C}));
    const at::Tensor coefn = at::where(absent, static_cast<float>(nan_value()), coef0);
    const at::Tensor grad = at::rand({B, C, S});
    std::vector<at::Tensor> feats;
    for (int64_t k = 0; k < M; ++k) {
      feats.push_back(at::rand({B, C, S}));
    }
    std::vector<at::Tensor> outs[2];
    int i = 0;
    for (const at::Tensor& coef : {coef0, coefn}) {
      at::Tensor out = at::full({B, C, S}, nan_value());
      mf::fuse_sum_fwd(feats, coef, present, out);
      std::vector<at::Tensor> gfs;
      for (int64_t k = 0; k < M; ++k) {
        gfs.push_back(at::full({B, C, S}, nan_value()));
      }
      at::Tensor gc = at::full({B, M, C}, nan_value());
      mf::fuse_sum_bwd(grad, feats, coef, present, gfs, gc);
      outs[i] = {out, gc};
      outs[i].insert(outs[i].end(), gfs.begin(), gfs.end());
      ++i;
    }
    bool ok = true;
    for (size_t j = 0; j < outs[0].size(); ++j) {
      ok = ok && bitwise_equal(outs[0][j], outs[1][j]) && outs[1][j].isfinite().all().item<bool>();
    }
    res.check(ok, "NaN coefficients of absent modalities change no output");
  }
  // Empty extents.
  {
    const int64_t B = 2, M = 3, C = 4;
    std::vector<at::Tensor> feats;
    std::vector<at::Tensor> gfs;
    for (int64_t k = 0; k < M; ++k) {
      feats.push_back(at::empty({B, C, 0}));
      gfs.push_back(at::empty({B, C, 0}));
    }
    const at::Tensor coef = at::rand({B, M, C});
    const at::Tensor present = at::ones({B, M}, at::kBool);
    at::Tensor gc = at::full({B, M, C}, nan_value());
    mf::fuse_sum_fwd(feats, coef, present, at::empty({B, C, 0}));
    mf::fuse_sum_bwd(at::empty({B, C, 0}), feats, coef, present, gfs, gc);
    mf::masked_copy(feats, present, gfs);
    res.check(
        gc.eq(0).all().item<bool>(), "bwd with S == 0 gives a zero grad_coef");
  }
  // masked_copy is dtype-agnostic.
  for (const at::ScalarType dt : {at::kBool, at::kByte, at::kShort, at::kInt, at::kLong,
                                  at::kComplexFloat, at::kComplexDouble}) {
    const int64_t B = 3, M = 2, C = 3, S = 11;
    const at::Tensor present = make_mask(B, M, kMixed, rng);
    std::vector<at::Tensor> src;
    std::vector<at::Tensor> dst;
    bool ok = true;
    for (int64_t k = 0; k < M; ++k) {
      src.push_back((at::rand({B, C, S}) * 100).to(dt));
      dst.push_back(make_strided(pick_layout(kFamMixed, rng), B, C, S, dt).view);
      fill_sentinel(dst.back());
    }
    mf::masked_copy(src, present, dst);
    for (int64_t k = 0; k < M; ++k) {
      const at::Tensor ref = at::where(
          present.select(1, k).view({B, 1, 1}), src[k], at::zeros({}, dt));
      ok = ok && bitwise_equal(dst[k], ref);
    }
    res.check(ok, std::string("masked_copy of ") + c10::toString(dt));
  }
}

} // namespace

int main() {
  at::manual_seed(20240611);
  std::mt19937 rng(7);
  Results res;

  run_validation_tests(res);
  run_edge_tests(res, rng);

  // Sizes straddle the kernels' internal blocking: runs of 2048 and 16384
  // along s, channels-last tiles of about 512 elements and slabs of about
  // 16384, more modalities than one fused group of 4, and channel counts
  // above one tile.
  const Size sizes[] = {
      {1, 1, 1, 1},
      {2, 3, 5, 7},
      {3, 4, 16, 2053},
      {2, 5, 17, 1000},
      {1, 9, 3, 6000},
      {2, 2, 600, 60},
      {2, 4, 16, 16461},
      {3, 6, 7, 129},
  };
  const at::ScalarType dtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  const Family families[] = {kFamNcs, kFamCl, kFamMixed};
  int rotate = 0;
  for (const Size& sz : sizes) {
    for (const at::ScalarType dt : dtypes) {
      for (const Family fam : families) {
        run_case(res, sz, dt, fam, kMixed, rng);
        run_case(res, sz, dt, fam, static_cast<MaskMode>(rotate++ % 3), rng);
      }
    }
  }

  return res.report();
}
