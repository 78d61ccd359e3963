// The weight gradient of a 3x3, padding-1 convolution of stride 1 or 2 on Intel AMX tiles, for the
// CPU. Built with bn_act.cpp by reslab/models/bn_act.py; used by reslab/models/conv_wgrad.py.
//
// dw[co, ci, kh, kw] = sum over images n and output pixels p of dy[n, co, p] * x[n, ci, p + off],
// off = (kh - 1) W + (kw - 1) in an image's flat pixel order (zero outside the image; stride 2:
// see kCopies2). oneDNN's bf16 weight gradient runs at ~600 GFLOP/s for 16 -> 16 channels on
// 32x32 maps at batch 128 on a 2-core Xeon whose AMX tiles do ~6.4 TFLOP/s (a CIFAR ResNet's
// first stage: 6 of its 19 convolutions). Here each image is laid out once for the tiles and
// the nine taps are nine tile products over the same data:
//   A = dy transposed, [co][pixel]: rows of 32 pixels (one tile row of bf16 = 64 bytes);
//   B = x in pairs of pixels, [pair][ci][2] (AMX's "VNNI" layout for bf16), one copy for the
//       taps with an even offset (kw = 1: pairs (2j, 2j+1)) and two for the odd ones (kw = 0
//       and 2: pairs (2j-1, 2j)). A tap's B tile is its copy read from the offset's pair, so every
//       tile load starts on a 64-byte line (a load across lines ran at a third of the speed).
//   Flat offsets wrap a row's ends onto the next row: tap kw = 0 at column 0 would read the
//   previous row's last column, kw = 2 at the last column the next row's first. Those are the
//   only reads of a last column by kw = 0 (of a first column by kw = 2), so the kw = 0 copy
//   has x's last column zeroed and the kw = 2 copy its first. Pixels outside the image (above,
//   below, and the padding of the pixel count to a multiple of 32) are zeros around each copy.
//   Stride 2 sums over the output's grid and reads x's four phases (even or odd rows and
//   columns), each a grid-sized image: six copies (kCopies2).
// C[co][ci] accumulates in fp32 in 6 tiles at a time (A, B and 6 accumulators fill the 8 tiles),
// over a chunk of images that fits L2 before it is stored; blocks of 16 images are summed apart
// and their sums added in order (the same bits on any number of threads): the same gradient as
// oneDNN's, summed in another order, kept in fp32 and rounded once at the end (by the kernel to
// bf16 with bf16_channels_last, else by the caller).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "amx.h"
#include "api.h"

namespace {

#ifdef RESLAB_AMX

using reslab_amx::amx_permitted, reslab_amx::TileConfig, reslab_amx::tile_dot,
    reslab_amx::tile_load, reslab_amx::tile_store;

constexpr int kAcc = 6;             // accumulator tiles 0-5; A in 6, B in 7
// Budgets of 128 KB to 1 MB measured the same (session 26); a define, so a sweep can rebuild.
#ifndef RESLAB_WGRAD_CHUNK_KB
#define RESLAB_WGRAD_CHUNK_KB 256
#endif
constexpr int64_t kChunkBytes = RESLAB_WGRAD_CHUNK_KB * 1024;  // an image chunk's data: in L2
constexpr int64_t kBlock = 16;  // images summed apart (see conv3x3_wgrad)
// 0 builds the kernel without lay_out's requests for the next image (session 26's), to compare.
#ifndef RESLAB_WGRAD_PREFETCH
#define RESLAB_WGRAD_PREFETCH 1
#endif
// 0 transposes dy with session 26's vpermt2w rounds instead of lane loads and unpacks, to compare.
#ifndef RESLAB_WGRAD_UNPACK
#define RESLAB_WGRAD_UNPACK 1
#endif
// 0 writes stride 1's two odd pair copies of x in two passes (before session 36), to compare.
#ifndef RESLAB_WGRAD_TWIN
#define RESLAB_WGRAD_TWIN 1
#endif

#if RESLAB_WGRAD_UNPACK
// 32 pixels (np of them real, the rest zeros) of 16 channels at src, pixel stride ps ->
// dst row c (stride ld) = channel c's 32 values, in pixel order. Each 128-bit lane of a register
// is loaded with 8 channels of one pixel: register j of half g holds, in lane l, channels
// 8g..8g+7 of pixel 8l + j. Three rounds of in-lane unpacks (words, pairs, quads) then transpose
// each lane's 8 x 8 words, which leaves register j of half g with channel 8g + j of pixels
// 8l..8l+7 in lane l: the row, in order. 48 one-cycle unpacks and 48 lane inserts a block,
// where four rounds of vpermt2w (session 26's, RESLAB_WGRAD_UNPACK=0) took 64 two-cycle
// permutes on port 5 (session 36).
template <bool kFull>
inline void transpose_half(const uint16_t* src, int64_t ps, int64_t np, int g, uint16_t* dst,
                           int64_t ld) {
  auto lane = [&](int64_t p) {
    return kFull || p < np
               ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + p * ps + 8 * g))
               : _mm_setzero_si128();
  };
  __m512i a[8], b[8], c[8];
  for (int j = 0; j < 8; ++j) {
    __m512i v = _mm512_castsi128_si512(lane(j));
    v = _mm512_inserti32x4(v, lane(8 + j), 1);
    v = _mm512_inserti32x4(v, lane(16 + j), 2);
    a[j] = _mm512_inserti32x4(v, lane(24 + j), 3);
  }
  for (int k = 0; k < 8; k += 2) {  // b[k] lane: a[k][0] a[k+1][0] .. a[k][3] a[k+1][3]
    b[k] = _mm512_unpacklo_epi16(a[k], a[k + 1]);
    b[k + 1] = _mm512_unpackhi_epi16(a[k], a[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {  // c[k + m]: words 2m, 2m + 1 of a[k..k+3]
    c[k] = _mm512_unpacklo_epi32(b[k], b[k + 2]);
    c[k + 1] = _mm512_unpackhi_epi32(b[k], b[k + 2]);
    c[k + 2] = _mm512_unpacklo_epi32(b[k + 1], b[k + 3]);
    c[k + 3] = _mm512_unpackhi_epi32(b[k + 1], b[k + 3]);
  }
  uint16_t* out = dst + 8 * g * ld;
  for (int m = 0; m < 4; ++m) {  // word 2m and 2m + 1 of all eight
    _mm512_storeu_si512(out + 2 * m * ld, _mm512_unpacklo_epi64(c[m], c[4 + m]));
    _mm512_storeu_si512(out + (2 * m + 1) * ld, _mm512_unpackhi_epi64(c[m], c[4 + m]));
  }
}

inline void transpose_block(const uint16_t* src, int64_t ps, int64_t np, uint16_t* dst,
                            int64_t ld) {
  for (int g = 0; g < 2; ++g)
    np == 32 ? transpose_half<true>(src, ps, np, g, dst, ld)
             : transpose_half<false>(src, ps, np, g, dst, ld);
}
#else
// vpermt2w indices that transpose 32 pixels x 16 channels of bf16 held in 16 registers (two
// pixels each) in 4 steps: step k pairs registers i and i | 2^k and sorts their 64 values by
// bit k of the channel, so that register c ends with channel c's 32 pixels (in pixel order:
// the last step's indices also sort by pixel). Worked out by following every value once.
struct TransposePlan {
  alignas(64) uint16_t idx[4][16][32];
  TransposePlan() {
    int held[16][32];  // pixel * 16 + channel of each value
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 32; ++j) held[r][j] = (2 * r + j / 16) * 16 + j % 16;
    for (int k = 0; k < 4; ++k) {
      const int m = 1 << k;
      for (int r = 0; r < 16; ++r) {
        if (r & m) continue;
        std::vector<std::pair<int, int>> lo, hi;  // (index into the two registers, value)
        for (int s = 0; s < 2; ++s)
          for (int j = 0; j < 32; ++j) {
            const int v = held[s ? r | m : r][j];
            ((v % 16) & m ? hi : lo).push_back({s * 32 + j, v});
          }
        if (k == 3) {
          auto by_pixel = [](const auto& a, const auto& b) { return a.second < b.second; };
          std::sort(lo.begin(), lo.end(), by_pixel);
          std::sort(hi.begin(), hi.end(), by_pixel);
        }
        for (int j = 0; j < 32; ++j) {
          idx[k][r][j] = static_cast<uint16_t>(lo[j].first);
          idx[k][r | m][j] = static_cast<uint16_t>(hi[j].first);
          held[r][j] = lo[j].second;
          held[r | m][j] = hi[j].second;
        }
      }
    }
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 32; ++j) TORCH_CHECK(held[r][j] == j * 16 + r, "transpose plan");
  }
};
const TransposePlan& transpose_plan() {
  static const TransposePlan plan;
  return plan;
}

// 32 pixels (np of them real, the rest zeros) of 16 channels at src, pixel stride ps ->
// dst row c (stride ld) = channel c's 32 values.
inline void transpose_block(const uint16_t* src, int64_t ps, int64_t np, uint16_t* dst,
                            int64_t ld) {
  const TransposePlan& plan = transpose_plan();
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    const int64_t p = 2 * i;
    const __m256i a = p < np ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + p * ps))
                             : _mm256_setzero_si256();
    const __m256i b = p + 1 < np
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (p + 1) * ps))
                          : _mm256_setzero_si256();
    r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  for (int k = 0; k < 4; ++k) {
    const int m = 1 << k;
    for (int i = 0; i < 16; ++i) {
      if (i & m) continue;
      const __m512i lo = r[i], hi = r[i | m];
      r[i] = _mm512_permutex2var_epi16(lo, _mm512_load_si512(plan.idx[k][i]), hi);
      r[i | m] = _mm512_permutex2var_epi16(lo, _mm512_load_si512(plan.idx[k][i | m]), hi);
    }
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * ld, r[c]);
}

#endif  // RESLAB_WGRAD_UNPACK

// The geometry of one call: per-image tile data and the accumulator tiles' taps.
struct Plan {
  int64_t N, Ci, Co, H, W, HW;  // H, W: the output's (the grid the taps are summed over)
  int64_t s, Hi, Wi;            // stride; x's height and width (s H and s W for stride 2)
  int64_t copies;               // of x, per image: 3 for stride 1, 6 for stride 2 (see Copy)
  int64_t K;      // pixels an image contributes, padded to whole tile rows of 32
  int64_t G;      // zero pixels before and after each copy of x: at least W + 2, whole rows
  int64_t P;      // pairs in one copy of one 16-channel block of x
  int64_t dsz;    // dy transposed, per image (uint16)
  int64_t csz;    // one copy of x, per image
  int64_t isz;    // everything an image needs
  int64_t chunk;  // images laid out, then multiplied, at a time
  struct Tap {    // one accumulator tile: dw[16 co of block ob][16 ci of block ib][kh][kw]
    int kh, kw, ib, ob;
    int64_t a_off, b_off;  // of its A and B tiles in an image's data, at pixel 0
  };
  std::vector<Tap> taps;
};

// A copy of x in pairs: of the phase (p, q) of x (the pixels (s i + p, s j + q) as an H x W
// image; (0, 0) for stride 1), pairs (2m, 2m+1) (even) or (2m-1, 2m) (odd), and which value of
// a pair that starts a row is zeroed (the lanes kept: all, the second, the first).
struct Copy {
  int p, q;
  bool odd;
  uint32_t row_start_keep;
};
constexpr uint32_t kAll = 0xFFFFFFFFu, kSecond = 0xAAAAAAAAu, kFirst = 0x55555555u;
// Stride 1: the taps kw = 1 read copy 0, kw = 0 copy 1, kw = 2 copy 2.
constexpr Copy kCopies1[3] = {{0, 0, false, kAll}, {0, 0, true, kSecond}, {0, 0, true, kFirst}};
// Stride 2: tap (kh, kw) reads row 2i + kh - 1 and column 2j + kw - 1 of x: phase p = 0 for
// kh = 1 (row offset 0), p = 1 for kh = 0 (offset -1) and 2 (0); likewise q for kw. An odd
// offset (kw = 0) reads copy 4 + p, with the phase's last column zeroed; else copy 2p + q.
constexpr Copy kCopies2[6] = {{0, 0, false, kAll}, {0, 1, false, kAll}, {1, 0, false, kAll},
                              {1, 1, false, kAll}, {0, 1, true, kSecond}, {1, 1, true, kSecond}};
const Copy* copies_of(const Plan& p) { return p.s == 1 ? kCopies1 : kCopies2; }

Plan make_plan(const at::Tensor& x, const at::Tensor& dy, int64_t stride) {
  Plan p;
  p.N = x.size(0), p.Ci = x.size(1), p.Hi = x.size(2), p.Wi = x.size(3), p.Co = dy.size(1);
  p.H = dy.size(2), p.W = dy.size(3), p.s = stride, p.copies = stride == 1 ? 3 : 6;
  p.HW = p.H * p.W;
  p.K = (p.HW + 31) / 32 * 32;
  p.G = (p.W + 2 + 31) / 32 * 32;
  p.P = (2 * p.G + p.K) / 2;
  p.dsz = p.Co * p.K;
  p.csz = p.Ci / 16 * p.P * 32;
  p.isz = p.dsz + p.copies * p.csz;
  p.chunk = std::max<int64_t>(1, kChunkBytes / (2 * p.isz));
  // Ordered so that tiles in a group of kAcc mostly share their A (dy of one block).
  for (int ob = 0; ob < p.Co / 16; ++ob)
    for (int kw = 0; kw < 3; ++kw)
      for (int kh = 0; kh < 3; ++kh)
        for (int ib = 0; ib < p.Ci / 16; ++ib) {
          int64_t off;  // in the grid's flat pixel order
          int copy;
          if (stride == 1) {
            off = (kh - 1) * p.W + (kw - 1);
            copy = kw == 1 ? 0 : (kw == 0 ? 1 : 2);
          } else {
            const int ph = kh == 1 ? 0 : 1, pw = kw == 1 ? 0 : 1;
            off = (kh == 0 ? -p.W : 0) + (kw == 0 ? -1 : 0);
            copy = kw == 0 ? 4 + ph : 2 * ph + pw;
          }
          const int64_t q = p.G + off;  // the tap's first pixel in its copy, >= 0
          // Even offsets read an even copy, whose pair j holds pixels (2j, 2j+1); odd ones an
          // odd copy, pair j = (2j-1, 2j). Pixel q is in pair q/2 or (q+1)/2 accordingly.
          const int64_t pair = off % 2 == 0 ? q / 2 : (q + 1) / 2;
          p.taps.push_back(
              {kh, kw, ib, ob, ob * 16 * p.K, p.dsz + copy * p.csz + ib * p.P * 32 + pair * 32});
        }
  return p;
}

// Asks for the 64-byte lines of [p, p + bytes) to be brought into L2 (a hint: never faults).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
}

// One image's tile data: dy transposed, and the three copies of x in pairs. next_x, next_dy
// (0 for none): how many values on the next image's x and dy start, whose lines are asked for
// (into L2) as this image's are read, so that its layout finds them there. In a training step
// x was written long before (it is the forward's input) and comes from far away: the kernel
// alone ran ~1.4x slower with its operands evicted from L2 than in cache; these requests took
// back x1.00-1.22 of it alone and x1.00-1.03 of a step (benchmarks/ab_session27.py).
void lay_out(const Plan& p, const uint16_t* x, const uint16_t* dy, uint16_t* out,
             const __m512i& interleave, int64_t next_x, int64_t next_dy) {
  for (int64_t ob = 0; ob < p.Co / 16; ++ob)
    for (int64_t p0 = 0; p0 < p.HW; p0 += 32) {
      const int64_t np = std::min<int64_t>(32, p.HW - p0);
      if (next_dy && ob == 0) prefetch_l2(dy + next_dy + p0 * p.Co, np * p.Co * 2);
      transpose_block(dy + p0 * p.Co + ob * 16, p.Co, np, out + ob * 16 * p.K + p0, p.K);
    }
  const int64_t half = p.HW / 2;
  for (int64_t c = 0; c < p.copies; ++c) {
    const Copy& cp = copies_of(p)[c];
    // Stride 1's copies 1 and 2 (kw = 0 and 2) hold the same pairs but for the lanes kept at row
    // starts: both are written from one pass (session 36; RESLAB_WGRAD_TWIN=0 makes two).
    const bool twin = RESLAB_WGRAD_TWIN && p.s == 1 && c == 1;
    if (RESLAB_WGRAD_TWIN && p.s == 1 && c == 2) continue;
    const __mmask32 keep2 = twin ? copies_of(p)[2].row_start_keep : 0;
    for (int64_t ib = 0; ib < p.Ci / 16; ++ib) {
      uint16_t* dst = out + p.dsz + c * p.csz + ib * p.P * 32 + p.G / 2 * 32;
      const uint16_t* src = x + (cp.p * p.Wi + cp.q) * p.Ci + ib * 16;
      auto pixel = [&](int64_t i, int64_t j) {  // pixel (i, j) of the phase, 16 channels
        return _mm512_castsi256_si512(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(src + (p.s * i * p.Wi + p.s * j) * p.Ci)));
      };
      const __mmask32 keep = cp.row_start_keep;
      // Copy 0 reads every row of x (stride 2: copies 0 and 2, the even and odd rows).
      const bool ask = next_x && !cp.odd && ib == 0 && cp.q == 0;
      for (int64_t i = 0; i < p.H; ++i) {
        if (ask) prefetch_l2(src + next_x + p.s * i * p.Wi * p.Ci, p.W * p.s * p.Ci * 2);
        for (int64_t j = 0; j < p.W; j += 2) {
          uint16_t* o = dst + (i * p.W + j) / 2 * 32;
          if (!cp.odd) {
            _mm512_storeu_si512(o, _mm512_permutex2var_epi16(pixel(i, j), interleave, pixel(i, j + 1)));
            continue;
          }
          // (before, at): at a row start, before is the previous row's last column
          const __m512i before = j > 0 ? pixel(i, j - 1)
                                 : i > 0 ? pixel(i - 1, p.W - 1) : _mm512_setzero_si512();
          const __m512i v = _mm512_permutex2var_epi16(before, interleave, pixel(i, j));
          _mm512_storeu_si512(o, j == 0 ? _mm512_maskz_mov_epi16(keep, v) : v);
          if (twin) _mm512_storeu_si512(o + p.csz, j == 0 ? _mm512_maskz_mov_epi16(keep2, v) : v);
        }
      }
      if (cp.odd && half > 0) {  // the last pair: (the last pixel, 0), at a row start
        const __m512i v = _mm512_permutex2var_epi16(pixel(p.H - 1, p.W - 1), interleave,
                                                    _mm512_setzero_si512());
        _mm512_storeu_si512(dst + half * 32, _mm512_maskz_mov_epi16(keep, v));
        if (twin) _mm512_storeu_si512(dst + p.csz + half * 32, _mm512_maskz_mov_epi16(keep2, v));
      }
    }
  }
}

template <int S, int GN>
inline void multiply_step(const Plan::Tap* const* taps, const uint16_t* data, int64_t k0,
                          int64_t a_stride) {
  if constexpr (S < GN) {
    if (S == 0 || taps[S]->ob != taps[S - 1]->ob) tile_load<6>(data + taps[S]->a_off + k0, a_stride);
    tile_load<7>(data + taps[S]->b_off + k0 * 16, 64);  // 32 pixels on: 16 pairs of 32 values
    tile_dot<S, 6, 7>();
    multiply_step<S + 1, GN>(taps, data, k0, a_stride);
  }
}
template <int S, int GN>
inline void acc_load(float* acc) {
  if constexpr (S < GN) {
    tile_load<S>(acc + S * 256, 64);
    acc_load<S + 1, GN>(acc);
  }
}
template <int S, int GN>
inline void acc_store(float* acc) {
  if constexpr (S < GN) {
    tile_store<S>(acc + S * 256, 64);
    acc_store<S + 1, GN>(acc);
  }
}

// Accumulator tiles taps[0..GN) += the chunk's images' products; acc holds them between calls.
template <int GN>
void multiply(const Plan& p, const Plan::Tap* const* taps, float* acc, const uint16_t* chunk,
              int64_t images) {
  acc_load<0, GN>(acc);
  for (int64_t i = 0; i < images; ++i)
    for (int64_t k0 = 0; k0 < p.K; k0 += 32)
      multiply_step<0, GN>(taps, chunk + i * p.isz, k0, p.K * 2);
  acc_store<0, GN>(acc);
}

#endif  // RESLAB_AMX

}  // namespace

bool conv3x3_wgrad_available() {
#ifdef RESLAB_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// x [N, Ci, H, W], dy [N, Co, H / s, W / s]: channels_last bf16 CPU tensors, Ci and Co multiples
// of 16 -> dw [Co, Ci, 3, 3] of conv2d(x, w, stride s, padding 1), s = 1 or 2: fp32 (contiguous),
// or with bf16_channels_last the same sums rounded once to bf16 as torch's conversion rounds
// (nearest even; a NaN may have other bits than torch's) in channels_last order, the layout and dtype a training step's bf16 weight has
// (three fewer ops a conv than .to() and .contiguous() after). dy's width must be even; for
// s = 2, x's height and width too.
at::Tensor conv3x3_wgrad(const at::Tensor& x, const at::Tensor& dy, int64_t stride,
                         bool bf16_channels_last) {
  TORCH_CHECK(conv3x3_wgrad_available(), "conv3x3_wgrad needs a CPU with AMX (bf16 tiles)");
  for (const at::Tensor* t : {&x, &dy})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 &&
                    t->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv3x3_wgrad takes channels_last bf16 CPU tensors");
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2");
  TORCH_CHECK(x.size(0) == dy.size(0) && x.size(2) == stride * dy.size(2) &&
                  x.size(3) == stride * dy.size(3),
              "x and dy must be [N, Ci, H, W] and [N, Co, H / stride, W / stride]");
  TORCH_CHECK(x.size(1) % 16 == 0 && dy.size(1) % 16 == 0 && x.size(1) > 0 && dy.size(1) > 0,
              "channels must be multiples of 16");
  TORCH_CHECK(dy.size(3) % 2 == 0 && dy.size(3) > 0 && dy.size(2) > 0, "the width must be even");
  // Every value is written below (the taps cover every (co, ci, kh, kw)), but for no images.
  at::Tensor dw = bf16_channels_last
                      ? at::empty({dy.size(1), x.size(1), 3, 3}, x.options(),
                                  at::MemoryFormat::ChannelsLast)
                      : at::empty({dy.size(1), x.size(1), 3, 3}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return dw.zero_();  // an empty sum
#ifdef RESLAB_AMX
  const Plan p = make_plan(x, dy, stride);
  const int64_t ntaps = static_cast<int64_t>(p.taps.size());
  // Each block of kBlock images is summed on its own and the blocks' sums are added in order:
  // the result does not depend on how many threads ran or which took which block.
  const int64_t blocks = (p.N + kBlock - 1) / kBlock;
  // Per block, per tap: [16 co][16 ci]; each block's thread fills its own part.
  const int64_t per_block = ntaps * 256;
  std::unique_ptr<float[]> sums(new float[blocks * per_block]);
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* DY = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  alignas(64) uint16_t pairs[32];  // (a_c, b_c) for c = 0..15 from two 16-value halves
  for (int c = 0; c < 16; ++c) pairs[2 * c] = c, pairs[2 * c + 1] = 32 + c;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    const int64_t chunk = std::min({p.chunk, kBlock, p.N - b0 * kBlock});
    // Zeroed once: the margins and padding stay zero, lay_out rewrites only the image data.
    auto* data = static_cast<uint16_t*>(std::aligned_alloc(64, chunk * p.isz * 2));
    TORCH_CHECK(data != nullptr, "conv3x3_wgrad: out of memory");
    std::memset(data, 0, chunk * p.isz * 2);
    const __m512i interleave = _mm512_load_si512(pairs);
    const int64_t last = std::min(p.N, b1 * kBlock);  // images [b0 kBlock, last) are this range's
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = sums.get() + b * per_block;
      std::fill(acc, acc + ntaps * 256, 0.0f);
      const int64_t end = std::min(p.N, (b + 1) * kBlock);
      for (int64_t c0 = b * kBlock; c0 < end; c0 += chunk) {
        const int64_t images = std::min(chunk, end - c0);
        for (int64_t i = 0; i < images; ++i) {
          // whether this thread lays out the next image too
          const bool more = RESLAB_WGRAD_PREFETCH && c0 + i + 1 < last;
          lay_out(p, X + (c0 + i) * p.Hi * p.Wi * p.Ci, DY + (c0 + i) * p.HW * p.Co,
                  data + i * p.isz, interleave, more ? p.Hi * p.Wi * p.Ci : 0,
                  more ? p.HW * p.Co : 0);
        }
        for (int64_t g = 0; g < ntaps; g += kAcc) {
          const Plan::Tap* taps[kAcc];
          const int gn = static_cast<int>(std::min<int64_t>(kAcc, ntaps - g));
          for (int s = 0; s < gn; ++s) taps[s] = &p.taps[g + s];
          float* a = acc + g * 256;
          switch (gn) {
            case 1: multiply<1>(p, taps, a, data, images); break;
            case 2: multiply<2>(p, taps, a, data, images); break;
            case 3: multiply<3>(p, taps, a, data, images); break;
            case 4: multiply<4>(p, taps, a, data, images); break;
            case 5: multiply<5>(p, taps, a, data, images); break;
            default: multiply<6>(p, taps, a, data, images); break;
          }
        }
      }
    }
    _tile_release();
    std::free(data);
  });
  // The blocks' sums added in block order, tap by tap on all threads (the same bits on any
  // number), and stored in dw's order: [co][ci][kh][kw], or [co][kh][kw][ci] for channels_last.
  const int64_t ci_stride = bf16_channels_last ? 1 : 9, kh_stride = bf16_channels_last ? 3 * p.Ci : 3,
                kw_stride = bf16_channels_last ? p.Ci : 1;
  at::BFloat16* out16 = bf16_channels_last ? dw.data_ptr<at::BFloat16>() : nullptr;
  float* out32 = bf16_channels_last ? nullptr : dw.data_ptr<float>();
  at::parallel_for(0, ntaps, 1, [&](int64_t t0, int64_t t1) {
    float total[256];
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(total, sums.get() + t * 256, sizeof total);
      for (int64_t b = 1; b < blocks; ++b) {
        const float* s = sums.get() + b * per_block + t * 256;
        for (int i = 0; i < 256; ++i) total[i] += s[i];
      }
      const Plan::Tap& tap = p.taps[t];
      const int64_t base = tap.ob * 16 * p.Ci * 9 + tap.ib * 16 * ci_stride + tap.kh * kh_stride +
                           tap.kw * kw_stride;
      for (int co = 0; co < 16; ++co)
        for (int ci = 0; ci < 16; ++ci) {
          const int64_t o = base + co * p.Ci * 9 + ci * ci_stride;
          if (out16)
            out16[o] = at::BFloat16(total[co * 16 + ci]);
          else
            out32[o] = total[co * 16 + ci];
        }
    }
  });
#endif
  return dw;
}
