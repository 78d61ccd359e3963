// Training-mode BatchNorm + (residual add) + ReLU over channels_last tensors in two passes over
// memory each way, for the CPU. Built on first use by reslab/models/bn_act.py.
//
// A channels_last [N, C, H, W] tensor is N*H*W pixels of C contiguous channels. The loops walk
// it as rows of R values, R = 64 where C divides 64 (16 or 32 channels: 4 or 2 pixels a row) and
// R = C otherwise, each row as R/16 vectors of 16 fp32 lanes (one AVX-512 register; a plain
// 16-float struct elsewhere). Column k of a row is channel k % C. Activations are bf16 (raw
// uint16) or fp32; sums run in fp32 over chunks of kChunk rows and in double across chunks.
//
// forward : pass 1 sums (x - shift) and its square per channel; pass 2 writes
//           y = relu(x * a + b' [+ r]) with a = weight * rstd, b' = bias - mean * a, and one
//           bit per value, z > 0: the ReLU's mask, 1/16 of a bf16 tensor's bytes;
//           forward_train also updates the running statistics (shift = running mean).
// backward: pass 1 sums g and g * (x - mean) with g = dy where the mask is set, else 0; pass 2
//           writes dx = a * (g - sum_g / M - (x - mean) * rstd^2 * sum_gx / M) and, with a
//           residual, dr = g (the gradient the shortcut receives). Reading the mask instead of
//           y saves 2 of the 8 bytes each bf16 value costs in both passes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "api.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RESLAB_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
// CPUs without AVX-512 (e.g. AMD Zen 3): the portable struct below, compiled for AVX2, made the
// fp32 training step 8-25% slower than eager BN/ReLU/adds (ResNet-20/56, bench_train.py).
#include <immintrin.h>
#define RESLAB_AVX2 1
#endif

namespace {

constexpr int64_t kLanes = 16;   // C must be a multiple: one vector of fp32
static_assert(sizeof(uint64_t) == 4 * sizeof(uint16_t), "a packed row's mask is 4 words");
constexpr int64_t kGrain = 512;  // rows per parallel task, at least (a part of the sums too)
constexpr int64_t kChunk = 256;  // rows summed in fp32 before the double totals
constexpr int64_t kChunkValues = 32768;  // at most, for rows of run-time width
// Every streaming loop asks for the bytes this far ahead of what it reads now. The tensors
// (4 MB at a CIFAR net's first stage, batch 128, bf16) outgrow the core's L2 and come from a
// large, slow-to-answer L3 or memory, where the hardware prefetchers alone left these loops at
// about 10 GB/s; 2 KB ahead made a ResNet-20 training step ~5% faster on a 2-core Xeon with
// AMX (1 KB ~4%, 4-8 KB no better; benchmarks/ab_session25.py builds it with 0 to compare).
#ifndef RESLAB_PREFETCH_BYTES
#define RESLAB_PREFETCH_BYTES 2048
#endif
constexpr int64_t kPrefetchBytes = RESLAB_PREFETCH_BYTES;
template <typename T>
inline void prefetch(const T* p) {  // a hint: never faults, even past the end of a tensor
  if constexpr (kPrefetchBytes > 0)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}
// The same for the lines a loop is about to write (owned for writing ahead of the stores:
// x1.017 a ResNet-20 step, x1.006 ResNet-56 over reads alone, benchmarks/ab_session25.py).
#ifndef RESLAB_PREFETCH_WRITES
#define RESLAB_PREFETCH_WRITES 1
#endif
template <typename T>
inline void prefetch_write(const T* p) {
  if constexpr (kPrefetchBytes > 0 && RESLAB_PREFETCH_WRITES)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 1, 3);
}

#ifdef RESLAB_AVX512
using V = __m512;
using Mask = uint16_t;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const uint16_t* p) {  // bf16 -> fp32 is exact: the bits go to the high half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstore(uint16_t* p, V v) {  // fp32 -> bf16, round to nearest even
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#endif
}
// fp32 -> bf16 exactly as torch's vectorised conversion (its bf16 add's): nearest even,
// subnormals kept (the bf16 instruction above flushes them to zero), any NaN stored as 0xFFFF.
// For results that must be torch's bits.
inline void vstore_exact(uint16_t* p, V v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(u));
}
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline V vfnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline Mask vpositive(V z) { return _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ); }
// max(0, z) returns its second operand when one is NaN: a NaN stays NaN, as in torch.relu.
inline V vrelu(V z) { return _mm512_max_ps(_mm512_setzero_ps(), z); }
inline V vkeep(Mask m, V g) { return _mm512_maskz_mov_ps(m, g); }
#elif defined(RESLAB_AVX2)
// 16 lanes as two AVX2 registers, with the AVX-512 code's semantics lane for lane.
struct V {
  __m256 lo, hi;
};
using Mask = uint16_t;
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 load_bf16x8(const uint16_t* p) {  // exact: the bits go to the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V vload(const uint16_t* p) { return {load_bf16x8(p), load_bf16x8(p + 8)}; }
inline void vstore(float* p, V v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline __m256i bf16_bits(__m256 v) {  // fp32 -> bf16 bits in each 32-bit lane, nearest even
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                           16);
}
inline void store_bf16x8(uint16_t* p, __m256i b) {  // lanes hold 0..0xFFFF: the pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
inline void vstore(uint16_t* p, V v) {
  store_bf16x8(p, bf16_bits(v.lo));
  store_bf16x8(p + 8, bf16_bits(v.hi));
}
inline __m256i nan_as_ffff(__m256 v, __m256i b) {  // torch's vector conversion stores 0xFFFF
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_or_si256(b, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF)));
}
inline void vstore_exact(uint16_t* p, V v) {  // as vstore, and any NaN as 0xFFFF
  store_bf16x8(p, nan_as_ffff(v.lo, bf16_bits(v.lo)));
  store_bf16x8(p + 8, nan_as_ffff(v.hi, bf16_bits(v.hi)));
}
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V vsub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V vfma(V a, V b, V c) {  // a * b + c
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V vfnma(V a, V b, V c) {  // c - a * b
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline Mask vpositive(V z) {
  const __m256 zero = _mm256_setzero_ps();
  return Mask(_mm256_movemask_ps(_mm256_cmp_ps(z.lo, zero, _CMP_GT_OQ)) |
              (_mm256_movemask_ps(_mm256_cmp_ps(z.hi, zero, _CMP_GT_OQ)) << 8));
}
// max(0, z) returns its second operand when one is NaN: a NaN stays NaN, as in torch.relu.
inline V vrelu(V z) {
  const __m256 zero = _mm256_setzero_ps();
  return {_mm256_max_ps(zero, z.lo), _mm256_max_ps(zero, z.hi)};
}
inline __m256 keep8(int bits, __m256 g) {  // g where bit i of `bits` is set, else +0
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), bit), bit);
  return _mm256_and_ps(_mm256_castsi256_ps(on), g);
}
inline V vkeep(Mask m, V g) { return {keep8(m & 0xFF, g.lo), keep8(m >> 8, g.hi)}; }
#else
// Portable: 16 floats as a struct whose loops the compiler vectorises for the CPU it targets.
struct V {
  float f[kLanes];
};
using Mask = uint16_t;
inline float sload(const float* p, int64_t i) { return p[i]; }
inline float sload(const uint16_t* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline V vzero() { return V{}; }
template <typename T>
inline V vload(const T* p) {
  V r;
  for (int i = 0; i < kLanes; ++i) r.f[i] = sload(p, i);
  return r;
}
inline void vstore(float* p, V v) { std::memcpy(p, v.f, sizeof v.f); }
inline void vstore(uint16_t* p, V v) {
  for (int i = 0; i < kLanes; ++i) {  // round to nearest even, as torch's conversion does
    uint32_t u;
    std::memcpy(&u, &v.f[i], 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    p[i] = uint16_t(u >> 16);
  }
}
inline void vstore_exact(uint16_t* p, V v) {  // as vstore, and any NaN as torch's vector 0xFFFF
  vstore(p, v);
  for (int i = 0; i < kLanes; ++i)
    if (std::isnan(v.f[i])) p[i] = 0xFFFF;
}
#define RESLAB_V_OP(name, expr)                           \
  inline V name(V a, V b) {                               \
    V r;                                                  \
    for (int i = 0; i < kLanes; ++i) r.f[i] = (expr);     \
    return r;                                             \
  }
RESLAB_V_OP(vadd, a.f[i] + b.f[i])
RESLAB_V_OP(vsub, a.f[i] - b.f[i])
#undef RESLAB_V_OP
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < kLanes; ++i) c.f[i] = a.f[i] * b.f[i] + c.f[i];
  return c;
}
inline V vfnma(V a, V b, V c) {
  for (int i = 0; i < kLanes; ++i) c.f[i] = c.f[i] - a.f[i] * b.f[i];
  return c;
}
inline Mask vpositive(V z) {
  Mask m = 0;
  for (int i = 0; i < kLanes; ++i) m |= Mask(z.f[i] > 0.f) << i;
  return m;
}
inline V vrelu(V z) {
  for (int i = 0; i < kLanes; ++i) z.f[i] = z.f[i] <= 0.f ? 0.f : z.f[i];  // NaN stays NaN
  return z;
}
inline V vkeep(Mask m, V g) {
  for (int i = 0; i < kLanes; ++i) g.f[i] = (m >> i) & 1 ? g.f[i] : 0.f;
  return g;
}
#endif

// Adds a vector's lanes into 16 double totals.
inline void flush(V v, double* t) {
  alignas(64) float f[kLanes];
  vstore(f, v);
  for (int i = 0; i < kLanes; ++i) t[i] += f[i];
}

inline void vstore_exact(float* p, V v) { vstore(p, v); }

// The row geometry: R values a row, NV = R / 16 vectors; NVT > 0 fixes NV at compile time
// (the packed 64-wide rows), so row loops unroll and per-column constants stay in registers.
template <int64_t NVT>
struct Rows {
  int64_t C, NV, R, M;
  explicit Rows(const at::Tensor& x)
      : C(x.size(1)), NV(NVT > 0 ? NVT : x.size(1) / kLanes), R(NV * kLanes), M(x.numel() / R) {}
  // One value per column from a per-channel array.
  std::vector<float> columns(const float* per_channel) const {
    std::vector<float> out(static_cast<size_t>(R));
    for (int64_t k = 0; k < R; ++k) out[k] = per_channel[k % C];
    return out;
  }
};

// Column sums are taken in parts, one per thread: part p covers rows [M p / P, M (p + 1) / P)
// and owns its slot of 2 x R doubles ([sum 1 | sum 2] per column), so the totals do not depend
// on which thread ran which part.
struct Totals {
  int64_t R, parts;
  std::vector<double> t;
  Totals(int64_t R_, int64_t M)
      : R(R_),
        parts(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / kGrain))),
        t(static_cast<size_t>(2 * R_ * parts), 0.0) {}
  template <typename F>
  void run(int64_t M, F&& f) {  // f(slot, m0, m1) for every part, in parallel
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) f(t.data() + 2 * R * p, M * p / parts, M * (p + 1) / parts);
    });
  }
  void per_channel(int64_t C, std::vector<double>& s1, std::vector<double>& s2) const {
    s1.assign(static_cast<size_t>(C), 0.0);
    s2.assign(static_cast<size_t>(C), 0.0);
    for (size_t base = 0; base < t.size(); base += 2 * R)
      for (int64_t k = 0; k < R; ++k) {
        s1[k % C] += t[base + k];
        s2[k % C] += t[base + R + k];
      }
  }
};

// Sums over rows [m0, m1) of f(row, j) -> (v1, v2) per vector j into tot (2 x R doubles),
// in fp32 per chunk of rows. Run-time-width rows are summed a column of vectors at a time, so
// their chunk is kept to kChunkValues values (it stays in cache from one column to the next).
template <int64_t NVT, typename F>
inline void column_sums(const Rows<NVT>& g, int64_t m0, int64_t m1, double* tot, F&& f) {
  constexpr int64_t kMaxNV = NVT > 0 ? NVT : 1;
  const int64_t chunk = NVT > 0 ? kChunk : std::clamp<int64_t>(kChunkValues / g.R, 8, kChunk);
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = std::min(m1, c0 + chunk);
    if constexpr (NVT > 0) {
      V s1[kMaxNV], s2[kMaxNV];
      for (int64_t j = 0; j < NVT; ++j) s1[j] = s2[j] = vzero();
      for (int64_t m = c0; m < c1; ++m)
        for (int64_t j = 0; j < NVT; ++j) f(m, j, s1[j], s2[j]);
      for (int64_t j = 0; j < NVT; ++j) {
        flush(s1[j], tot + j * kLanes);
        flush(s2[j], tot + g.R + j * kLanes);
      }
    } else {
      for (int64_t j = 0; j < g.NV; ++j) {
        V s1 = vzero(), s2 = vzero();
        for (int64_t m = c0; m < c1; ++m) f(m, j, s1, s2);
        flush(s1, tot + j * kLanes);
        flush(s2, tot + g.R + j * kLanes);
      }
    }
  }
}

// Per-column constants as vectors: held in registers for NVT > 0, loaded from memory otherwise.
template <int64_t NVT>
struct Consts {
  static constexpr int64_t kN = NVT > 0 ? NVT : 1;
  V v[kN];
  const float* p;
  explicit Consts(const float* p_) : p(p_) {
    if constexpr (NVT > 0)
      for (int64_t j = 0; j < NVT; ++j) v[j] = vload(p_ + j * kLanes);
  }
  V operator[](int64_t j) const {
    if constexpr (NVT > 0)
      return v[j];
    else
      return vload(p + j * kLanes);
  }
};

template <typename T, int64_t NVT>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight,
                  const at::Tensor& bias, const at::Tensor& shift, double eps, at::Tensor& y,
                  at::Tensor& mask, at::Tensor& mean, at::Tensor& var, at::Tensor& rstd) {
  const Rows<NVT> g(x);
  const T* __restrict__ xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* __restrict__ rp = r.defined() ? reinterpret_cast<const T*>(r.data_ptr()) : nullptr;
  T* __restrict__ yp = reinterpret_cast<T*>(y.data_ptr());
  Mask* __restrict__ mp = reinterpret_cast<Mask*>(mask.data_ptr());
  const std::vector<float> shift_c = g.columns(shift.data_ptr<float>());
  Totals totals(g.R, g.M);
  totals.run(g.M, [&](double* slot, int64_t m0, int64_t m1) {
    const Consts<NVT> sh(shift_c.data());
    column_sums(g, m0, m1, slot, [&](int64_t m, int64_t j, V& s1, V& s2) {
      prefetch(xp + m * g.R + j * kLanes);
      const V v = vsub(vload(xp + m * g.R + j * kLanes), sh[j]);
      s1 = vadd(s1, v);
      s2 = vfma(v, v, s2);
    });
  });
  std::vector<double> s1, s2;
  totals.per_channel(g.C, s1, s2);
  // Shifted sums keep the variance exact to fp32 when |mean| >> std (shift = running mean).
  const double n = double(x.numel() / g.C);  // values per channel
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  const float* sp = shift.data_ptr<float>();
  float* mu = mean.data_ptr<float>();
  float* va = var.data_ptr<float>();
  float* rs = rstd.data_ptr<float>();
  std::vector<float> a(static_cast<size_t>(g.C)), b(static_cast<size_t>(g.C));
  for (int64_t c = 0; c < g.C; ++c) {
    const double d = s1[c] / n;
    const double v = std::max(s2[c] / n - d * d, 0.0);
    mu[c] = float(d + sp[c]);
    va[c] = float(v);
    rs[c] = float(1.0 / std::sqrt(v + eps));
    a[c] = w[c] * rs[c];
    b[c] = bi[c] - mu[c] * a[c];
  }
  const std::vector<float> a_c = g.columns(a.data()), b_c = g.columns(b.data());
  auto pass2 = [&](auto with_r) {
    at::parallel_for(0, g.M, kGrain, [&](int64_t m0, int64_t m1) {
      const Consts<NVT> av(a_c.data()), bv(b_c.data());
      for (int64_t m = m0; m < m1; ++m) {
        uint64_t bits = 0;  // a packed row's 4 masks go out as one 8-byte store
        for (int64_t j = 0; j < g.NV; ++j) {
          const int64_t o = m * g.R + j * kLanes;
          prefetch(xp + o);
          if constexpr (decltype(with_r)::value) prefetch(rp + o);
          prefetch_write(yp + o);
          V z = vfma(vload(xp + o), av[j], bv[j]);
          if constexpr (decltype(with_r)::value) z = vadd(z, vload(rp + o));
          if constexpr (NVT > 0)
            bits |= uint64_t(vpositive(z)) << (16 * j);
          else
            mp[m * g.NV + j] = vpositive(z);
          vstore(yp + o, vrelu(z));
        }
        if constexpr (NVT > 0) std::memcpy(mp + m * NVT, &bits, sizeof bits);
      }
    });
  };
  if (rp)
    pass2(std::true_type{});
  else
    pass2(std::false_type{});
}

template <typename T, int64_t NVT>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                   const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                   at::Tensor& dx, at::Tensor& dr, at::Tensor& dw, at::Tensor& db) {
  const Rows<NVT> g(x);
  const T* __restrict__ gp = reinterpret_cast<const T*>(dy.data_ptr());
  const T* __restrict__ xp = reinterpret_cast<const T*>(x.data_ptr());
  const Mask* __restrict__ mp = reinterpret_cast<const Mask*>(mask.data_ptr());
  T* __restrict__ dxp = reinterpret_cast<T*>(dx.data_ptr());
  T* __restrict__ drp = dr.defined() ? reinterpret_cast<T*>(dr.data_ptr()) : nullptr;
  const std::vector<float> mean_c = g.columns(mean.data_ptr<float>());
  Totals totals(g.R, g.M);
  totals.run(g.M, [&](double* slot, int64_t m0, int64_t m1) {
    const Consts<NVT> mu(mean_c.data());
    column_sums(g, m0, m1, slot, [&](int64_t m, int64_t j, V& s1, V& s2) {
      const int64_t o = m * g.R + j * kLanes;
      prefetch(gp + o);
      prefetch(xp + o);
      const V gv = vkeep(mp[m * g.NV + j], vload(gp + o));
      s1 = vadd(s1, gv);
      s2 = vfma(gv, vsub(vload(xp + o), mu[j]), s2);
    });
  });
  std::vector<double> sg, sgx;
  totals.per_channel(g.C, sg, sgx);
  const double n = double(x.numel() / g.C);
  const float* w = weight.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  // dx = a * g - a * sum_g / n - a * rstd^2 * sum_gx / n * (x - mean), per channel.
  std::vector<float> a(static_cast<size_t>(g.C)), k1(a.size()), k2(a.size());
  for (int64_t c = 0; c < g.C; ++c) {
    dwp[c] = float(sgx[c]) * rs[c];
    dbp[c] = float(sg[c]);
    a[c] = w[c] * rs[c];
    k1[c] = float(-double(a[c]) * sg[c] / n);
    k2[c] = float(double(a[c]) * rs[c] * rs[c] * sgx[c] / n);
  }
  const std::vector<float> a_c = g.columns(a.data()), k1_c = g.columns(k1.data()),
                           k2_c = g.columns(k2.data());
  auto pass2 = [&](auto with_r) {
    at::parallel_for(0, g.M, kGrain, [&](int64_t m0, int64_t m1) {
      const Consts<NVT> av(a_c.data()), k1v(k1_c.data()), k2v(k2_c.data()), mu(mean_c.data());
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t j = 0; j < g.NV; ++j) {
          const int64_t o = m * g.R + j * kLanes;
          prefetch_write(dxp + o);
          if constexpr (decltype(with_r)::value) prefetch_write(drp + o);
          prefetch(gp + o);
          prefetch(xp + o);
          const V gv = vkeep(mp[m * g.NV + j], vload(gp + o));
          const V t = vsub(vload(xp + o), mu[j]);
          vstore(dxp + o, vfnma(k2v[j], t, vfma(av[j], gv, k1v[j])));
          if constexpr (decltype(with_r)::value) vstore(drp + o, gv);
        }
    });
  };
  if (drp)
    pass2(std::true_type{});
  else
    pass2(std::false_type{});
}

// Calls f(integral_constant<NVT>): 4 (64-wide packed rows) where C divides 64 and whole rows
// fit, else 0 (rows of C values, NV read at run time).
template <typename F>
void dispatch_width(const at::Tensor& x, F&& f) {
  const int64_t C = x.size(1);
  if (64 % C == 0 && (x.numel() / C) % (64 / C) == 0)
    f(std::integral_constant<int64_t, 4>{});
  else
    f(std::integral_constant<int64_t, 0>{});
}

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), what, " must have x's dtype");
  TORCH_CHECK(t.sizes() == like.sizes(), what, " must have x's shape");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), what, " must be channels_last");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be [N, C, H, W]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "x must be bf16 or fp32");
  TORCH_CHECK(x.size(1) % kLanes == 0, "channels must be a multiple of 16");
  check(x, x, "x");
}

}  // namespace

// -> (y, mask, mean, biased var, rstd); r may be None (no residual). mask holds one bit per
// value of y (y > 0), numel / 16 int16 words, for the backward.
std::vector<at::Tensor> bn_act_forward(const at::Tensor& x, const std::optional<at::Tensor>& r,
                                       const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& shift, double eps) {
  check_x(x);
  at::Tensor res = r.has_value() ? r.value() : at::Tensor();
  if (res.defined()) check(res, x, "residual");
  const int64_t C = x.size(1);
  auto f = weight.options().dtype(at::kFloat);
  for (const auto* t : {&weight, &bias, &shift})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == C && t->is_contiguous(),
                "weight, bias and shift must be contiguous fp32 [C]");
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mask = at::empty({x.numel() / kLanes}, x.options().dtype(at::kShort));
  at::Tensor mean = at::empty({C}, f), var = at::empty({C}, f), rstd = at::empty({C}, f);
  auto run = [&](auto nv) {
    constexpr int64_t NVT = decltype(nv)::value;
    if (x.scalar_type() == at::kBFloat16)
      forward_impl<uint16_t, NVT>(x, res, weight, bias, shift, eps, y, mask, mean, var, rstd);
    else
      forward_impl<float, NVT>(x, res, weight, bias, shift, eps, y, mask, mean, var, rstd);
  };
  dispatch_width(x, run);
  return {y, mask, mean, var, rstd};
}

// torch.lerp_'s vectorised formula (AVX2 and AVX-512 builds of torch): the weight's two ranges
// anchored at either end; its default (no-FMA) build rounds the product first and may differ
// in the last bit.
static inline float lerp_as_torch(float start, float end, float w) {
  return std::abs(w) < 0.5f ? std::fma(w, end - start, start) : std::fma(w - 1.0f, end - start, end);
}

// bn_act_forward with the running statistics as the shift, then updated in place as
// torch.lerp_ does them (`lerp_as_torch` in fp32; the variance unbiased by M / (M - 1)
// first) and the batch counter incremented: -> (y, mask, mean, rstd).
// Done here rather than as four small torch ops a layer, which took ~70 us each time in a
// training step on a 2-core CPU (the big loops just before had evicted their code from cache).
std::vector<at::Tensor> bn_act_forward_train(const at::Tensor& x,
                                             const std::optional<at::Tensor>& r,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             at::Tensor running_mean, at::Tensor running_var,
                                             at::Tensor num_batches_tracked, double momentum,
                                             double eps) {
  TORCH_CHECK(running_var.scalar_type() == at::kFloat && running_var.is_contiguous() &&
                  running_var.numel() == x.size(1),
              "running_var must be contiguous fp32 [C]");
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong && num_batches_tracked.numel() == 1,
              "num_batches_tracked must be one int64");
  std::vector<at::Tensor> out = bn_act_forward(x, r, weight, bias, running_mean, eps);
  const int64_t C = x.size(1);
  const double m = double(x.numel() / C);
  const float w = float(momentum), unbias = float(m / (m - 1));
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  const float* mu = out[2].data_ptr<float>();
  const float* va = out[3].data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = lerp_as_torch(rm[c], mu[c], w);
    volatile float unbiased = va[c] * unbias;  // rounded to fp32 first, as torch's mul: no fma
    rv[c] = lerp_as_torch(rv[c], unbiased, w);
  }
  num_batches_tracked.data_ptr<int64_t>()[0] += 1;
  return {out[0], out[1], out[2], out[4]};
}

// -> (dx, dweight, dbias, dresidual); dresidual is computed only when with_residual.
std::vector<at::Tensor> bn_act_backward(const at::Tensor& dy, const at::Tensor& x,
                                        const at::Tensor& mask, const at::Tensor& mean,
                                        const at::Tensor& rstd, const at::Tensor& weight,
                                        bool with_residual) {
  check_x(x);
  check(dy, x, "grad");
  TORCH_CHECK(mask.scalar_type() == at::kShort && mask.numel() * kLanes == x.numel() &&
                  mask.is_contiguous(),
              "mask must be the forward's");
  const int64_t C = x.size(1);
  auto f = weight.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dr = with_residual ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor dw = at::empty({C}, f), db = at::empty({C}, f);
  auto run = [&](auto nv) {
    constexpr int64_t NVT = decltype(nv)::value;
    if (x.scalar_type() == at::kBFloat16)
      backward_impl<uint16_t, NVT>(dy, x, mask, mean, rstd, weight, dx, dr, dw, db);
    else
      backward_impl<float, NVT>(dy, x, mask, mean, rstd, weight, dx, dr, dw, db);
  };
  dispatch_width(x, run);
  return {dx, dw, db, dr};
}

// dx[n, c, i s, j s] += g[n, lo + c, i, j] for every channel c of dx, in place: the gradient of
// option A's shortcut (x subsampled by s, channels zero-padded by lo before) added into the
// block input's gradient. torch's strided add_ over the same view runs its inner loop over one
// pixel's C channels, slowly for 16 bf16 channels (0.95 ms at [128, 16, 32, 32], 2 cores, where
// a full add of all the pixels took 0.34); this walks each pixel's channels as whole vectors and
// rounds as torch's bf16 add does (to nearest even), so the result is the same bits.
void add_subsampled(at::Tensor dx, const at::Tensor& g, int64_t s, int64_t lo) {
  check_x(dx);
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 4 && g.scalar_type() == dx.scalar_type() &&
                  g.is_contiguous(at::MemoryFormat::ChannelsLast),
              "g must be a channels_last CPU tensor of dx's dtype");
  const int64_t N = dx.size(0), C = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t Cg = g.size(1), Ho = g.size(2), Wo = g.size(3);
  TORCH_CHECK(s >= 1 && g.size(0) == N && Ho == (H + s - 1) / s && Wo == (W + s - 1) / s &&
                  lo >= 0 && lo <= Cg - C,
              "g must be dx subsampled by s with channels padded");
  auto run = [&](auto* d0, const auto* g0) {
    at::parallel_for(0, N * Ho, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, i = r % Ho;
        auto* d = d0 + (n * H + i * s) * W * C;  // row i s of image n
        const auto* gr = g0 + r * Wo * Cg + lo;  // row i of g, from channel lo
        for (int64_t j = 0; j < Wo; ++j)
          for (int64_t k = 0; k < C; k += kLanes)
            vstore(d + j * s * C + k, vadd(vload(d + j * s * C + k), vload(gr + j * Cg + k)));
      }
    });
  };
  if (dx.scalar_type() == at::kBFloat16)
    run(reinterpret_cast<uint16_t*>(dx.data_ptr()), reinterpret_cast<const uint16_t*>(g.data_ptr()));
  else
    run(dx.data_ptr<float>(), g.data_ptr<float>());
}

// Option A's shortcut (section 3.3) as one pass: x [N, C, H, W] subsampled by s, with lo zero
// channels before x's and hi after -> [N, lo + C + hi, ceil(H/s), ceil(W/s)] channels_last.
// torch's zero_ and copy_ of the channel slices of a channels_last tensor walk 8-16 values a
// pixel in three passes (0.57 ms a ResNet-20 step at batch 128, 2 cores; this: one write of
// each output pixel). A copy: the values of layers._pad_forward.
at::Tensor subsample_pad(const at::Tensor& x, int64_t s, int64_t lo, int64_t hi) {
  check_x(x);
  TORCH_CHECK(s >= 1 && lo >= 0 && hi >= 0, "stride >= 1 and paddings >= 0");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + s - 1) / s, Wo = (W + s - 1) / s, Co = lo + C + hi;
  at::Tensor out = at::empty({N, Co, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t e = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, N * Ho, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / Ho, i = r % Ho;
      const char* xr = src + ((n * H + i * s) * W) * C * e;  // row i s of image n
      char* o = dst + r * Wo * Co * e;
      for (int64_t j = 0; j < Wo; ++j, o += Co * e) {
        std::memset(o, 0, lo * e);
        std::memcpy(o + lo * e, xr + j * s * C * e, C * e);
        std::memset(o + (lo + C) * e, 0, hi * e);
      }
    }
  });
  return out;
}

// a + b as a new channels_last tensor: the two gradients an identity shortcut's input receives
// (the shortcut's and the first conv's), summed. torch's bf16 add ran at about a third of this
// loop's speed once its operands outgrew L2 (1.36 ms against 0.25 at [128, 16, 32, 32] on a
// 2-core Xeon with AMX); rounds as torch's bf16 add does (vstore_exact): the same bits.
at::Tensor add(const at::Tensor& a, const at::Tensor& b) {
  check_x(a);
  check(b, a, "b");
  at::Tensor out = at::empty_like(a, at::MemoryFormat::ChannelsLast);
  auto run = [&](auto* op, const auto* ap, const auto* bp) {
    at::parallel_for(0, a.numel() / kLanes, kGrain * 4, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t o = v * kLanes;
        prefetch(ap + o);
        prefetch(bp + o);
        prefetch_write(op + o);
        vstore_exact(op + o, vadd(vload(ap + o), vload(bp + o)));
      }
    });
  };
  if (a.scalar_type() == at::kBFloat16)
    run(reinterpret_cast<uint16_t*>(out.data_ptr()), reinterpret_cast<const uint16_t*>(a.data_ptr()),
        reinterpret_cast<const uint16_t*>(b.data_ptr()));
  else
    run(out.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>());
  return out;
}

// How many threads the kernel's parallel loops run on, counted by running one: at::parallel_for
// is compiled into this extension from ATen's header, and without -fopenmp its OpenMP pragma is
// dropped and every loop runs on the calling thread alone (sessions 15-19 shipped it so).
int64_t bn_act_threads() {
  const int64_t n = 4 * at::get_num_threads();
  std::vector<int> seen(static_cast<size_t>(n), -1);
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) seen[i] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

// Which vector code this build runs: for run banners and the tests of both paths.
std::string bn_act_simd() {
#ifdef RESLAB_AVX512
#ifdef __AVX512BF16__
  return "avx512 + avx512_bf16";
#else
  return "avx512";
#endif
#elif defined(RESLAB_AVX2)
  return "avx2";
#else
  return "portable (compiler-vectorised)";
#endif
}
