#include "alignment_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "alignment_simd.h"
#include "cpu_common.h"
#include "masked_fusion_cpu.h"

namespace medmap_fast::cpu {

namespace {

using namespace common;

// ---------------------------------------------------------------------------
// Work decomposition of the (B, C, S) kernels.
//
// Work is cut into items whose extent depends only on the shape. Each item
// is processed chunk by chunk: the chunk's elements of every input are made
// available as a contiguous array of the accumulation type (in place for
// float32/float64 data that is already contiguous, otherwise converted into
// L1-resident scratch), the maths runs on those arrays, and results are
// written back through the outputs' strides. Reductions go into "lanes":
// element i of a chunk adds into lane i % L, so the inner loops vectorise
// without reassociating any sum; lanes are folded in a fixed tree order, per
// item partial results are stored, and items are combined in index order.
// Nothing depends on the thread count.
//
// Two tilings:
//  * S-inner (voxels unit stride, and the fallback for arbitrary strides):
//    an item is a run of kItemChunks * kChunk voxels of one (b, c); one lane
//    period (P = 1), all lanes fold into one value.
//  * C-inner (channels unit stride): an item is a block of voxel rows of one
//    sample, element i of a chunk is channel i % C, so lanes come in P = C
//    periods and fold into one value per channel.
constexpr int64_t kChunk = 2048;
constexpr int64_t kItemChunks = 8;
constexpr int64_t kLaneTarget = 256;

// ---------------------------------------------------------------------------
// Argument checks

void check_float_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(
      t == at::kFloat || t == at::kDouble || t == at::kHalf ||
          t == at::kBFloat16,
      op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
      t);
}

void check_out(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() > 0) {
    TORCH_CHECK(
        at::has_internal_overlap(t) != at::MemOverlap::Yes,
        op, ": ", name, " must not have overlapping elements");
  }
}

struct Dims {
  int64_t B, M, C, S;
  at::ScalarType dtype;
};

// Checks the modality list and returns its shape; every tensor of the list
// shares shape and dtype.
Dims check_feats(const char* op, at::TensorList feats) {
  TORCH_CHECK(!feats.empty(), op, ": feats must contain at least one tensor");
  const at::Tensor& f0 = feats[0];
  TORCH_CHECK(f0.defined(), op, ": feats[0] is undefined");
  TORCH_CHECK(
      f0.dim() == 3, op, ": feats must be 3-D (B, C, S), got shape ",
      f0.sizes());
  const at::ScalarType dt = f0.scalar_type();
  check_float_dtype(op, "feats", dt);
  for (size_t k = 0; k < feats.size(); ++k) {
    const std::string name = "feats[" + std::to_string(k) + "]";
    check_tensor(op, name.c_str(), feats[k], dt, f0.sizes());
  }
  return {f0.size(0), static_cast<int64_t>(feats.size()), f0.size(1),
          f0.size(2), dt};
}

void check_grad_feats(const char* op, at::TensorList g, const Dims& d) {
  TORCH_CHECK(
      static_cast<int64_t>(g.size()) == d.M,
      op, ": grad_feats must hold one tensor per modality (", d.M, "), got ",
      g.size());
  for (size_t k = 0; k < g.size(); ++k) {
    const std::string name = "grad_feats[" + std::to_string(k) + "]";
    check_tensor(op, name.c_str(), g[k], d.dtype, {d.B, d.C, d.S});
    check_out(op, name.c_str(), g[k]);
  }
}

// ---------------------------------------------------------------------------
// Element access

template <typename A, typename T>
inline A up(T v) {
  return static_cast<A>(v);
}

template <typename T, typename A>
inline T down(A v) {
  return static_cast<T>(v);
}

struct Tiling {
  bool c_inner;
  int64_t B, C, S;
  int64_t P;       // lane period
  int64_t R;       // lane rows (power of two)
  int64_t L;       // lanes = R * P
  int64_t step;    // voxels (S-inner) or rows (C-inner) per chunk
  int64_t per_item;  // voxels or rows per item
  int64_t nseg;    // items along s
  int64_t nitems;
  int64_t maxn;    // most elements in one chunk

  int64_t chunk_elems(int64_t rows) const {
    return c_inner ? rows * C : rows;
  }
};

Tiling make_tiling(bool c_inner, int64_t B, int64_t C, int64_t S) {
  Tiling t{};
  t.c_inner = c_inner;
  t.B = B;
  t.C = C;
  t.S = S;
  if (!c_inner) {
    t.P = 1;
    t.R = kLaneTarget;
    t.step = kChunk;
    t.maxn = std::max<int64_t>(1, std::min(S, kChunk));
  } else {
    const int64_t rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
    t.P = std::max<int64_t>(C, 1);
    t.R = std::min(pow2_ceil(divup(kLaneTarget, t.P)), pow2_floor(rows));
    t.step = rows;
    t.maxn = rows * t.P;
  }
  t.L = t.R * t.P;
  t.per_item = t.step * kItemChunks;
  t.nseg = divup(S, t.per_item);
  t.nitems = c_inner ? B * t.nseg : B * C * t.nseg;
  return t;
}

struct Item {
  int64_t b, c, s0, s1;
};

inline Item decode(const Tiling& t, int64_t it) {
  Item r;
  const int64_t seg = it % t.nseg;
  if (t.c_inner) {
    r.b = it / t.nseg;
    r.c = 0;
  } else {
    r.c = (it / t.nseg) % t.C;
    r.b = it / t.nseg / t.C;
  }
  r.s0 = seg * t.per_item;
  r.s1 = std::min(t.S, r.s0 + t.per_item);
  return r;
}

// Index of the first of the P partial values of (item, k) with K slots.
inline int64_t part_base(const Tiling& t, int64_t it, int64_t k, int64_t K) {
  return (it * K + k) * t.P;
}

// Index of partial (b, k, c) of segment seg.
inline int64_t part_index(
    const Tiling& t, int64_t b, int64_t k, int64_t c, int64_t seg, int64_t K) {
  if (t.c_inner) {
    return ((b * t.nseg + seg) * K + k) * t.C + c;
  }
  return ((b * t.C + c) * t.nseg + seg) * K + k;
}

// The chunk's elements as a contiguous accumulation-type array: in place when
// the data already is one, otherwise converted into buf.
template <typename A, typename T>
const A* load_chunk(
    const View<const T>& v, const Tiling& t, int64_t b, int64_t c, int64_t s0,
    int64_t rows, A* __restrict__ buf) {
  if (!t.c_inner) {
    const T* __restrict__ p = v.p + b * v.sb + c * v.sc + s0 * v.ss;
    if (v.ss == 1 || rows == 1) {
      if constexpr (std::is_same_v<T, A>) {
        return p;
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          buf[i] = up<A>(p[i]);
        }
      }
    } else {
      for (int64_t i = 0; i < rows; ++i) {
        buf[i] = up<A>(p[i * v.ss]);
      }
    }
    return buf;
  }
  const int64_t C = t.C;
  const T* __restrict__ p = v.p + b * v.sb + s0 * v.ss;
  const bool unit = v.sc == 1 || C == 1;
  if (unit && (v.ss == C || rows == 1)) {
    if constexpr (std::is_same_v<T, A>) {
      return p;
    } else {
      const int64_t n = rows * C;
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = up<A>(p[i]);
      }
      return buf;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ q = p + r * v.ss;
    A* __restrict__ d = buf + r * C;
    if (unit) {
      for (int64_t cc = 0; cc < C; ++cc) {
        d[cc] = up<A>(q[cc]);
      }
    } else {
      for (int64_t cc = 0; cc < C; ++cc) {
        d[cc] = up<A>(q[cc * v.sc]);
      }
    }
  }
  return buf;
}

// Non-temporal stores for large outputs: a plain store first reads the line
// it writes into, which for an output far larger than the caches is a
// wasted read of every byte written. Only float32/float64 results are
// streamed; the values are identical either way.
bool use_stream(int64_t bytes) {
  return MEDMAP_FAST_CPU_SSE2 && bytes >= nontemporal_min_bytes();
}

// Writes a chunk of results (contiguous, accumulation type) through the
// output's strides, rounding once to the storage type.
template <typename T, typename A>
void store_chunk(
    const View<T>& v, const Tiling& t, int64_t b, int64_t c, int64_t s0,
    int64_t rows, const A* __restrict__ src, bool stream) {
  int64_t n;
  int64_t ld;
  int64_t runs;
  int64_t inner_stride;
  T* p;
  if (!t.c_inner) {
    p = v.p + b * v.sb + c * v.sc + s0 * v.ss;
    inner_stride = rows == 1 ? 1 : v.ss;
    n = rows;
    runs = 1;
    ld = 0;
  } else {
    p = v.p + b * v.sb + s0 * v.ss;
    inner_stride = t.C == 1 ? 1 : v.sc;
    if (inner_stride == 1 && (v.ss == t.C || rows == 1)) {
      n = rows * t.C;
      runs = 1;
      ld = 0;
    } else {
      n = t.C;
      runs = rows;
      ld = v.ss;
    }
  }
  for (int64_t r = 0; r < runs; ++r) {
    T* __restrict__ d = p + r * ld;
    const A* __restrict__ s = src + r * n;
    if (inner_stride == 1) {
      if constexpr (std::is_same_v<T, A>) {
        copy_run(d, s, n, stream);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          d[i] = down<T>(s[i]);
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        d[i * inner_stride] = down<T>(s[i]);
      }
    }
  }
}

template <typename T>
void zero_chunk(
    const View<T>& v, const Tiling& t, int64_t b, int64_t c, int64_t s0,
    int64_t rows, bool stream) {
  if (!t.c_inner) {
    T* p = v.p + b * v.sb + c * v.sc + s0 * v.ss;
    if (v.ss == 1 || rows == 1) {
      zero_run(p, rows, stream);
    } else {
      for (int64_t i = 0; i < rows; ++i) {
        p[i * v.ss] = T(0);
      }
    }
    return;
  }
  T* p = v.p + b * v.sb + s0 * v.ss;
  const bool unit = v.sc == 1 || t.C == 1;
  if (unit && (v.ss == t.C || rows == 1)) {
    zero_run(p, rows * t.C, stream);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* q = p + r * v.ss;
    if (unit) {
      zero_run(q, t.C, false);
    } else {
      for (int64_t cc = 0; cc < t.C; ++cc) {
        q[cc * v.sc] = T(0);
      }
    }
  }
}

// Per-lane copy of per-channel values vals[0..C) of one (b, k): lane j holds
// the value of the element channel it sees.
template <typename A>
void expand(const Tiling& t, const A* vals, int64_t c, A* out) {
  if (t.P == 1) {
    std::fill(out, out + t.L, vals[t.c_inner ? 0 : c]);
  } else {
    for (int64_t r = 0; r < t.R; ++r) {
      std::copy(vals, vals + t.P, out + r * t.P);
    }
  }
}

// Folds L lanes into their first P in a fixed tree order.
template <typename A>
void fold(const Tiling& t, A* __restrict__ lane) {
  for (int64_t h = t.R / 2; h >= 1; h /= 2) {
    const int64_t n = h * t.P;
    A* __restrict__ hi = lane + n;
    for (int64_t j = 0; j < n; ++j) {
      lane[j] += hi[j];
    }
  }
}

// The elementwise loops below are also compiled for AVX2 and picked at load
// time where the CPU has it: twice the width for the same instructions per
// element. Only the vector width differs (no FMA contraction, and every sum
// is per element or per lane), so both versions give identical bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEDMAP_FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEDMAP_FAST_CLONES inline
#endif

// ---------------------------------------------------------------------------
// Elementwise loops over one lane window (m <= L elements). Coefficient
// arrays are lane-expanded; the __restrict__ parameters let gcc vectorise
// without runtime alias checks.

template <typename A>
MEDMAP_FAST_CLONES void w_mul(int64_t m, A* __restrict__ y, const A* __restrict__ w, const A* __restrict__ x) {
  for (int64_t j = 0; j < m; ++j) {
    y[j] = w[j] * x[j];
  }
}

template <typename A>
MEDMAP_FAST_CLONES void w_axpy(int64_t m, A* __restrict__ y, const A* __restrict__ w, const A* __restrict__ x) {
  for (int64_t j = 0; j < m; ++j) {
    y[j] += w[j] * x[j];
  }
}

// a = sum over q (ascending) of w_q * x_q over a chunk of n elements.
template <typename A>
void anchor_chunk(
    const Tiling& t, int64_t np, const A* const* xs, A* const* ws, int64_t n, A* a) {
  if (np == 0) {
    std::fill(a, a + n, A(0));
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += t.L) {
    const int64_t m = std::min(t.L, n - i0);
    w_mul(m, a + i0, ws[0], xs[0] + i0);
    for (int64_t q = 1; q < np; ++q) {
      w_axpy(m, a + i0, ws[q], xs[q] + i0);
    }
  }
}

// lane[j] += (x[j] - a[j])^2
template <typename A>
MEDMAP_FAST_CLONES void sq_acc(int64_t m, A* __restrict__ lane, const A* __restrict__ x, const A* __restrict__ a) {
  for (int64_t j = 0; j < m; ++j) {
    const A r = x[j] - a[j];
    lane[j] += r * r;
  }
}

// lane[j] += x[j] * y[j]
template <typename A>
MEDMAP_FAST_CLONES void dot_acc(int64_t m, A* __restrict__ lane, const A* __restrict__ x, const A* __restrict__ y) {
  for (int64_t j = 0; j < m; ++j) {
    lane[j] += x[j] * y[j];
  }
}

template <typename A>
MEDMAP_FAST_CLONES void sum_acc(int64_t m, A* __restrict__ lane, const A* __restrict__ x) {
  for (int64_t j = 0; j < m; ++j) {
    lane[j] += x[j];
  }
}

// lane[j] += (x[j] - mu[j])^2
template <typename A>
MEDMAP_FAST_CLONES void dev_acc(int64_t m, A* __restrict__ lane, const A* __restrict__ x, const A* __restrict__ mu) {
  for (int64_t j = 0; j < m; ++j) {
    const A d = x[j] - mu[j];
    lane[j] += d * d;
  }
}

// da = G_0 r_0 (+ G_q r_q ...), r_q = x_q - a
template <typename A>
MEDMAP_FAST_CLONES void gr_first(int64_t m, A* __restrict__ da, const A* __restrict__ g, const A* __restrict__ x, const A* __restrict__ a) {
  for (int64_t j = 0; j < m; ++j) {
    da[j] = g[j] * (x[j] - a[j]);
  }
}

template <typename A>
MEDMAP_FAST_CLONES void gr_add(int64_t m, A* __restrict__ da, const A* __restrict__ g, const A* __restrict__ x, const A* __restrict__ a) {
  for (int64_t j = 0; j < m; ++j) {
    da[j] += g[j] * (x[j] - a[j]);
  }
}

template <typename A>
MEDMAP_FAST_CLONES void scale(int64_t n, A* __restrict__ y, A s) {
  for (int64_t j = 0; j < n; ++j) {
    y[j] = s * y[j];
  }
}

// out = g2 * (x - a) + w * da
template <typename A>
MEDMAP_FAST_CLONES void anchor_grad(
    int64_t m, A* __restrict__ out, const A* __restrict__ g2, const A* __restrict__ x,
    const A* __restrict__ a, const A* __restrict__ w, const A* __restrict__ da) {
  for (int64_t j = 0; j < m; ++j) {
    out[j] = g2[j] * (x[j] - a[j]) + w[j] * da[j];
  }
}

template <typename A>
MEDMAP_FAST_CLONES void anchor_grad_detached(
    int64_t m, A* __restrict__ out, const A* __restrict__ g2, const A* __restrict__ x,
    const A* __restrict__ a) {
  for (int64_t j = 0; j < m; ++j) {
    out[j] = g2[j] * (x[j] - a[j]);
  }
}

// out = al + be * (x - mu)
template <typename A>
MEDMAP_FAST_CLONES void affine(
    int64_t m, A* __restrict__ out, const A* __restrict__ al, const A* __restrict__ be,
    const A* __restrict__ x, const A* __restrict__ mu) {
  for (int64_t j = 0; j < m; ++j) {
    out[j] = al[j] + be[j] * (x[j] - mu[j]);
  }
}

// out = al + be * (x - mu) + w * da
template <typename A>
MEDMAP_FAST_CLONES void affine_da(
    int64_t m, A* __restrict__ out, const A* __restrict__ al, const A* __restrict__ be,
    const A* __restrict__ x, const A* __restrict__ mu, const A* __restrict__ w,
    const A* __restrict__ da) {
  for (int64_t j = 0; j < m; ++j) {
    out[j] = al[j] + be[j] * (x[j] - mu[j]) + w[j] * da[j];
  }
}

// Per-thread scratch, carved from one allocation.
template <typename A>
struct Scratch {
  std::vector<A> mem;
  size_t used = 0;
  explicit Scratch(size_t n) : mem(n + 64) {}
  A* take(int64_t n) {
    // Keep arrays 64-byte apart so that vector loads stay aligned to lines.
    A* p = mem.data() + used;
    used += (static_cast<size_t>(n) * sizeof(A) + 63) / 64 * 64 / sizeof(A);
    TORCH_INTERNAL_ASSERT(used <= mem.size());
    return p;
  }
  static size_t need(std::initializer_list<int64_t> sizes) {
    size_t s = 0;
    for (int64_t n : sizes) {
      s += (static_cast<size_t>(n) * sizeof(A) + 63) / 64 * 64 / sizeof(A);
    }
    return s;
  }
};

// Chooses the tiling for a call: C-inner when every tensor involved has
// unit channel stride and not all have unit voxel stride; otherwise S-inner
// (with strided gathers for anything else).
Tiling choose_tiling(
    std::initializer_list<at::TensorList> lists, const Dims& d) {
  bool s_in = true;
  bool c_in = true;
  for (const auto& l : lists) {
    for (const auto& t : l) {
      s_in = s_in && unit_s(t);
      c_in = c_in && unit_c(t);
    }
  }
  return make_tiling(!s_in && c_in, d.B, d.C, d.S);
}

// ---------------------------------------------------------------------------
// anchor_fwd

template <typename T>
void anchor_fwd_impl(
    at::TensorList feats, const at::Tensor& coef, const at::Tensor& present,
    const at::Tensor& sq, const std::optional<at::Tensor>& anchor, const Dims& d) {
  using A = at::opmath_type<T>;
  const bool want_a = given(anchor);
  std::vector<at::Tensor> outs;
  if (want_a) {
    outs.push_back(*anchor);
  }
  const Tiling t = choose_tiling({feats, outs}, d);
  const int64_t M = d.M;
  const A* cf = coef.const_data_ptr<A>();
  const bool* pr = present.const_data_ptr<bool>();
  A* sqp = sq.mutable_data_ptr<A>();
  std::vector<View<const T>> fv;
  for (const auto& f : feats) {
    fv.push_back(in_view<T>(f));
  }
  const View<T> av = want_a ? out_view<T>(*anchor) : View<T>{nullptr, 0, 0, 0};
  const bool stream = want_a && use_stream(anchor->numel() * anchor->element_size());
  std::vector<A> partial(t.nitems * M * t.P);

  at::parallel_for(0, t.nitems, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(Scratch<A>::need({M * t.maxn, t.maxn, M * t.L, M * t.L}));
    A* xbuf = sc.take(M * t.maxn);
    A* abuf = sc.take(t.maxn);
    A* wexp = sc.take(M * t.L);
    A* lanes = sc.take(M * t.L);
    std::vector<int64_t> ks(M);
    std::vector<const A*> xs(M);
    std::vector<A*> ws(M);
    for (int64_t it = begin; it < end; ++it) {
      const Item item = decode(t, it);
      int64_t np = 0;
      for (int64_t k = 0; k < M; ++k) {
        if (pr[item.b * M + k]) {
          ks[np] = k;
          ws[np] = wexp + np * t.L;
          expand(t, cf + (item.b * M + k) * d.C, item.c, ws[np]);
          std::fill(lanes + np * t.L, lanes + (np + 1) * t.L, A(0));
          ++np;
        }
      }
      for (int64_t s0 = item.s0; s0 < item.s1; s0 += t.step) {
        const int64_t rows = std::min(t.step, item.s1 - s0);
        const int64_t n = t.chunk_elems(rows);
        for (int64_t q = 0; q < np; ++q) {
          xs[q] = load_chunk<A>(fv[ks[q]], t, item.b, item.c, s0, rows, xbuf + q * t.maxn);
        }
        anchor_chunk(t, np, xs.data(), ws.data(), n, abuf);
        if (want_a) {
          store_chunk(av, t, item.b, item.c, s0, rows, abuf, stream);
        }
        for (int64_t q = 0; q < np; ++q) {
          A* lane = lanes + q * t.L;
          for (int64_t i0 = 0; i0 < n; i0 += t.L) {
            sq_acc(std::min(t.L, n - i0), lane, xs[q] + i0, abuf + i0);
          }
        }
      }
      for (int64_t k = 0, q = 0; k < M; ++k) {
        A* dst = partial.data() + part_base(t, it, k, M);
        if (q < np && ks[q] == k) {
          A* lane = lanes + q * t.L;
          fold(t, lane);
          std::copy(lane, lane + t.P, dst);
          ++q;
        } else {
          std::fill(dst, dst + t.P, A(0));
        }
      }
    }
    stream_fence(stream);
  });

  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t k = 0; k < M; ++k) {
      for (int64_t c = 0; c < d.C; ++c) {
        A s = 0;
        if (pr[b * M + k]) {
          for (int64_t seg = 0; seg < t.nseg; ++seg) {
            s += partial[part_index(t, b, k, c, seg, M)];
          }
        }
        sqp[(b * M + k) * d.C + c] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// anchor_bwd

template <typename T>
void anchor_bwd_impl(
    at::TensorList feats, const at::Tensor& coef, const at::Tensor& present,
    const at::Tensor& G, bool detach, at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef, const Dims& d) {
  using A = at::opmath_type<T>;
  const bool want_gc = given(grad_coef);
  const bool dot = want_gc && !detach;
  const Tiling t = choose_tiling({feats, grad_feats}, d);
  const int64_t M = d.M;
  const A* cf = coef.const_data_ptr<A>();
  const A* gp = G.const_data_ptr<A>();
  const bool* pr = present.const_data_ptr<bool>();
  std::vector<View<const T>> fv;
  std::vector<View<T>> gv;
  for (int64_t k = 0; k < M; ++k) {
    fv.push_back(in_view<T>(feats[k]));
    gv.push_back(out_view<T>(grad_feats[k]));
  }
  const bool stream = use_stream(M * d.B * d.C * d.S * int64_t(sizeof(T)));
  std::vector<A> partial(dot ? t.nitems * M * t.P : 0);
  std::vector<A> g2vals(d.B * M * d.C);
  for (size_t i = 0; i < g2vals.size(); ++i) {
    g2vals[i] = A(2) * gp[i];
  }

  at::parallel_for(0, t.nitems, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(Scratch<A>::need(
        {M * t.maxn, t.maxn, t.maxn, t.maxn, M * t.L, M * t.L, M * t.L, M * t.L}));
    A* xbuf = sc.take(M * t.maxn);
    A* abuf = sc.take(t.maxn);
    A* dabuf = sc.take(t.maxn);
    A* obuf = sc.take(t.maxn);
    A* wexp = sc.take(M * t.L);
    A* gexp = sc.take(M * t.L);
    A* g2exp = sc.take(M * t.L);
    A* lanes = sc.take(M * t.L);
    std::vector<int64_t> ks(M);
    std::vector<const A*> xs(M);
    std::vector<A*> ws(M);
    for (int64_t it = begin; it < end; ++it) {
      const Item item = decode(t, it);
      int64_t np = 0;
      for (int64_t k = 0; k < M; ++k) {
        if (pr[item.b * M + k]) {
          ks[np] = k;
          ws[np] = wexp + np * t.L;
          const int64_t o = (item.b * M + k) * d.C;
          expand(t, cf + o, item.c, ws[np]);
          expand(t, gp + o, item.c, gexp + np * t.L);
          expand(t, g2vals.data() + o, item.c, g2exp + np * t.L);
          std::fill(lanes + np * t.L, lanes + (np + 1) * t.L, A(0));
          ++np;
        }
      }
      for (int64_t s0 = item.s0; s0 < item.s1; s0 += t.step) {
        const int64_t rows = std::min(t.step, item.s1 - s0);
        const int64_t n = t.chunk_elems(rows);
        for (int64_t q = 0; q < np; ++q) {
          xs[q] = load_chunk<A>(fv[ks[q]], t, item.b, item.c, s0, rows, xbuf + q * t.maxn);
        }
        anchor_chunk(t, np, xs.data(), ws.data(), n, abuf);
        if (!detach && np > 0) {
          for (int64_t i0 = 0; i0 < n; i0 += t.L) {
            const int64_t m = std::min(t.L, n - i0);
            gr_first(m, dabuf + i0, gexp, xs[0] + i0, abuf + i0);
            for (int64_t q = 1; q < np; ++q) {
              gr_add(m, dabuf + i0, gexp + q * t.L, xs[q] + i0, abuf + i0);
            }
          }
          scale(n, dabuf, A(-2));
        }
        for (int64_t k = 0, q = 0; k < M; ++k) {
          if (q < np && ks[q] == k) {
            for (int64_t i0 = 0; i0 < n; i0 += t.L) {
              const int64_t m = std::min(t.L, n - i0);
              if (detach) {
                anchor_grad_detached(m, obuf + i0, g2exp + q * t.L, xs[q] + i0, abuf + i0);
              } else {
                anchor_grad(m, obuf + i0, g2exp + q * t.L, xs[q] + i0, abuf + i0, ws[q], dabuf + i0);
              }
              if (dot) {
                dot_acc(m, lanes + q * t.L, xs[q] + i0, dabuf + i0);
              }
            }
            store_chunk(gv[k], t, item.b, item.c, s0, rows, obuf, stream);
            ++q;
          } else {
            zero_chunk(gv[k], t, item.b, item.c, s0, rows, stream);
          }
        }
      }
      if (dot) {
        for (int64_t k = 0, q = 0; k < M; ++k) {
          A* dst = partial.data() + part_base(t, it, k, M);
          if (q < np && ks[q] == k) {
            A* lane = lanes + q * t.L;
            fold(t, lane);
            std::copy(lane, lane + t.P, dst);
            ++q;
          } else {
            std::fill(dst, dst + t.P, A(0));
          }
        }
      }
    }
    stream_fence(stream);
  });

  if (want_gc) {
    A* gc = grad_coef->mutable_data_ptr<A>();
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t k = 0; k < M; ++k) {
        for (int64_t c = 0; c < d.C; ++c) {
          A s = 0;
          if (dot && pr[b * M + k]) {
            for (int64_t seg = 0; seg < t.nseg; ++seg) {
              s += partial[part_index(t, b, k, c, seg, M)];
            }
          }
          gc[(b * M + k) * d.C + c] = s;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// moments_fwd

// Running (count, mean, m2) per lane period, merged with Chan's formula.
template <typename A>
inline void chan_merge(A na, A* mean, A* m2, A nb, const A* mb, const A* m2b, int64_t P) {
  if (na == A(0)) {
    std::copy(mb, mb + P, mean);
    std::copy(m2b, m2b + P, m2);
    return;
  }
  const A n = na + nb;
  const A fb = nb / n;
  const A fab = na * nb / n;
  for (int64_t p = 0; p < P; ++p) {
    const A delta = mb[p] - mean[p];
    mean[p] = mean[p] + delta * fb;
    m2[p] = m2[p] + m2b[p] + delta * delta * fab;
  }
}

// Two-pass mean and m2 of one chunk (n elements, cnt per lane period) into
// cmean / cm2 (P each). lane and mexp are L-element scratch.
template <typename A>
void chunk_moments(
    const Tiling& t, const A* x, int64_t n, int64_t cnt, A* lane, A* mexp,
    A* cmean, A* cm2) {
  std::fill(lane, lane + t.L, A(0));
  for (int64_t i0 = 0; i0 < n; i0 += t.L) {
    sum_acc(std::min(t.L, n - i0), lane, x + i0);
  }
  fold(t, lane);
  const A inv = A(1) / static_cast<A>(cnt);
  for (int64_t p = 0; p < t.P; ++p) {
    cmean[p] = lane[p] * inv;
  }
  expand(t, cmean, 0, mexp);
  std::fill(lane, lane + t.L, A(0));
  for (int64_t i0 = 0; i0 < n; i0 += t.L) {
    dev_acc(std::min(t.L, n - i0), lane, x + i0, mexp);
  }
  fold(t, lane);
  std::copy(lane, lane + t.P, cm2);
}

template <typename T>
void moments_fwd_impl(
    at::TensorList feats, const std::optional<at::Tensor>& coef,
    const at::Tensor& present, const at::Tensor& mean, const at::Tensor& m2,
    const Dims& d) {
  using A = at::opmath_type<T>;
  const bool has_a = given(coef);
  const int64_t M = d.M;
  const int64_t K = M + (has_a ? 1 : 0);
  A* meanp = mean.mutable_data_ptr<A>();
  A* m2p = m2.mutable_data_ptr<A>();
  if (d.S == 0) {
    std::fill(meanp, meanp + d.B * K * d.C, A(0));
    std::fill(m2p, m2p + d.B * K * d.C, A(0));
    return;
  }
  const Tiling t = choose_tiling({feats}, d);
  const A* cf = has_a ? coef->const_data_ptr<A>() : nullptr;
  const bool* pr = present.const_data_ptr<bool>();
  std::vector<View<const T>> fv;
  for (const auto& f : feats) {
    fv.push_back(in_view<T>(f));
  }
  std::vector<A> pmean(t.nitems * K * t.P);
  std::vector<A> pm2(t.nitems * K * t.P);

  at::parallel_for(0, t.nitems, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(Scratch<A>::need(
        {M * t.maxn, t.maxn, M * t.L, t.L, t.L, t.P, t.P, K * t.P, K * t.P}));
    A* xbuf = sc.take(M * t.maxn);
    A* abuf = sc.take(t.maxn);
    A* wexp = sc.take(M * t.L);
    A* lane = sc.take(t.L);
    A* mexp = sc.take(t.L);
    A* cmean = sc.take(t.P);
    A* cm2 = sc.take(t.P);
    A* rmean = sc.take(K * t.P);
    A* rm2 = sc.take(K * t.P);
    std::vector<int64_t> ks(M);
    std::vector<const A*> xs(M);
    std::vector<A*> ws(M);
    for (int64_t it = begin; it < end; ++it) {
      const Item item = decode(t, it);
      int64_t np = 0;
      for (int64_t k = 0; k < M; ++k) {
        if (pr[item.b * M + k]) {
          ks[np] = k;
          ws[np] = wexp + np * t.L;
          if (has_a) {
            expand(t, cf + (item.b * M + k) * d.C, item.c, ws[np]);
          }
          ++np;
        }
      }
      A count = 0;
      for (int64_t s0 = item.s0; s0 < item.s1; s0 += t.step) {
        const int64_t rows = std::min(t.step, item.s1 - s0);
        const int64_t n = t.chunk_elems(rows);
        const A cnt = static_cast<A>(rows);
        for (int64_t q = 0; q < np; ++q) {
          xs[q] = load_chunk<A>(fv[ks[q]], t, item.b, item.c, s0, rows, xbuf + q * t.maxn);
          chunk_moments(t, xs[q], n, rows, lane, mexp, cmean, cm2);
          chan_merge(count, rmean + ks[q] * t.P, rm2 + ks[q] * t.P, cnt, cmean, cm2, t.P);
        }
        if (has_a) {
          anchor_chunk(t, np, xs.data(), ws.data(), n, abuf);
          chunk_moments(t, abuf, n, rows, lane, mexp, cmean, cm2);
          chan_merge(count, rmean + M * t.P, rm2 + M * t.P, cnt, cmean, cm2, t.P);
        }
        count += cnt;
      }
      for (int64_t k = 0, q = 0; k < K; ++k) {
        const bool has = k == M || (q < np && ks[q] == k);
        A* dm = pmean.data() + part_base(t, it, k, K);
        A* d2 = pm2.data() + part_base(t, it, k, K);
        if (has) {
          std::copy(rmean + k * t.P, rmean + (k + 1) * t.P, dm);
          std::copy(rm2 + k * t.P, rm2 + (k + 1) * t.P, d2);
          if (k < M) {
            ++q;
          }
        } else {
          std::fill(dm, dm + t.P, A(0));
          std::fill(d2, d2 + t.P, A(0));
        }
      }
    }
  });

  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      const bool has = k == M || pr[b * M + k];
      for (int64_t c = 0; c < d.C; ++c) {
        A rmean = 0;
        A rm2 = 0;
        A count = 0;
        if (has) {
          for (int64_t seg = 0; seg < t.nseg; ++seg) {
            const int64_t i = part_index(t, b, k, c, seg, K);
            const A nseg = static_cast<A>(
                std::min(t.S, (seg + 1) * t.per_item) - seg * t.per_item);
            chan_merge(count, &rmean, &rm2, nseg, &pmean[i], &pm2[i], 1);
            count += nseg;
          }
        }
        meanp[(b * K + k) * d.C + c] = rmean;
        m2p[(b * K + k) * d.C + c] = rm2;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// moments_bwd

template <typename T>
void moments_bwd_impl(
    at::TensorList feats, const std::optional<at::Tensor>& coef,
    const at::Tensor& present, const at::Tensor& mean, const at::Tensor& alpha,
    const at::Tensor& beta, at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef, const Dims& d) {
  using A = at::opmath_type<T>;
  const bool has_a = given(coef);
  const bool want_gc = given(grad_coef);
  const int64_t M = d.M;
  const int64_t K = M + (has_a ? 1 : 0);
  const Tiling t = choose_tiling({feats, grad_feats}, d);
  const A* cf = has_a ? coef->const_data_ptr<A>() : nullptr;
  const A* mp = mean.const_data_ptr<A>();
  const A* alp = alpha.const_data_ptr<A>();
  const A* bep = beta.const_data_ptr<A>();
  const bool* pr = present.const_data_ptr<bool>();
  std::vector<View<const T>> fv;
  std::vector<View<T>> gv;
  for (int64_t k = 0; k < M; ++k) {
    fv.push_back(in_view<T>(feats[k]));
    gv.push_back(out_view<T>(grad_feats[k]));
  }
  const bool stream = use_stream(M * d.B * d.C * d.S * int64_t(sizeof(T)));
  std::vector<A> partial(want_gc ? t.nitems * M * t.P : 0);

  at::parallel_for(0, t.nitems, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(Scratch<A>::need(
        {M * t.maxn, t.maxn, t.maxn, t.maxn, M * t.L, K * t.L, K * t.L, K * t.L,
         M * t.L}));
    A* xbuf = sc.take(M * t.maxn);
    A* abuf = sc.take(t.maxn);
    A* dabuf = sc.take(t.maxn);
    A* obuf = sc.take(t.maxn);
    A* wexp = sc.take(M * t.L);
    A* alx = sc.take(K * t.L);
    A* bex = sc.take(K * t.L);
    A* mnx = sc.take(K * t.L);
    A* lanes = sc.take(M * t.L);
    std::vector<int64_t> ks(M);
    std::vector<const A*> xs(M);
    std::vector<A*> ws(M);
    for (int64_t it = begin; it < end; ++it) {
      const Item item = decode(t, it);
      int64_t np = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = (item.b * K + k) * d.C;
        if (k == M || pr[item.b * M + k]) {
          expand(t, alp + o, item.c, alx + k * t.L);
          expand(t, bep + o, item.c, bex + k * t.L);
          expand(t, mp + o, item.c, mnx + k * t.L);
        }
        if (k < M && pr[item.b * M + k]) {
          ks[np] = k;
          ws[np] = wexp + np * t.L;
          if (has_a) {
            expand(t, cf + (item.b * M + k) * d.C, item.c, ws[np]);
          }
          std::fill(lanes + np * t.L, lanes + (np + 1) * t.L, A(0));
          ++np;
        }
      }
      for (int64_t s0 = item.s0; s0 < item.s1; s0 += t.step) {
        const int64_t rows = std::min(t.step, item.s1 - s0);
        const int64_t n = t.chunk_elems(rows);
        for (int64_t q = 0; q < np; ++q) {
          xs[q] = load_chunk<A>(fv[ks[q]], t, item.b, item.c, s0, rows, xbuf + q * t.maxn);
        }
        if (has_a) {
          anchor_chunk(t, np, xs.data(), ws.data(), n, abuf);
          for (int64_t i0 = 0; i0 < n; i0 += t.L) {
            affine(std::min(t.L, n - i0), dabuf + i0, alx + M * t.L, bex + M * t.L,
                   abuf + i0, mnx + M * t.L);
          }
        }
        for (int64_t k = 0, q = 0; k < M; ++k) {
          if (q < np && ks[q] == k) {
            const A* al = alx + k * t.L;
            const A* be = bex + k * t.L;
            const A* mn = mnx + k * t.L;
            for (int64_t i0 = 0; i0 < n; i0 += t.L) {
              const int64_t m = std::min(t.L, n - i0);
              if (has_a) {
                affine_da(m, obuf + i0, al, be, xs[q] + i0, mn, ws[q], dabuf + i0);
                if (want_gc) {
                  dot_acc(m, lanes + q * t.L, xs[q] + i0, dabuf + i0);
                }
              } else {
                affine(m, obuf + i0, al, be, xs[q] + i0, mn);
              }
            }
            store_chunk(gv[k], t, item.b, item.c, s0, rows, obuf, stream);
            ++q;
          } else {
            zero_chunk(gv[k], t, item.b, item.c, s0, rows, stream);
          }
        }
      }
      if (want_gc) {
        for (int64_t k = 0, q = 0; k < M; ++k) {
          A* dst = partial.data() + part_base(t, it, k, M);
          if (q < np && ks[q] == k) {
            A* lane = lanes + q * t.L;
            fold(t, lane);
            std::copy(lane, lane + t.P, dst);
            ++q;
          } else {
            std::fill(dst, dst + t.P, A(0));
          }
        }
      }
    }
    stream_fence(stream);
  });

  if (want_gc) {
    A* gc = grad_coef->mutable_data_ptr<A>();
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t k = 0; k < M; ++k) {
        for (int64_t c = 0; c < d.C; ++c) {
          A s = 0;
          if (pr[b * M + k]) {
            for (int64_t seg = 0; seg < t.nseg; ++seg) {
              s += partial[part_index(t, b, k, c, seg, M)];
            }
          }
          gc[(b * M + k) * d.C + c] = s;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Gaussian KL
//
// Rows are handled in blocks of kRowBlk, transposed into [c][row] scratch so
// that the maths vectorises across rows whatever the input layout; dropped
// and padding rows are zero-filled (never read) and never written back
// except as exact zeros. The backward's sums are accumulated per item of
// gkl_item_blocks(C) blocks into kLanesG lanes (row i of a block into lane
// i % 16, the same in the vector and the portable code), folded in a fixed
// order and combined in item order.
constexpr int64_t kRowBlk = 64;
constexpr int64_t kItemBlocks = 16;
constexpr int64_t kLanesG = 16;

// Blocks per parallel chunk (forward) and per item (backward): kItemBlocks for
// rows of up to 16 channels, fewer for wider rows, so that a chunk holds about
// the same number of values (16 x 64 x 16) whatever C. With a fixed 16 blocks,
// rows of C = 256 (a U-Net's 8^3 level: 1024 rows) made one chunk, and the
// whole op ran on one thread. Depends on the shape only, never on the thread
// count, so the backward's sums stay deterministic.
inline int64_t gkl_item_blocks(int64_t C) {
  return std::clamp<int64_t>(kItemBlocks * 16 / std::max<int64_t>(C, 1), 1, kItemBlocks);
}

struct GklShape {
  int64_t G, R, C, J, N;
  int64_t mu_s[3];
  int64_t lv_s[3];
};

// Gathers mu and logvar of rows [n0, n0 + nb) into mu_t / lv_t ([C][kRowBlk])
// and sets keep[i]; rows not kept (and padding) are zeros.
template <typename T, typename A>
void gather_rows(
    const GklShape& g, const T* mu, const T* lv, const bool* present,
    int64_t n0, int64_t nb, A* __restrict__ mu_t, A* __restrict__ lv_t,
    bool* keep, bool need_lv) {
  const int64_t C = g.C;
  for (int64_t i = 0; i < kRowBlk; ++i) {
    const int64_t n = n0 + i;
    const int64_t gi = n / std::max<int64_t>(g.R, 1);
    keep[i] = i < nb && (present == nullptr || present[gi]);
    if (!keep[i]) {
      for (int64_t c = 0; c < C; ++c) {
        mu_t[c * kRowBlk + i] = A(0);
        lv_t[c * kRowBlk + i] = A(0);
      }
      continue;
    }
    const int64_t r = n - gi * g.R;
    const T* __restrict__ pm = mu + gi * g.mu_s[0] + r * g.mu_s[1];
    if (g.mu_s[2] == 1) {
      for (int64_t c = 0; c < C; ++c) {
        mu_t[c * kRowBlk + i] = up<A>(pm[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        mu_t[c * kRowBlk + i] = up<A>(pm[c * g.mu_s[2]]);
      }
    }
    if (need_lv) {
      const T* __restrict__ pl = lv + gi * g.lv_s[0] + r * g.lv_s[1];
      for (int64_t c = 0; c < C; ++c) {
        lv_t[c * kRowBlk + i] = up<A>(pl[c * g.lv_s[2]]);
      }
    }
  }
}

// Rows with unit stride in memory (a permuted NCDHW tensor) can be copied
// a channel at a time; returns false when the layout does not allow it.
template <typename T, typename A>
bool gather_rows_unit_r(
    const GklShape& g, const T* mu, const T* lv, const bool* present,
    int64_t n0, int64_t nb, A* __restrict__ mu_t, A* __restrict__ lv_t,
    bool* keep, bool need_lv) {
  if (g.mu_s[1] != 1 || (need_lv && g.lv_s[1] != 1 && g.lv_s[1] != 0)) {
    return false;
  }
  const int64_t gi = n0 / std::max<int64_t>(g.R, 1);
  const int64_t r0 = n0 - gi * g.R;
  if (nb != kRowBlk || r0 + nb > g.R || (present != nullptr && !present[gi])) {
    return false;  // block spans two g, is partial or dropped: general path
  }
  for (int64_t i = 0; i < kRowBlk; ++i) {
    keep[i] = true;
  }
  const int64_t C = g.C;
  const T* pm = mu + gi * g.mu_s[0] + r0;
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict__ s = pm + c * g.mu_s[2];
    A* __restrict__ d = mu_t + c * kRowBlk;
    for (int64_t i = 0; i < kRowBlk; ++i) {
      d[i] = up<A>(s[i]);
    }
  }
  if (need_lv) {
    const T* pl = lv + gi * g.lv_s[0] + r0 * g.lv_s[1];
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ s = pl + c * g.lv_s[2];
      A* __restrict__ d = lv_t + c * kRowBlk;
      if (g.lv_s[1] == 0) {
        std::fill(d, d + kRowBlk, up<A>(s[0]));
      } else {
        for (int64_t i = 0; i < kRowBlk; ++i) {
          d[i] = up<A>(s[i]);
        }
      }
    }
  }
  return true;
}

#if MEDMAP_FAST_HAVE_AVX2_PATH
MEDMAP_FAST_AVX2 inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]);
  const __m256 t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]);
  const __m256 t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]);
  const __m256 t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]);
  const __m256 t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44);
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44);
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44);
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44);
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// dst[c][i] = rows[i][c] for kRowBlk row pointers of C contiguous floats.
MEDMAP_FAST_AVX2 void transpose_in(const float* const* rows, int64_t C, float* dst) {
  for (int64_t v = 0; v < kRowBlk; v += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) {
      __m256 r[8];
      for (int u = 0; u < 8; ++u) {
        r[u] = _mm256_loadu_ps(rows[v + u] + c0);
      }
      transpose8(r);
      for (int u = 0; u < 8; ++u) {
        _mm256_storeu_ps(dst + (c0 + u) * kRowBlk + v, r[u]);
      }
    }
    for (; c0 < C; ++c0) {
      for (int u = 0; u < 8; ++u) {
        dst[c0 * kRowBlk + v + u] = rows[v + u][c0];
      }
    }
  }
}

// rows[i][c] = src[c][i] for the rows whose pointer is not null.
MEDMAP_FAST_AVX2 void transpose_out(const float* src, int64_t C, float* const* rows) {
  for (int64_t v = 0; v < kRowBlk; v += 8) {
    bool full = true;
    for (int u = 0; u < 8; ++u) {
      full = full && rows[v + u] != nullptr;
    }
    int64_t c0 = 0;
    if (full) {
      for (; c0 + 8 <= C; c0 += 8) {
        __m256 r[8];
        for (int u = 0; u < 8; ++u) {
          r[u] = _mm256_loadu_ps(src + (c0 + u) * kRowBlk + v);
        }
        transpose8(r);
        for (int u = 0; u < 8; ++u) {
          _mm256_storeu_ps(rows[v + u] + c0, r[u]);
        }
      }
    }
    for (int u = 0; u < 8; ++u) {
      if (rows[v + u] != nullptr) {
        for (int64_t c = c0; c < C; ++c) {
          rows[v + u][c] = src[c * kRowBlk + v + u];
        }
      }
    }
  }
}
#endif

// Float rows with unit channel stride, on AVX2: 8x8 transposes. Rows not
// kept read a zero row instead.
template <typename T, typename A>
bool gather_rows_transpose(
    const GklShape& g, const T* mu, const T* lv, const bool* present,
    int64_t n0, int64_t nb, A* mu_t, A* lv_t, bool* keep, bool need_lv,
    const A* zeros, bool vec) {
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (g.mu_s[2] != 1 || (need_lv && g.lv_s[2] != 1) || !vec) {
      return false;
    }
    const float* mrow[kRowBlk];
    const float* lrow[kRowBlk];
    for (int64_t i = 0; i < kRowBlk; ++i) {
      const int64_t n = n0 + i;
      const int64_t gi = n / std::max<int64_t>(g.R, 1);
      keep[i] = i < nb && (present == nullptr || present[gi]);
      if (keep[i]) {
        const int64_t r = n - gi * g.R;
        mrow[i] = mu + gi * g.mu_s[0] + r * g.mu_s[1];
        lrow[i] = need_lv ? lv + gi * g.lv_s[0] + r * g.lv_s[1] : zeros;
      } else {
        mrow[i] = zeros;
        lrow[i] = zeros;
      }
    }
    transpose_in(mrow, g.C, mu_t);
    if (need_lv) {
      transpose_in(lrow, g.C, lv_t);
    }
    return true;
  }
#endif
  (void)g, (void)mu, (void)lv, (void)present, (void)n0, (void)nb, (void)mu_t;
  (void)lv_t, (void)keep, (void)need_lv, (void)zeros, (void)vec;
  return false;
}

template <typename T, typename A>
void gather_block(
    const GklShape& g, const T* mu, const T* lv, const bool* present,
    int64_t n0, int64_t nb, A* mu_t, A* lv_t, bool* keep, bool need_lv,
    const A* zeros, bool vec) {
  if (!gather_rows_unit_r(g, mu, lv, present, n0, nb, mu_t, lv_t, keep, need_lv) &&
      !gather_rows_transpose(g, mu, lv, present, n0, nb, mu_t, lv_t, keep, need_lv, zeros, vec)) {
    gather_rows(g, mu, lv, present, n0, nb, mu_t, lv_t, keep, need_lv);
  }
}

// Writes a [C][kRowBlk] block back to a (G, R, C) output; rows not kept get
// exact zeros, padding rows nothing.
template <typename T, typename A>
void scatter_block(
    const GklShape& g, T* out, const int64_t* os, int64_t n0, int64_t nb,
    const A* __restrict__ src, const bool* keep, bool vec) {
  const int64_t C = g.C;
  if (os[1] == 1 && nb == kRowBlk && keep[0]) {
    // Rows with unit stride (a permuted NCDHW output): a channel at a time,
    // when the whole block is kept and within one g.
    const int64_t gi = n0 / g.R;
    const int64_t r0 = n0 - gi * g.R;
    bool all = r0 + nb <= g.R;
    for (int64_t i = 1; all && i < nb; ++i) {
      all = keep[i];
    }
    if (all) {
      for (int64_t c = 0; c < C; ++c) {
        T* __restrict__ d = out + gi * os[0] + r0 + c * os[2];
        const A* __restrict__ s = src + c * kRowBlk;
        for (int64_t i = 0; i < kRowBlk; ++i) {
          d[i] = down<T>(s[i]);
        }
      }
      return;
    }
  }
#if MEDMAP_FAST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if ((os[2] == 1 || C == 1) && vec) {
      float* rows[kRowBlk];
      for (int64_t i = 0; i < kRowBlk; ++i) {
        rows[i] = nullptr;
        if (i < nb) {
          const int64_t n = n0 + i;
          const int64_t gi = n / g.R;
          float* p = out + gi * os[0] + (n - gi * g.R) * os[1];
          if (keep[i]) {
            rows[i] = p;
          } else {
            std::fill(p, p + C, 0.0f);
          }
        }
      }
      transpose_out(src, C, rows);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t n = n0 + i;
    const int64_t gi = n / std::max<int64_t>(g.R, 1);
    const int64_t r = n - gi * g.R;
    T* __restrict__ p = out + gi * os[0] + r * os[1];
    if (!keep[i]) {
      for (int64_t c = 0; c < C; ++c) {
        p[c * os[2]] = T(0);
      }
    } else if (os[2] == 1) {
      for (int64_t c = 0; c < C; ++c) {
        p[c] = down<T>(src[c * kRowBlk + i]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        p[c * os[2]] = down<T>(src[c * kRowBlk + i]);
      }
    }
  }
}

// Per-(j, c) constants of the anchor, computed once per call.
template <typename A>
struct GklConsts {
  std::vector<A> nu, inv, ltm1, nuinv, logpi;
};

template <typename A>
GklConsts<A> gkl_consts(const A* nu, const A* lt, const A* logpi, int64_t J, int64_t C) {
  GklConsts<A> k;
  k.nu.assign(nu, nu + J * C);
  k.inv.resize(J * C);
  k.ltm1.resize(J * C);
  k.nuinv.resize(J * C);
  for (int64_t i = 0; i < J * C; ++i) {
    k.inv[i] = std::exp(-lt[i]);
    k.ltm1[i] = lt[i] - A(1);
    k.nuinv[i] = nu[i] * k.inv[i];
  }
  if (logpi != nullptr) {
    k.logpi.assign(logpi, logpi + J);
  }
  return k;
}

// Forward of one block, portable code: z[j][i] for every row, then loss and
// responsibilities of the kept rows.
template <typename A>
void gkl_fwd_block_ref(
    const GklConsts<A>& k, int64_t J, int64_t C, const A* mu_t, const A* lv_t,
    const bool* keep, int64_t nb, A* loss, A* resp, A* z) {
  for (int64_t i = 0; i < nb; ++i) {
    if (!keep[i]) {
      loss[i] = A(0);
      if (resp != nullptr) {
        std::fill(resp + i * J, resp + (i + 1) * J, A(0));
      }
      continue;
    }
    std::fill(z, z + J, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const A m = mu_t[c * kRowBlk + i];
      const A lv = lv_t[c * kRowBlk + i];
      const A var = std::exp(lv);
      for (int64_t j = 0; j < J; ++j) {
        const A dd = m - k.nu[j * C + c];
        const A tt = (dd * dd + var) * k.inv[j * C + c] + k.ltm1[j * C + c];
        z[j] += tt - lv;
      }
    }
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < J; ++j) {
      z[j] = k.logpi[j] - A(0.5) * z[j];
      mx = z[j] > mx ? z[j] : mx;
    }
    // An infinite maximum would turn z - max into NaN for a legitimately
    // infinite result; shifting by 0 then gives the right infinities.
    // NaN in any z reaches the sum through its own exp.
    const A shift = std::isinf(mx) ? A(0) : mx;
    A s = 0;
    for (int64_t j = 0; j < J; ++j) {
      z[j] = std::exp(z[j] - shift);
      s += z[j];
    }
    loss[i] = -(shift + std::log(s));
    if (resp != nullptr) {
      for (int64_t j = 0; j < J; ++j) {
        resp[i * J + j] = z[j] / s;
      }
    }
  }
}

#if MEDMAP_FAST_HAVE_AVX2_PATH
// The same for float on AVX2, eight rows per vector. Each (j, c) step
// updates all eight row groups of the block, so eight independent sums are
// in flight instead of one dependent chain. z is [J][kRowBlk] scratch.
MEDMAP_FAST_AVX2 void gkl_fwd_block_avx2(
    const GklConsts<float>& k, int64_t J, int64_t C, const float* mu_t,
    const float* lv_t, const bool* keep, int64_t nb, float* loss, float* resp,
    float* var_t, float* z) {
  constexpr int kV = kRowBlk / 8;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t v = 0; v < kRowBlk; v += 8) {
      _mm256_storeu_ps(
          var_t + c * kRowBlk + v,
          simd::exp_ps(_mm256_loadu_ps(lv_t + c * kRowBlk + v)));
    }
  }
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int64_t j = 0; j < J; ++j) {
    __m256 acc[kV];
    for (int u = 0; u < kV; ++u) {
      acc[u] = _mm256_setzero_ps();
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m256 nu = _mm256_set1_ps(k.nu[j * C + c]);
      const __m256 inv = _mm256_set1_ps(k.inv[j * C + c]);
      const __m256 l1 = _mm256_set1_ps(k.ltm1[j * C + c]);
      const float* pm = mu_t + c * kRowBlk;
      const float* pl = lv_t + c * kRowBlk;
      const float* pv = var_t + c * kRowBlk;
      for (int u = 0; u < kV; ++u) {
        const __m256 dd = _mm256_sub_ps(_mm256_loadu_ps(pm + u * 8), nu);
        const __m256 qq = _mm256_fmadd_ps(dd, dd, _mm256_loadu_ps(pv + u * 8));
        const __m256 tt = _mm256_fmadd_ps(qq, inv, l1);
        acc[u] = _mm256_add_ps(acc[u], _mm256_sub_ps(tt, _mm256_loadu_ps(pl + u * 8)));
      }
    }
    const __m256 lp = _mm256_set1_ps(k.logpi[j]);
    for (int u = 0; u < kV; ++u) {
      _mm256_storeu_ps(z + j * kRowBlk + u * 8, _mm256_fnmadd_ps(half, acc[u], lp));
    }
  }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < kRowBlk && v < nb; v += 8) {
    __m256 mx = _mm256_loadu_ps(z + v);
    for (int64_t j = 1; j < J; ++j) {
      mx = _mm256_max_ps(_mm256_loadu_ps(z + j * kRowBlk + v), mx);
    }
    const __m256 isinf = _mm256_cmp_ps(_mm256_and_ps(mx, absmask), inf, _CMP_EQ_OQ);
    const __m256 shift = _mm256_andnot_ps(isinf, mx);
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < J; ++j) {
      float* pz = z + j * kRowBlk + v;
      const __m256 e = simd::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(pz), shift));
      _mm256_storeu_ps(pz, e);
      s = _mm256_add_ps(s, e);
    }
    const __m256 l = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_add_ps(shift, simd::log_ps(s)));
    alignas(32) float lbuf[8];
    _mm256_store_ps(lbuf, l);
    const int64_t cnt = std::min<int64_t>(8, nb - v);
    for (int64_t u = 0; u < cnt; ++u) {
      loss[v + u] = keep[v + u] ? lbuf[u] : 0.0f;
    }
    if (resp != nullptr) {
      alignas(32) float rbuf[8];
      for (int64_t j = 0; j < J; ++j) {
        _mm256_store_ps(rbuf, _mm256_div_ps(_mm256_loadu_ps(z + j * kRowBlk + v), s));
        for (int64_t u = 0; u < cnt; ++u) {
          resp[(v + u) * J + j] = keep[v + u] ? rbuf[u] : 0.0f;
        }
      }
    }
  }
}
#endif

template <typename T>
void gkl_fwd_impl(
    const at::Tensor& mu, const at::Tensor& logvar, const bool* present,
    const at::Tensor& nu, const at::Tensor& logtau2, const at::Tensor& logpi,
    const at::Tensor& loss, const std::optional<at::Tensor>& resp) {
  using A = at::opmath_type<T>;
  GklShape g{mu.size(0), mu.size(1), mu.size(2), nu.size(0), mu.size(0) * mu.size(1),
             {mu.stride(0), mu.stride(1), mu.stride(2)},
             {logvar.stride(0), logvar.stride(1), logvar.stride(2)}};
  const GklConsts<A> k = gkl_consts(
      nu.const_data_ptr<A>(), logtau2.const_data_ptr<A>(), logpi.const_data_ptr<A>(),
      g.J, g.C);
  const T* mup = static_cast<const T*>(mu.const_data_ptr());
  const T* lvp = static_cast<const T*>(logvar.const_data_ptr());
  A* lossp = loss.mutable_data_ptr<A>();
  A* respp = given(resp) ? resp->mutable_data_ptr<A>() : nullptr;
  const int64_t nblk = divup(g.N, kRowBlk);
  const bool vec = std::is_same_v<A, float> && simd::avx2_available();
  at::parallel_for(0, nblk, gkl_item_blocks(g.C), [&](int64_t begin, int64_t end) {
    const int64_t cpad = std::max<int64_t>(g.C, 1) * kRowBlk;
    std::vector<A> buf(3 * cpad + std::max<int64_t>(g.J, 1) * kRowBlk + 64);
    const std::vector<A> zeros(g.C + 8, A(0));
    const A* zrow = zeros.data();
    A* mu_t = buf.data();
    A* lv_t = mu_t + cpad;
    A* var_t = lv_t + cpad;
    A* z = var_t + cpad;
    bool keep[kRowBlk];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRowBlk;
      const int64_t nb = std::min(kRowBlk, g.N - n0);
      gather_block(g, mup, lvp, present, n0, nb, mu_t, lv_t, keep, true, zrow, vec);
      A* rp = respp != nullptr ? respp + n0 * g.J : nullptr;
#if MEDMAP_FAST_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<A, float>) {
        if (vec) {
          gkl_fwd_block_avx2(k, g.J, g.C, mu_t, lv_t, keep, nb, lossp + n0, rp, var_t, z);
          continue;
        }
      }
#endif
      (void)vec;
      gkl_fwd_block_ref(k, g.J, g.C, mu_t, lv_t, keep, nb, lossp + n0, rp, z);
    }
  });
}

// Backward of one block, portable code. w_b and r_t ([J][kRowBlk]) are 0
// for rows not kept. Writes gmu_t / glv_t ([C][kRowBlk]) when asked and adds
// the sums into lanes s0l [J][8], s1l and s2l [J][C][8].
template <typename A>
void gkl_bwd_block_ref(
    const GklConsts<A>& k, int64_t J, int64_t C, const A* mu_t, const A* lv_t,
    const A* w_b, const A* r_t, A* gmu_t, A* glv_t, bool need_var, A* s0l,
    A* s1l, A* s2l, A* wr) {
  for (int64_t i = 0; i < kRowBlk; ++i) {
    const int64_t lane = i % kLanesG;
    const A w = w_b[i];
    for (int64_t j = 0; j < J; ++j) {
      wr[j] = w * r_t[j * kRowBlk + i];
      if (s0l != nullptr) {
        s0l[j * kLanesG + lane] += wr[j];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const A m = mu_t[c * kRowBlk + i];
      const A var = need_var ? std::exp(lv_t[c * kRowBlk + i]) : A(0);
      A Ac = 0;
      A Bc = 0;
      for (int64_t j = 0; j < J; ++j) {
        const A r = r_t[j * kRowBlk + i];
        Ac += r * k.inv[j * C + c];
        Bc += r * k.nuinv[j * C + c];
      }
      if (gmu_t != nullptr) {
        gmu_t[c * kRowBlk + i] = w * (m * Ac - Bc);
      }
      if (glv_t != nullptr) {
        glv_t[c * kRowBlk + i] = w * (A(0.5) * (var * Ac - A(1)));
      }
      if (s1l != nullptr) {
        for (int64_t j = 0; j < J; ++j) {
          const A dd = m - k.nu[j * C + c];
          const int64_t o = (j * C + c) * kLanesG + lane;
          s1l[o] += wr[j] * dd;
          s2l[o] += wr[j] * (dd * dd + var);
        }
      }
    }
  }
}

#if MEDMAP_FAST_HAVE_AVX2_PATH
// The same for float on AVX2. Row group u (rows 8u..8u+7) adds into lane set
// u % 2, which gives two independent chains per (j, c) sum; wr is
// [J][kRowBlk] scratch.
MEDMAP_FAST_AVX2 void gkl_bwd_block_avx2(
    const GklConsts<float>& k, int64_t J, int64_t C, const float* mu_t,
    const float* lv_t, const float* w_b, const float* r_t, float* gmu_t,
    float* glv_t, bool need_var, float* s0l, float* s1l, float* s2l, float* wr,
    float* var_t) {
  constexpr int kV = kRowBlk / 8;
  if (need_var) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t v = 0; v < kRowBlk; v += 8) {
        _mm256_storeu_ps(
            var_t + c * kRowBlk + v,
            simd::exp_ps(_mm256_loadu_ps(lv_t + c * kRowBlk + v)));
      }
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    __m256 a0 = s0l != nullptr ? _mm256_loadu_ps(s0l + j * kLanesG) : _mm256_setzero_ps();
    __m256 a1 = s0l != nullptr ? _mm256_loadu_ps(s0l + j * kLanesG + 8) : _mm256_setzero_ps();
    for (int u = 0; u < kV; ++u) {
      const __m256 x = _mm256_mul_ps(
          _mm256_loadu_ps(w_b + u * 8), _mm256_loadu_ps(r_t + j * kRowBlk + u * 8));
      _mm256_storeu_ps(wr + j * kRowBlk + u * 8, x);
      if (u % 2 == 0) {
        a0 = _mm256_add_ps(a0, x);
      } else {
        a1 = _mm256_add_ps(a1, x);
      }
    }
    if (s0l != nullptr) {
      _mm256_storeu_ps(s0l + j * kLanesG, a0);
      _mm256_storeu_ps(s0l + j * kLanesG + 8, a1);
    }
  }
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t c = 0; c < C; ++c) {
    const float* pm = mu_t + c * kRowBlk;
    const float* pv = var_t + c * kRowBlk;
    if (gmu_t != nullptr || glv_t != nullptr) {
      for (int u = 0; u < kV; ++u) {
        __m256 Ac = _mm256_setzero_ps();
        __m256 Bc = _mm256_setzero_ps();
        for (int64_t j = 0; j < J; ++j) {
          const __m256 r = _mm256_loadu_ps(r_t + j * kRowBlk + u * 8);
          Ac = _mm256_fmadd_ps(r, _mm256_set1_ps(k.inv[j * C + c]), Ac);
          Bc = _mm256_fmadd_ps(r, _mm256_set1_ps(k.nuinv[j * C + c]), Bc);
        }
        const __m256 w = _mm256_loadu_ps(w_b + u * 8);
        if (gmu_t != nullptr) {
          const __m256 m = _mm256_loadu_ps(pm + u * 8);
          _mm256_storeu_ps(gmu_t + c * kRowBlk + u * 8, _mm256_mul_ps(w, _mm256_fmsub_ps(m, Ac, Bc)));
        }
        if (glv_t != nullptr) {
          const __m256 var = _mm256_loadu_ps(pv + u * 8);
          _mm256_storeu_ps(
              glv_t + c * kRowBlk + u * 8,
              _mm256_mul_ps(w, _mm256_mul_ps(half, _mm256_fmsub_ps(var, Ac, one))));
        }
      }
    }
    if (s1l != nullptr) {
      for (int64_t j = 0; j < J; ++j) {
        const __m256 nu = _mm256_set1_ps(k.nu[j * C + c]);
        float* p1 = s1l + (j * C + c) * kLanesG;
        float* p2 = s2l + (j * C + c) * kLanesG;
        __m256 b1[2] = {_mm256_loadu_ps(p1), _mm256_loadu_ps(p1 + 8)};
        __m256 b2[2] = {_mm256_loadu_ps(p2), _mm256_loadu_ps(p2 + 8)};
        for (int u = 0; u < kV; ++u) {
          const __m256 x = _mm256_loadu_ps(wr + j * kRowBlk + u * 8);
          const __m256 dd = _mm256_sub_ps(_mm256_loadu_ps(pm + u * 8), nu);
          const __m256 q = _mm256_fmadd_ps(dd, dd, _mm256_loadu_ps(pv + u * 8));
          b1[u % 2] = _mm256_fmadd_ps(x, dd, b1[u % 2]);
          b2[u % 2] = _mm256_fmadd_ps(x, q, b2[u % 2]);
        }
        _mm256_storeu_ps(p1, b1[0]);
        _mm256_storeu_ps(p1 + 8, b1[1]);
        _mm256_storeu_ps(p2, b2[0]);
        _mm256_storeu_ps(p2 + 8, b2[1]);
      }
    }
  }
}
#endif

// Fixed-order fold of kLanesG lanes.
template <typename A>
inline A fold8(const A* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename A>
inline A fold_lanes(const A* l) {
  static_assert(kLanesG == 16, "fold_lanes expects 16 lanes");
  return fold8(l) + fold8(l + 8);
}

template <typename T>
void gkl_bwd_impl(
    const at::Tensor& mu, const at::Tensor& logvar, const bool* present,
    const at::Tensor& nu, const at::Tensor& logtau2,
    const std::optional<at::Tensor>& resp, const at::Tensor& w,
    const std::optional<at::Tensor>& grad_mu,
    const std::optional<at::Tensor>& grad_logvar,
    const std::optional<at::Tensor>& stats) {
  using A = at::opmath_type<T>;
  GklShape g{mu.size(0), mu.size(1), mu.size(2), nu.size(0), mu.size(0) * mu.size(1),
             {mu.stride(0), mu.stride(1), mu.stride(2)},
             {logvar.stride(0), logvar.stride(1), logvar.stride(2)}};
  const int64_t J = g.J;
  const int64_t C = g.C;
  const GklConsts<A> k = gkl_consts<A>(
      nu.const_data_ptr<A>(), logtau2.const_data_ptr<A>(), nullptr, J, C);
  const T* mup = static_cast<const T*>(mu.const_data_ptr());
  const T* lvp = static_cast<const T*>(logvar.const_data_ptr());
  const A* rp = given(resp) ? resp->const_data_ptr<A>() : nullptr;
  const A* wp = w.const_data_ptr<A>();
  const int64_t ws0 = w.stride(0);
  const int64_t ws1 = w.stride(1);
  const bool want_gmu = given(grad_mu);
  const bool want_glv = given(grad_logvar);
  const bool want_stats = given(stats);
  T* gmup = want_gmu ? static_cast<T*>(grad_mu->mutable_data_ptr()) : nullptr;
  T* glvp = want_glv ? static_cast<T*>(grad_logvar->mutable_data_ptr()) : nullptr;
  const int64_t gms[3] = {
      want_gmu ? grad_mu->stride(0) : 0, want_gmu ? grad_mu->stride(1) : 0,
      want_gmu ? grad_mu->stride(2) : 0};
  const int64_t gls[3] = {
      want_glv ? grad_logvar->stride(0) : 0, want_glv ? grad_logvar->stride(1) : 0,
      want_glv ? grad_logvar->stride(2) : 0};
  const bool need_var = want_glv || want_stats;
  const int64_t nblk = divup(g.N, kRowBlk);
  const int64_t item_blocks = gkl_item_blocks(C);
  const int64_t nitems = divup(nblk, item_blocks);
  const int64_t pstride = J + 2 * J * C;
  std::vector<A> partial(want_stats ? nitems * pstride : 0);
  const bool vec = std::is_same_v<A, float> && simd::avx2_available();

  if (want_gmu || want_glv || want_stats) {
    at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
      const int64_t cpad = std::max<int64_t>(C, 1) * kRowBlk;
      const int64_t lanes_n = J * kLanesG + 2 * J * C * kLanesG;
      std::vector<A> buf(5 * cpad + J * kRowBlk + kRowBlk + J * kRowBlk + lanes_n + 64);
      const std::vector<A> zeros(C + 8, A(0));
      const A* zrow = zeros.data();
      A* mu_t = buf.data();
      A* lv_t = mu_t + cpad;
      A* var_t = lv_t + cpad;
      A* gmu_t = var_t + cpad;
      A* glv_t = gmu_t + cpad;
      A* r_t = glv_t + cpad;
      A* w_b = r_t + J * kRowBlk;
      A* wr = w_b + kRowBlk;
      A* s0l = wr + J * kRowBlk;
      A* s1l = s0l + J * kLanesG;
      A* s2l = s1l + J * C * kLanesG;
      bool keep[kRowBlk];
      for (int64_t it = begin; it < end; ++it) {
        std::fill(s0l, s0l + lanes_n, A(0));
        const int64_t b1 = std::min(nblk, (it + 1) * item_blocks);
        for (int64_t blk = it * item_blocks; blk < b1; ++blk) {
          const int64_t n0 = blk * kRowBlk;
          const int64_t nb = std::min(kRowBlk, g.N - n0);
          gather_block(g, mup, lvp, present, n0, nb, mu_t, lv_t, keep, need_var, zrow, vec);
          for (int64_t i = 0; i < kRowBlk; ++i) {
            const int64_t n = n0 + i;
            if (!keep[i]) {
              w_b[i] = A(0);
              for (int64_t j = 0; j < J; ++j) {
                r_t[j * kRowBlk + i] = A(0);
              }
              continue;
            }
            const int64_t gi = n / g.R;
            w_b[i] = wp[gi * ws0 + (n - gi * g.R) * ws1];
            for (int64_t j = 0; j < J; ++j) {
              r_t[j * kRowBlk + i] = rp != nullptr ? rp[n * J + j] : A(1);
            }
          }
          A* gm = want_gmu ? gmu_t : nullptr;
          A* gl = want_glv ? glv_t : nullptr;
          A* l0 = want_stats ? s0l : nullptr;
          A* l1 = want_stats ? s1l : nullptr;
          A* l2 = want_stats ? s2l : nullptr;
          bool done = false;
#if MEDMAP_FAST_HAVE_AVX2_PATH
          if constexpr (std::is_same_v<A, float>) {
            if (vec) {
              gkl_bwd_block_avx2(k, J, C, mu_t, lv_t, w_b, r_t, gm, gl, need_var, l0, l1, l2, wr, var_t);
              done = true;
            }
          }
#endif
          (void)vec;
          if (!done) {
            gkl_bwd_block_ref(k, J, C, mu_t, lv_t, w_b, r_t, gm, gl, need_var, l0, l1, l2, wr);
          }
          if (want_gmu) {
            scatter_block(g, gmup, gms, n0, nb, gmu_t, keep, vec);
          }
          if (want_glv) {
            scatter_block(g, glvp, gls, n0, nb, glv_t, keep, vec);
          }
        }
        if (want_stats) {
          A* dst = partial.data() + it * pstride;
          for (int64_t q = 0; q < J + 2 * J * C; ++q) {
            dst[q] = fold_lanes(s0l + q * kLanesG);
          }
        }
      }
    });
  }

  if (want_stats) {
    A* st = stats->mutable_data_ptr<A>();
    std::vector<A> tot(pstride, A(0));
    for (int64_t it = 0; it < nitems; ++it) {
      const A* src = partial.data() + it * pstride;
      for (int64_t q = 0; q < pstride; ++q) {
        tot[q] += src[q];
      }
    }
    for (int64_t j = 0; j < J; ++j) {
      for (int64_t c = 0; c < C; ++c) {
        st[j * C + c] = tot[j];
        st[(J + j) * C + c] = tot[J + j * C + c];
        st[(2 * J + j) * C + c] = tot[J + J * C + j * C + c];
      }
    }
  }
}

struct GklDims {
  int64_t G, R, C, J;
  at::ScalarType dtype, acc;
};

GklDims check_gkl_common(
    const char* op, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& present, const at::Tensor& nu,
    const at::Tensor& logtau2) {
  TORCH_CHECK(mu.defined(), op, ": mu is undefined");
  TORCH_CHECK(mu.dim() == 3, op, ": mu must be 3-D (G, R, C), got shape ", mu.sizes());
  const at::ScalarType dt = mu.scalar_type();
  check_float_dtype(op, "mu", dt);
  const at::ScalarType acc = acc_dtype(dt);
  const int64_t G = mu.size(0), R = mu.size(1), C = mu.size(2);
  check_tensor(op, "mu", mu, dt, {G, R, C});
  check_tensor(op, "logvar", logvar, dt, {G, R, C});
  TORCH_CHECK(nu.defined() && nu.dim() == 2, op, ": nu must be 2-D (J, C)");
  const int64_t J = nu.size(0);
  TORCH_CHECK(J >= 1, op, ": the anchor needs at least one component (J >= 1)");
  check_small(op, "nu", nu, acc, {J, C});
  check_small(op, "logtau2", logtau2, acc, {J, C});
  if (given(present)) {
    check_small(op, "present", *present, at::kBool, {G});
  }
  return {G, R, C, J, dt, acc};
}

} // namespace

// ---------------------------------------------------------------------------
// Entry points

void anchor_fwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& sq,
    const std::optional<at::Tensor>& anchor) {
  constexpr const char* op = "anchor_fwd";
  const Dims d = check_feats(op, feats);
  const at::ScalarType acc = acc_dtype(d.dtype);
  check_small(op, "coef", coef, acc, {d.B, d.M, d.C});
  check_small(op, "present", present, at::kBool, {d.B, d.M});
  check_small(op, "sq", sq, acc, {d.B, d.M, d.C});
  if (given(anchor)) {
    check_tensor(op, "anchor", *anchor, d.dtype, {d.B, d.C, d.S});
    check_out(op, "anchor", *anchor);
  }
  if (d.B * d.C == 0) {
    return;  // every output is empty
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    anchor_fwd_impl<scalar_t>(feats, coef, present, sq, anchor, d);
  });
}

void anchor_bwd(
    at::TensorList feats,
    const at::Tensor& coef,
    const at::Tensor& present,
    const at::Tensor& G,
    bool detach,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef) {
  constexpr const char* op = "anchor_bwd";
  const Dims d = check_feats(op, feats);
  const at::ScalarType acc = acc_dtype(d.dtype);
  check_small(op, "coef", coef, acc, {d.B, d.M, d.C});
  check_small(op, "present", present, at::kBool, {d.B, d.M});
  check_small(op, "G", G, acc, {d.B, d.M, d.C});
  check_grad_feats(op, grad_feats, d);
  if (given(grad_coef)) {
    check_small(op, "grad_coef", *grad_coef, acc, {d.B, d.M, d.C});
  }
  if (d.B * d.C == 0) {
    return;  // every output is empty
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    anchor_bwd_impl<scalar_t>(feats, coef, present, G, detach, grad_feats, grad_coef, d);
  });
}

void moments_fwd(
    at::TensorList feats,
    const std::optional<at::Tensor>& coef,
    const at::Tensor& present,
    const at::Tensor& mean,
    const at::Tensor& m2) {
  constexpr const char* op = "moments_fwd";
  const Dims d = check_feats(op, feats);
  const at::ScalarType acc = acc_dtype(d.dtype);
  const int64_t K = d.M + (given(coef) ? 1 : 0);
  if (given(coef)) {
    check_small(op, "coef", *coef, acc, {d.B, d.M, d.C});
  }
  check_small(op, "present", present, at::kBool, {d.B, d.M});
  check_small(op, "mean", mean, acc, {d.B, K, d.C});
  check_small(op, "m2", m2, acc, {d.B, K, d.C});
  if (d.B * d.C == 0) {
    return;  // every output is empty
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    moments_fwd_impl<scalar_t>(feats, coef, present, mean, m2, d);
  });
}

void moments_bwd(
    at::TensorList feats,
    const std::optional<at::Tensor>& coef,
    const at::Tensor& present,
    const at::Tensor& mean,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    at::TensorList grad_feats,
    const std::optional<at::Tensor>& grad_coef) {
  constexpr const char* op = "moments_bwd";
  const Dims d = check_feats(op, feats);
  const at::ScalarType acc = acc_dtype(d.dtype);
  const int64_t K = d.M + (given(coef) ? 1 : 0);
  if (given(coef)) {
    check_small(op, "coef", *coef, acc, {d.B, d.M, d.C});
  }
  TORCH_CHECK(
      !given(grad_coef) || given(coef),
      op, ": grad_coef requires coef (the anchor's moments)");
  check_small(op, "present", present, at::kBool, {d.B, d.M});
  check_small(op, "mean", mean, acc, {d.B, K, d.C});
  check_small(op, "alpha", alpha, acc, {d.B, K, d.C});
  check_small(op, "beta", beta, acc, {d.B, K, d.C});
  check_grad_feats(op, grad_feats, d);
  if (given(grad_coef)) {
    check_small(op, "grad_coef", *grad_coef, acc, {d.B, d.M, d.C});
  }
  if (d.B * d.C == 0) {
    return;  // every output is empty
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.dtype, op, [&] {
    moments_bwd_impl<scalar_t>(feats, coef, present, mean, alpha, beta, grad_feats, grad_coef, d);
  });
}

void gkl_fwd(
    const at::Tensor& mu,
    const at::Tensor& logvar,
    const std::optional<at::Tensor>& present,
    const at::Tensor& nu,
    const at::Tensor& logtau2,
    const at::Tensor& logpi,
    const at::Tensor& loss,
    const std::optional<at::Tensor>& resp) {
  constexpr const char* op = "gkl_fwd";
  const GklDims g = check_gkl_common(op, mu, logvar, present, nu, logtau2);
  check_small(op, "logpi", logpi, g.acc, {g.J});
  check_small(op, "loss", loss, g.acc, {g.G, g.R});
  if (given(resp)) {
    check_small(op, "resp", *resp, g.acc, {g.G, g.R, g.J});
  }
  const bool* pr = given(present) ? present->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, op, [&] {
    gkl_fwd_impl<scalar_t>(mu, logvar, pr, nu, logtau2, logpi, loss, resp);
  });
}

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
    const std::optional<at::Tensor>& stats) {
  constexpr const char* op = "gkl_bwd";
  const GklDims g = check_gkl_common(op, mu, logvar, present, nu, logtau2);
  if (given(resp)) {
    check_small(op, "resp", *resp, g.acc, {g.G, g.R, g.J});
  } else {
    TORCH_CHECK(g.J == 1, op, ": resp may only be omitted for a single component (J == 1)");
  }
  check_tensor(op, "w", w, g.acc, {g.G, g.R});
  if (given(grad_mu)) {
    check_tensor(op, "grad_mu", *grad_mu, g.dtype, {g.G, g.R, g.C});
    check_out(op, "grad_mu", *grad_mu);
  }
  if (given(grad_logvar)) {
    check_tensor(op, "grad_logvar", *grad_logvar, g.dtype, {g.G, g.R, g.C});
    check_out(op, "grad_logvar", *grad_logvar);
  }
  if (given(stats)) {
    check_small(op, "stats", *stats, g.acc, {3, g.J, g.C});
  }
  const bool* pr = given(present) ? present->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, op, [&] {
    gkl_bwd_impl<scalar_t>(mu, logvar, pr, nu, logtau2, resp, w, grad_mu, grad_logvar, stats);
  });
}

} // namespace medmap_fast::cpu
