// CUDA kernels for masked modality fusion.
//
// No torch headers here on purpose: this translation unit must build with a
// bare nvcc in seconds. Tensor validation lives in register_cuda.cpp.
//
// Work decomposition. Every op works on a (B, C, S) index space, re-labelled
// per launch as (batch, outer, inner) where "inner" is the dimension that is
// unit-stride in the fast layouts:
//   * row plan      (NCS, stride_s == 1): outer = C, inner = S. A block owns a
//     chunk of one (b, c) row, so coef[b, k, c] is uniform per block.
//   * channel plan  (channels-last, stride_c == 1): outer = S, inner = C. A
//     block owns (b, channel tile, S chunk); threads are laid out as
//     TX channel groups x TY voxels so a warp reads whole contiguous voxels.
// Each thread handles UNROLL groups of VEC consecutive inner elements, where
// VEC * sizeof(element) == 16 bytes. A group is moved with one 128-bit access
// when every tensor of the launch is suitably aligned, otherwise element by
// element. The grouping (and hence every summation order) is identical in both
// cases, so results never depend on pointer alignment. Tensors whose strides
// fit neither layout go through the row plan with strided scalar accesses.
//
// Determinism: no atomics. The grad_coef reduction writes one partial per
// (b, k, c, block-chunk) using fixed-order warp and shared-memory trees; a
// second kernel sums the partials of each output in a fixed order.

#include "masked_fusion_kernels.h"
#include "device_common.cuh"

#include <climits>
#include <cstddef>
#include <cstdint>

namespace medmap_fast {
namespace gpu {
namespace {

constexpr int kMaxWarps = kWarps;

// The forward pass uses the explicitly rounded mul_rn / add_rn of
// device_common.cuh so that nvcc does not contract them into FMAs: the result
// then equals a plain sequential C++ loop on the host, which keeps CPU and
// CUDA outputs bitwise comparable.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename A>
__device__ __forceinline__ A warp_sum_rn(A v) {
  // Like warp_sum, with add_rn so that no addition is ever contracted.
  // Butterfly: every lane ends with the same bits because IEEE addition is
  // commutative, and the pairing is fixed, so the result is reproducible.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v = add_rn(v, __shfl_xor_sync(kFullMask, v, off));
  }
  return v;
}

// ---------------------------------------------------------------------------
// Tensor views and launch geometry.

// Element strides permuted into the plan's (batch, outer, inner) order.
struct View {
  void* data;
  int64_t sb;
  int64_t so;
  int64_t si;
};

struct ViewPack {
  View v[kMaxModalities];
};

enum Plan : int {
  kRowPlan = 0,         // outer = C, inner = S, inner stride 1
  kRowStridedPlan = 1,  // outer = C, inner = S, any inner stride (generic fallback)
  kChanPlan = 2,        // outer = S, inner = C, inner stride 1
};

// Groups per thread. 16-bit types carry 8 elements per group, so two groups
// keep their float accumulators inside the 64-register budget below while
// still putting 32 bytes per tensor per thread in flight.
__host__ __device__ constexpr int unroll_for(int elem_bytes) { return elem_bytes == 2 ? 2 : 4; }
// The copy keeps no accumulators, so every element size affords four groups.
constexpr int kCopyUnroll = 4;
// Modalities whose loads the forward pass issues together, doubling the bytes
// in flight per thread. The channel plan holds a coefficient per element of a
// group and has no registers to spare for a second batch.
__host__ __device__ constexpr int modality_batch(int plan) { return plan == kChanPlan ? 1 : 2; }

// Four resident 256-thread blocks (a 64-register cap) keep enough 16-byte
// loads in flight per SM to saturate HBM. The strided fallback needs more
// registers for its per-element addressing and is not worth spilling for.
constexpr int min_blocks(int plan) { return plan == kRowStridedPlan ? 2 : 4; }

struct Tiling {
  int64_t B;
  int64_t M;
  int64_t C;
  int64_t S;
  int64_t chunks;   // blocks along S per (b, c) in the row plans, per (b, tile) in the channel plan
  int64_t tiles;    // channel tiles; channel plan only, 1 otherwise
  int64_t nblocks;  // logical blocks; the grid may be smaller and loop
  int tx_log2;      // log2 of threads along the inner dimension
  int vec;          // nonzero: every tensor admits 16-byte accesses
};

template <int VEC>
__device__ __forceinline__ int group_count(int64_t remaining) {
  return remaining <= 0 ? 0 : (remaining >= VEC ? VEC : static_cast<int>(remaining));
}

// Which elements one thread touches within one logical block: group
// u = 0..UNROLL-1 sits at S position pos0 + u * step (an element index in the
// row plans, a voxel in the channel plan). Positions and addresses are derived
// on the fly rather than stored per group, which keeps 64-bit index arithmetic
// out of the long-lived register set.
template <int VEC, int UNROLL, int kPlan>
struct Geometry {
  static constexpr bool kChan = kPlan == kChanPlan;

  int64_t b;
  int64_t chunk;
  int64_t tile;
  int64_t chan0;  // row plans: the block's channel; channel plan: first channel of the thread's group
  int64_t pos0;   // row plans: first inner index; channel plan: first voxel
  int64_t step;   // distance between successive groups along S
  int64_t extent; // S
  int nchan;      // channel plan: valid channels in the thread's group

  __device__ __forceinline__ void init(const Tiling& g, int64_t blk, int tid) {
    extent = g.S;
    if constexpr (!kChan) {
      const int threads = 1 << g.tx_log2;
      chunk = blk % g.chunks;
      const int64_t row = blk / g.chunks;
      b = row / g.C;
      chan0 = row - b * g.C;
      tile = 0;
      nchan = 1;
      pos0 = (chunk * threads * UNROLL + tid) * VEC;
      step = static_cast<int64_t>(threads) * VEC;
    } else {
      const int tx = tid & ((1 << g.tx_log2) - 1);
      const int ty = tid >> g.tx_log2;
      const int rows = kThreads >> g.tx_log2;
      tile = blk % g.tiles;
      const int64_t rest = blk / g.tiles;
      chunk = rest % g.chunks;
      b = rest / g.chunks;
      chan0 = ((tile << g.tx_log2) + tx) * VEC;
      nchan = group_count<VEC>(g.C - chan0);
      pos0 = chunk * rows * UNROLL + ty;
      step = rows;
    }
  }

  // Valid elements in group u (0 for an idle group).
  __device__ __forceinline__ int count(int u) const {
    const int64_t pos = pos0 + u * step;
    if constexpr (!kChan) {
      return group_count<VEC>(extent - pos);
    } else {
      return pos < extent ? nchan : 0;
    }
  }

  // Element offset of group 0 in tensor t, and the offset between groups.
  __device__ __forceinline__ int64_t base(const View& t) const {
    if constexpr (!kChan) {
      return b * t.sb + chan0 * t.so + pos0 * t.si;
    } else {
      return b * t.sb + pos0 * t.so + chan0;
    }
  }
  __device__ __forceinline__ int64_t stride(const View& t) const {
    if constexpr (kPlan == kRowPlan) {
      return step;
    } else if constexpr (kPlan == kRowStridedPlan) {
      return step * t.si;
    } else {
      return step * t.so;
    }
  }
};

template <typename S, int VEC>
union Pack16 {
  uint4 raw;
  S e[VEC];
};

// 16-byte accesses go through the cache-operator intrinsics (ld.global.ca and
// st.global.wb are the default policies) because they are guaranteed to stay
// single 128-bit instructions: a plain store of the union is split into
// scalar stores once the compiler loses track of its alignment. Both are
// volatile asm and the store clobbers memory, so program order between a
// thread's loads and stores is kept.

// p points at the group's first element; si is only used by the strided plan.
template <typename S, int VEC, int kPlan>
__device__ __forceinline__ void load_group(const S* p, int64_t si, int n, bool vec,
                                           S (&x)[VEC]) {
  if constexpr (kPlan != kRowStridedPlan) {
    if (vec && n == VEC) {
      Pack16<S, VEC> pk;
      pk.raw = __ldca(reinterpret_cast<const uint4*>(p));
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = pk.e[e];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = e < n ? p[e] : S(0);
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = e < n ? p[e * si] : S(0);
  }
}

template <typename S, int VEC, int kPlan>
__device__ __forceinline__ void store_group(S* p, int64_t si, int n, bool vec,
                                            const S (&y)[VEC]) {
  if constexpr (kPlan != kRowStridedPlan) {
    if (vec && n == VEC) {
      Pack16<S, VEC> pk;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pk.e[e] = y[e];
      __stwb(reinterpret_cast<uint4*>(p), pk.raw);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < n) p[e] = y[e];
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e < n) p[e * si] = y[e];
    }
  }
}

// Loads groups 0..UNROLL-1 of tensor t for this thread.
template <typename S, int VEC, int UNROLL, int kPlan>
__device__ __forceinline__ void load_groups(const View& t, const Geometry<VEC, UNROLL, kPlan>& geo,
                                            bool vec, S (&x)[UNROLL][VEC]) {
  const S* p = static_cast<const S*>(t.data) + geo.base(t);
  const int64_t st = geo.stride(t);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    load_group<S, VEC, kPlan>(p + u * st, t.si, geo.count(u), vec, x[u]);
  }
}

template <typename S, int VEC, int UNROLL, int kPlan>
__device__ __forceinline__ void store_groups(const View& t, const Geometry<VEC, UNROLL, kPlan>& geo,
                                             bool vec, const S (&y)[UNROLL][VEC]) {
  S* p = static_cast<S*>(t.data) + geo.base(t);
  const int64_t st = geo.stride(t);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    store_group<S, VEC, kPlan>(p + u * st, t.si, geo.count(u), vec, y[u]);
  }
}

// coef_row points at coef[b, k, 0].
template <typename A, int VEC, int UNROLL, int kPlan>
__device__ __forceinline__ void load_coef(const A* coef_row,
                                          const Geometry<VEC, UNROLL, kPlan>& geo,
                                          A (&cf)[VEC]) {
  if constexpr (kPlan != kChanPlan) {
    const A c = coef_row[geo.chan0];
#pragma unroll
    for (int e = 0; e < VEC; ++e) cf[e] = c;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) cf[e] = e < geo.nchan ? coef_row[geo.chan0 + e] : A(0);
  }
}

__device__ __forceinline__ uint32_t presence_mask(const uint8_t* present, int64_t b, int M) {
  uint32_t mask = 0;
  for (int k = 0; k < M; ++k) mask |= (present[b * M + k] != 0 ? 1u : 0u) << k;
  return mask;
}

// ---------------------------------------------------------------------------
// Kernels.

struct FwdParams {
  ViewPack feat;
  View out;
  const void* coef;
  const uint8_t* present;
  Tiling g;
};

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, min_blocks(kPlan)) fuse_sum_fwd_kernel(const FwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int UNROLL = unroll_for(static_cast<int>(sizeof(S)));
  constexpr int MB = modality_batch(kPlan);
  const int M = static_cast<int>(p.g.M);
  const bool vec = p.g.vec != 0;

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geometry<VEC, UNROLL, kPlan> geo;
    geo.init(p.g, blk, static_cast<int>(threadIdx.x));
    const uint32_t mask = presence_mask(p.present, geo.b, M);
    const A* coef_b = static_cast<const A*>(p.coef) + geo.b * M * p.g.C;

    A acc[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = A(0);
    }

    // Present modalities are visited in ascending order, MB at a time so that
    // their loads overlap; absent ones are dropped from the mask before any
    // address is formed, so their memory is never touched.
    uint32_t todo = mask;
#pragma unroll 1
    while (todo != 0u) {
      int ks[MB];
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        ks[i] = todo != 0u ? __ffs(static_cast<int>(todo)) - 1 : -1;
        todo &= todo - 1u;
      }
      S x[MB][UNROLL][VEC];
      A cf[MB][VEC];
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        if (ks[i] >= 0) {
          load_coef(coef_b + ks[i] * p.g.C, geo, cf[i]);
          load_groups(p.feat.v[ks[i]], geo, vec, x[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        if (ks[i] < 0) continue;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc[u][e] = add_rn(acc[u][e], mul_rn(cf[i][e], Tr::to_acc(x[i][u][e])));
          }
        }
      }
    }

    S y[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) y[u][e] = Tr::from_acc(acc[u][e]);
    }
    store_groups(p.out, geo, vec, y);
  }
}

struct BwdParams {
  View grad;
  ViewPack feat;
  ViewPack gfeat;
  const void* coef;
  const uint8_t* present;
  void* partial;  // (B, M, C, chunks) of Tr::A; null when grad_coef is not wanted
  Tiling g;
};

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, min_blocks(kPlan)) fuse_sum_bwd_kernel(const BwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int UNROLL = unroll_for(static_cast<int>(sizeof(S)));
  constexpr bool kChan = kPlan == kChanPlan;
  // Row plans: one slot per (modality, warp). Channel plan: one slot per
  // (row of threads, channel of the tile), reused for each modality.
  __shared__ A red[kChan ? kThreads * VEC : kMaxModalities * kMaxWarps];

  const int M = static_cast<int>(p.g.M);
  const int64_t C = p.g.C;
  const bool vec = p.g.vec != 0;
  const bool want_coef = p.partial != nullptr;
  A* partial = static_cast<A*>(p.partial);
  const int tid = static_cast<int>(threadIdx.x);

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geometry<VEC, UNROLL, kPlan> geo;
    geo.init(p.g, blk, tid);
    const uint32_t mask = presence_mask(p.present, geo.b, M);
    const A* coef_b = static_cast<const A*>(p.coef) + geo.b * M * C;

    S gr[UNROLL][VEC];
    load_groups(p.grad, geo, vec, gr);

#pragma unroll 1
    for (int k = 0; k < M; ++k) {
      const bool on = (mask >> k) & 1u;
      const bool dot = want_coef && on;  // uniform across the block

      // Row plans reduce to one value per thread (the block has one channel);
      // the channel plan keeps one per channel of the thread's group.
      constexpr int NP = kChan ? VEC : 1;
      A part[NP];
#pragma unroll
      for (int i = 0; i < NP; ++i) part[i] = A(0);

      // Features are consumed before grad_feats[k] is written, so passing
      // the same memory for feats[k] and grad_feats[k] stays well defined.
      if (dot) {
        S x[UNROLL][VEC];
        load_groups(p.feat.v[k], geo, vec, x);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            A& acc = part[kChan ? e : 0];
            acc = fma_rn(Tr::to_acc(x[u][e]), Tr::to_acc(gr[u][e]), acc);
          }
        }
      }

      S y[UNROLL][VEC];
      if (on) {
        A cf[VEC];
        load_coef(coef_b + k * C, geo, cf);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) y[u][e] = Tr::from_acc(mul_rn(cf[e], Tr::to_acc(gr[u][e])));
        }
      } else {
        // Explicit zero: coef * grad would turn a non-finite grad into NaN.
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) y[u][e] = Tr::from_acc(A(0));
        }
      }
      store_groups(p.gfeat.v[k], geo, vec, y);

      if (!dot) continue;

      if constexpr (!kChan) {
        const A s = warp_sum_rn(part[0]);
        if ((tid & 31) == 0) red[k * kMaxWarps + (tid >> 5)] = s;
      } else {
        // Lanes that share a channel group differ in the bits above log2(TX);
        // fold those within the warp, then across rows through shared memory.
        const int tx_count = 1 << p.g.tx_log2;
        const int row_width = tx_count > 32 ? tx_count : 32;
        const int row = tid / row_width;
        const int nrows = kThreads / row_width;
        const int tx = tid & (tx_count - 1);
        const int cols = tx_count * VEC;
        for (int off = tx_count; off < 32; off <<= 1) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            part[e] = add_rn(part[e], __shfl_xor_sync(kFullMask, part[e], off));
          }
        }
        if ((tid & (row_width - 1)) < tx_count) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) red[row * cols + tx * VEC + e] = part[e];
        }
        __syncthreads();
        for (int col = tid; col < cols; col += kThreads) {
          const int64_t c = geo.tile * cols + col;
          if (c < C) {
            A s = red[col];
            for (int r = 1; r < nrows; ++r) s = add_rn(s, red[r * cols + col]);
            partial[((geo.b * M + k) * C + c) * p.g.chunks + geo.chunk] = s;
          }
        }
        __syncthreads();
      }
    }

    if constexpr (!kChan) {
      if (want_coef) {
        __syncthreads();
        const int nwarps = (1 << p.g.tx_log2) >> 5;
        if (tid < M && ((mask >> tid) & 1u)) {
          A s = red[tid * kMaxWarps];
          for (int w = 1; w < nwarps; ++w) s = add_rn(s, red[tid * kMaxWarps + w]);
          partial[((geo.b * M + tid) * C + geo.chan0) * p.g.chunks + geo.chunk] = s;
        }
        __syncthreads();
      }
    }
  }
}

// grad_coef[o] = present ? sum of the o-th run of partials : 0, one block per
// output, fixed order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const A* __restrict__ partial, const uint8_t* __restrict__ present,
                           A* __restrict__ out, int64_t n_out, int64_t C, int64_t chunks) {
  __shared__ A warp_sums[kMaxWarps];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    const bool on = present[o / C] != 0;
    A s = A(0);
    if (on) {
      for (int64_t i = tid; i < chunks; i += kThreads) s = add_rn(s, partial[o * chunks + i]);
      s = warp_sum_rn(s);
    }
    if ((tid & 31) == 0) warp_sums[tid >> 5] = s;
    __syncthreads();
    if (tid == 0) {
      A t = warp_sums[0];
      for (int w = 1; w < kMaxWarps; ++w) t = add_rn(t, warp_sums[w]);
      out[o] = on ? t : A(0);
    }
    __syncthreads();
  }
}

struct CopyParams {
  ViewPack src;
  ViewPack dst;
  const uint8_t* present;
  Tiling g;
};

template <typename S, int kPlan>
__global__ void __launch_bounds__(kThreads, min_blocks(kPlan)) masked_copy_kernel(const CopyParams p) {
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int UNROLL = kCopyUnroll;
  const int M = static_cast<int>(p.g.M);
  const bool vec = p.g.vec != 0;

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geometry<VEC, UNROLL, kPlan> geo;
    geo.init(p.g, blk, static_cast<int>(threadIdx.x));
    const uint32_t mask = presence_mask(p.present, geo.b, M);
#pragma unroll 1
    for (int k = 0; k < M; ++k) {
      S x[UNROLL][VEC];
      if ((mask >> k) & 1u) {
        load_groups(p.src.v[k], geo, vec, x);
      } else {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[u][e] = S(0);
        }
      }
      store_groups(p.dst.v[k], geo, vec, x);
    }
  }
}

// ---------------------------------------------------------------------------
// Host-side planning.

bool valid_shape(const FusionShape& sh) {
  return sh.M >= 1 && sh.M <= kMaxModalities && sh.B >= 0 && sh.C >= 0 && sh.S >= 0;
}

// The tensors taking part in one launch; layout and alignment decisions are
// made jointly because every tensor is addressed through the same groups.
struct TensorSet {
  const StridedTensor3* t[2 * kMaxModalities + 1];
  int n = 0;
  void add(const StridedTensor3& x) { t[n++] = &x; }
};

// Strides of size-1 dimensions never influence addressing, so they are
// ignored when classifying the layout.
Plan choose_plan(const FusionShape& sh, const TensorSet& ts) {
  bool s_unit = true;
  bool c_unit = true;
  for (int i = 0; i < ts.n; ++i) {
    if (sh.S > 1 && ts.t[i]->stride_s != 1) s_unit = false;
    if (sh.C > 1 && ts.t[i]->stride_c != 1) c_unit = false;
  }
  if (s_unit && sh.S > 1) return kRowPlan;
  if (c_unit && sh.C > 1) return kChanPlan;
  // With S <= 1 every group holds at most one element, so the inner stride
  // is never applied and the contiguous row plan is exact.
  return s_unit ? kRowPlan : kRowStridedPlan;
}

View make_view(const StridedTensor3& t, Plan plan) {
  return plan == kChanPlan ? View{t.data, t.stride_b, t.stride_s, t.stride_c}
                           : View{t.data, t.stride_b, t.stride_c, t.stride_s};
}

bool vector_ok(const FusionShape& sh, const TensorSet& ts, Plan plan, int vec_elems) {
  if (plan == kRowStridedPlan) return false;
  const int64_t n_outer = plan == kChanPlan ? sh.S : sh.C;
  for (int i = 0; i < ts.n; ++i) {
    const View v = make_view(*ts.t[i], plan);
    if (reinterpret_cast<uintptr_t>(v.data) % kVecBytes != 0) return false;
    if (sh.B > 1 && v.sb % vec_elems != 0) return false;
    if (n_outer > 1 && v.so % vec_elems != 0) return false;
  }
  return true;
}

// Depends only on the shape, the element size and the plan (never on
// alignment), so every reduction order is a function of sizes and strides.
Tiling make_tiling(const FusionShape& sh, Plan plan, int elem_bytes, int unroll) {
  const int vec_elems = kVecBytes / elem_bytes;
  Tiling g{};
  g.B = sh.B;
  g.M = sh.M;
  g.C = sh.C;
  g.S = sh.S;
  if (plan != kChanPlan) {
    const int64_t groups = ceil_div(sh.S, vec_elems);
    const int64_t want = ceil_div(groups, unroll);
    int lg = 5;  // at least one warp: the reductions use full-warp shuffles
    while (lg < 8 && (int64_t{1} << lg) < want) ++lg;
    g.tx_log2 = lg;
    g.tiles = 1;
    g.chunks = ceil_div(groups, (int64_t{1} << lg) * unroll);
    g.nblocks = sh.B * sh.C * g.chunks;
  } else {
    const int64_t groups = ceil_div(sh.C, vec_elems);
    int lg = 0;
    while (lg < 8 && (int64_t{1} << lg) < groups) ++lg;
    g.tx_log2 = lg;
    g.tiles = ceil_div(groups, int64_t{1} << lg);
    const int64_t rows = kThreads >> lg;
    g.chunks = ceil_div(sh.S, rows * unroll);
    g.nblocks = sh.B * g.tiles * g.chunks;
  }
  return g;
}

int block_threads(const Tiling& g, Plan plan) {
  return plan == kChanPlan ? kThreads : (1 << g.tx_log2);
}

ViewPack make_pack(const TensorPack& tp, int64_t M, Plan plan) {
  ViewPack vp{};
  for (int64_t k = 0; k < M; ++k) vp.v[k] = make_view(tp.t[k], plan);
  return vp;
}

template <class Tr>
cudaError_t fwd_impl(const FusionShape& sh, const TensorPack& feats, const void* coef,
                     const uint8_t* present, const StridedTensor3& out, cudaStream_t stream) {
  constexpr int elem_bytes = static_cast<int>(sizeof(typename Tr::S));
  TensorSet ts;
  for (int64_t k = 0; k < sh.M; ++k) ts.add(feats.t[k]);
  ts.add(out);
  const Plan plan = choose_plan(sh, ts);

  FwdParams p{};
  p.feat = make_pack(feats, sh.M, plan);
  p.out = make_view(out, plan);
  p.coef = coef;
  p.present = present;
  p.g = make_tiling(sh, plan, elem_bytes, unroll_for(elem_bytes));
  p.g.vec = vector_ok(sh, ts, plan, kVecBytes / elem_bytes) ? 1 : 0;
  if (p.g.nblocks == 0) return cudaSuccess;

  const unsigned grid = grid_for(p.g.nblocks);
  const int threads = block_threads(p.g, plan);
  switch (plan) {
    case kRowPlan:
      fuse_sum_fwd_kernel<Tr, kRowPlan><<<grid, threads, 0, stream>>>(p);
      break;
    case kRowStridedPlan:
      fuse_sum_fwd_kernel<Tr, kRowStridedPlan><<<grid, threads, 0, stream>>>(p);
      break;
    case kChanPlan:
      fuse_sum_fwd_kernel<Tr, kChanPlan><<<grid, threads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

struct BwdPlan {
  Plan plan;
  Tiling g;
  size_t workspace_bytes;
};

BwdPlan plan_bwd(DType dtype, const FusionShape& sh, const StridedTensor3& grad,
                 const TensorPack& feats, const TensorPack& grad_feats, bool with_grad_coef) {
  const int elem_bytes = element_size(dtype);
  TensorSet ts;
  ts.add(grad);
  for (int64_t k = 0; k < sh.M; ++k) ts.add(grad_feats.t[k]);
  if (with_grad_coef) {
    for (int64_t k = 0; k < sh.M; ++k) ts.add(feats.t[k]);
  }
  BwdPlan bp{};
  bp.plan = choose_plan(sh, ts);
  bp.g = make_tiling(sh, bp.plan, elem_bytes, unroll_for(elem_bytes));
  bp.g.vec = vector_ok(sh, ts, bp.plan, kVecBytes / elem_bytes) ? 1 : 0;
  bp.workspace_bytes =
      (with_grad_coef && bp.g.nblocks > 0)
          ? static_cast<size_t>(sh.B * sh.M * sh.C * bp.g.chunks) * acc_size(dtype)
          : 0;
  return bp;
}

template <class Tr>
cudaError_t bwd_impl(const BwdPlan& bp, const FusionShape& sh, const StridedTensor3& grad,
                     const TensorPack& feats, const void* coef, const uint8_t* present,
                     const TensorPack& grad_feats, void* grad_coef, void* workspace,
                     cudaStream_t stream) {
  using A = typename Tr::A;
  const Plan plan = bp.plan;
  BwdParams p{};
  p.grad = make_view(grad, plan);
  if (grad_coef != nullptr) p.feat = make_pack(feats, sh.M, plan);
  p.gfeat = make_pack(grad_feats, sh.M, plan);
  p.coef = coef;
  p.present = present;
  p.partial = grad_coef != nullptr ? workspace : nullptr;
  p.g = bp.g;

  if (p.g.nblocks > 0) {
    const unsigned grid = grid_for(p.g.nblocks);
    const int threads = block_threads(p.g, plan);
    switch (plan) {
      case kRowPlan:
        fuse_sum_bwd_kernel<Tr, kRowPlan><<<grid, threads, 0, stream>>>(p);
        break;
      case kRowStridedPlan:
        fuse_sum_bwd_kernel<Tr, kRowStridedPlan><<<grid, threads, 0, stream>>>(p);
        break;
      case kChanPlan:
        fuse_sum_bwd_kernel<Tr, kChanPlan><<<grid, threads, 0, stream>>>(p);
        break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  const int64_t n_out = sh.B * sh.M * sh.C;
  if (grad_coef != nullptr && n_out > 0) {
    // With no voxels there are no partials; the kernel then writes zeros.
    const int64_t chunks = p.g.nblocks > 0 ? p.g.chunks : 0;
    reduce_partials_kernel<A><<<grid_for(n_out), kThreads, 0, stream>>>(
        static_cast<const A*>(workspace), present, static_cast<A*>(grad_coef), n_out, sh.C,
        chunks);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename S>
cudaError_t copy_impl(const FusionShape& sh, const TensorPack& src, const uint8_t* present,
                      const TensorPack& dst, cudaStream_t stream) {
  constexpr int elem_bytes = static_cast<int>(sizeof(S));
  TensorSet ts;
  for (int64_t k = 0; k < sh.M; ++k) {
    ts.add(src.t[k]);
    ts.add(dst.t[k]);
  }
  const Plan plan = choose_plan(sh, ts);
  CopyParams p{};
  p.src = make_pack(src, sh.M, plan);
  p.dst = make_pack(dst, sh.M, plan);
  p.present = present;
  p.g = make_tiling(sh, plan, elem_bytes, kCopyUnroll);
  p.g.vec = vector_ok(sh, ts, plan, kVecBytes / elem_bytes) ? 1 : 0;
  if (p.g.nblocks == 0) return cudaSuccess;

  const unsigned grid = grid_for(p.g.nblocks);
  const int threads = block_threads(p.g, plan);
  switch (plan) {
    case kRowPlan:
      masked_copy_kernel<S, kRowPlan><<<grid, threads, 0, stream>>>(p);
      break;
    case kRowStridedPlan:
      masked_copy_kernel<S, kRowStridedPlan><<<grid, threads, 0, stream>>>(p);
      break;
    case kChanPlan:
      masked_copy_kernel<S, kChanPlan><<<grid, threads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public launchers.

cudaError_t launch_fuse_sum_fwd(DType dtype, const FusionShape& shape, const TensorPack& feats,
                                const void* coef, const uint8_t* present,
                                const StridedTensor3& out, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return fwd_impl<TraitsF32>(shape, feats, coef, present, out, stream);
    case DType::kFloat16:
      return fwd_impl<TraitsF16>(shape, feats, coef, present, out, stream);
    case DType::kBFloat16:
      return fwd_impl<TraitsBF16>(shape, feats, coef, present, out, stream);
    case DType::kFloat64:
      return fwd_impl<TraitsF64>(shape, feats, coef, present, out, stream);
  }
  return cudaErrorInvalidValue;
}

size_t fuse_sum_bwd_workspace_bytes(DType dtype, const FusionShape& shape,
                                    const StridedTensor3& grad, const TensorPack& feats,
                                    const TensorPack& grad_feats, bool with_grad_coef) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return 0;
  return plan_bwd(dtype, shape, grad, feats, grad_feats, with_grad_coef).workspace_bytes;
}

cudaError_t launch_fuse_sum_bwd(DType dtype, const FusionShape& shape, const StridedTensor3& grad,
                                const TensorPack& feats, const void* coef, const uint8_t* present,
                                const TensorPack& grad_feats, void* grad_coef, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  const BwdPlan plan = plan_bwd(dtype, shape, grad, feats, grad_feats, grad_coef != nullptr);
  if (plan.workspace_bytes > 0) {
    if (workspace == nullptr || workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(workspace) % acc_size(dtype) != 0) return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32:
      return bwd_impl<TraitsF32>(plan, shape, grad, feats, coef, present, grad_feats, grad_coef,
                                 workspace, stream);
    case DType::kFloat16:
      return bwd_impl<TraitsF16>(plan, shape, grad, feats, coef, present, grad_feats, grad_coef,
                                 workspace, stream);
    case DType::kBFloat16:
      return bwd_impl<TraitsBF16>(plan, shape, grad, feats, coef, present, grad_feats, grad_coef,
                                  workspace, stream);
    case DType::kFloat64:
      return bwd_impl<TraitsF64>(plan, shape, grad, feats, coef, present, grad_feats, grad_coef,
                                 workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_masked_copy(DType dtype, const FusionShape& shape, const TensorPack& src,
                               const uint8_t* present, const TensorPack& dst,
                               cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  switch (element_size(dtype)) {
    case 2:
      return copy_impl<unsigned short>(shape, src, present, dst, stream);
    case 4:
      return copy_impl<unsigned int>(shape, src, present, dst, stream);
    case 8:
      return copy_impl<unsigned long long>(shape, src, present, dst, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace gpu
}  // namespace medmap_fast
