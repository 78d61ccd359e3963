// A 3x3, padding-1 convolution of stride 1 or 2 of bf16 channels_last maps on Intel AMX tiles,
// for the CPU: the forward pass of a CIFAR ResNet block's convolutions and, with the weight
// transposed and flipped, their input gradient. Built with bn_act.cpp by reslab/models/bn_act.py;
// used by reslab/models/conv_wgrad.py and block.cpp.
//
// oneDNN runs these at 0.8-1.7 TFLOP/s on a 2-core Xeon whose tiles do ~6.4 (16 -> 16 channels
// on 32x32 maps at batch 128: 0.83 forward, 1.02 input gradient; session 29). Here each image is
// copied once into a buffer of H + 2 rows of W + 1 pixels: a zero column, then the image's row
// (and a zero row above and below). The output is computed over that grid: position
// q = h (W + 1) + w reads, for kernel row kh, the 3 Ci values that start at buffer pixel
// q + kh (W + 1) (pixels q, q + 1, q + 2: the taps kw = 0, 1, 2, Ci channels each, contiguous
// in channels_last order; at w = W - 1 the tap kw = 2 reads the next row's zero column, which is
// the padding of both rows). So a tile of 16 positions x 32 of those values is one strided tile
// load, and the nine taps are 3 kh x (3 Ci / 32) tile products without any im2col:
// C[16 q][16 co] += A[16 q][32 k] . B[32 k][16 co], k over (kw, ci). The position w = W of each
// row is computed and not stored.
//   Ci = 16: 3 Ci = 48 values, one K chunk of 32 (kw = 0, 1) and one of 16 (kw = 2). A 16-channel
//   pixel is 32 bytes, so half of the rows of a tile would start mid-line (loads across 64-byte
//   lines ran at a third of the speed in conv_wgrad.cpp); the buffer holds pixel pairs instead,
//   entry p = (pixel p, pixel p + 1), 64 bytes: the kw = 0, 1 chunk is entry q + kh (W + 1) and
//   the kw = 2 chunk the first half of entry q + kh (W + 1) + 2.
// Accumulators: 6 tiles (4 with a 16-value chunk, whose A and B take tiles 4 and 5), as MB x NB:
// MB blocks of 16 positions by NB blocks of 16 output channels. The tiles compute apart from the
// core's loads and stores, so between tile products the core writes out the block before and
// copies the next image into a second buffer (alone: x1.15 at 16 channels on 32x32). fp32 sums,
// rounded once to bf16 (nearest even): the same convolution as oneDNN's, summed in another order
// (tests/models/test_conv_fwd.py checks it exactly on integer data).
// Stride 2 (session 37; oneDNN's before, x0.97-1.8 the forward and x1.75-2.0 the input gradient
// at a CIFAR net's transitions, batch 128, alone):
//   forward: output (h, w) reads x's rows 2h - 1, 2h, 2h + 1 from column 2w - 1. The buffer
//   holds x's odd rows (after a zero row) and its even rows in two planes, rows of 2 G pixels
//   (G = W/2 + 1 grid positions a row: a zero column, x's row, zeros): position q = h G + w
//   starts at pixel 2q of a plane's row h (kernel rows 0 and 1) or h + 1 (row 2), and its 3 Ci
//   values are contiguous as at stride 1; a tile's rows are 2 pixels apart.
//   input gradient (transposed): x's gradient at (2i + ph, 2j + pw) sums the output gradient
//   dy at rows i (kernel row 1) for ph = 0, or i and i + 1 (kernel rows 2 and 0) for ph = 1,
//   and the same for columns. So the four phases (ph, pw) are stride-1 products over dy's
//   buffer (stride 1's layout) with 1 x 1, 1 x 2, 2 x 1 and 2 x 2 taps, K = 1 or 2 pixels of
//   dy's channels a tap (a multiple of 32 values: dy of 32k channels); each phase writes every
//   other pixel of every other row. The same nine taps a pixel as oneDNN's, no zeros inserted.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "amx.h"
#include "api.h"

namespace {

// The three ways a call lays out its buffer and reads it (see the file's comment).
enum Kind : int {
  kStride1 = 0,     // stride 1, forward or transposed
  kStride2 = 1,     // stride 2 forward: x's even and odd rows in two planes
  kStride2Back = 2  // stride 2 transposed (conv2d's input gradient), one output phase
};

#ifdef RESLAB_AMX

// 0 packs the weights a value at a time on all threads (before session 36), to compare.
#ifndef RESLAB_FWD_PACK_VECTOR
#define RESLAB_FWD_PACK_VECTOR 1
#endif
// 0 writes a 16-channel output a position at a time (before session 36), to compare.
#ifndef RESLAB_FWD_PAIRS
#define RESLAB_FWD_PAIRS 1
#endif
// 0 copies each image before its products instead of during the previous image's (to compare).
#ifndef RESLAB_FWD_OVERLAP
#define RESLAB_FWD_OVERLAP 1
#endif

using reslab_amx::TileConfig, reslab_amx::tile_dot, reslab_amx::tile_load,
    reslab_amx::tile_store, reslab_amx::tile_zero;

// One call's geometry (for kStride2Back, one of the four phases: all share the buffer).
struct FwdPlan {
  int kind;
  int64_t N, Ci, Co, H, W;  // the buffer's images [H][W][Ci] (x, or dy when transposed), Co out
  int64_t Wp;      // buffer pixels a row: W + 1 (one zero column, shared by two rows); kStride2:
                   // 2 G (a zero column each side of a row of x)
  int64_t S;       // values per buffer pixel: Ci, or 32 for stride 1 with Ci = 16 (pixel pairs)
  int64_t G;       // grid positions a row: the grid's output columns + 1 (computed, not stored)
  int64_t Ho, Wo;  // the grid's outputs (rows, columns)
  int64_t pos;     // values from one position's A rows to the next's: S; kStride2: 2 Ci
  int64_t taps;    // kernel rows, one A offset each: 3; kStride2Back: 1 or 2
  int64_t a_off[3];     // tap t's A rows of position 0, in values from the image's buffer
  int64_t kh[3], kw[3];  // tap t reads the weight's kernel row kh[t]; column tap u, kw[u]
  int64_t cols;    // column taps a kernel row (3; kStride2Back: 1 or 2), cols Ci values in a row
  int64_t full;    // K chunks of 32 per tap: cols Ci / 32
  bool tail;       // and one of 16 (Ci = 16, 48, ...)
  int64_t a_tail;  // where the 16-value chunk starts, in values from a position's A row
  int64_t NB, MB;  // accumulator tiles: MB position blocks x NB channel blocks
  int64_t Q;       // grid positions computed per image: whole blocks of 16 MB
  int64_t values;  // buffer values per image (whole 64-byte lines), zeros past the image
  int64_t chunks;  // full + tail
  int64_t os, ph, pw, Hout, Wout;  // grid (h, w) is output pixel (h os + ph, w os + pw)
};

// kind, and for kStride2Back the phase (ph, pw) of the output rows and columns it computes.
FwdPlan make_fwd_plan(int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W, int kind = kStride1,
                      int64_t ph = 0, int64_t pw = 0) {
  FwdPlan p{};
  p.kind = kind;
  p.N = N, p.Ci = Ci, p.Co = Co, p.H = H, p.W = W;
  p.S = kind == kStride1 && Ci == 16 ? 32 : Ci;
  p.os = kind == kStride2Back ? 2 : 1, p.ph = ph, p.pw = pw;
  p.taps = 3, p.cols = 3;
  for (int64_t t = 0; t < 3; ++t) p.kh[t] = t, p.kw[t] = t;
  if (kind == kStride2) {
    p.Ho = (H + 1) / 2, p.Wo = (W + 1) / 2, p.G = p.Wo + 1, p.Wp = 2 * p.G, p.pos = 2 * Ci;
  } else {
    p.Ho = H, p.Wo = W, p.G = p.Wp = W + 1, p.pos = p.S;
  }
  p.Hout = p.Ho * p.os, p.Wout = p.Wo * p.os;
  if (kind == kStride2Back) {
    // Output row 2 i + ph of conv2d(., w, stride 2, padding 1)'s input gradient takes the
    // output gradient's row i with the kernel row 1 (ph = 0), or rows i and i + 1 with the
    // kernel rows 2 and 0 (ph = 1); the same for the columns: one or two pixel taps.
    p.taps = ph ? 2 : 1, p.cols = pw ? 2 : 1;
    p.kh[0] = ph ? 2 : 1, p.kh[1] = 0, p.kw[0] = pw ? 2 : 1, p.kw[1] = 0;
  }
  p.full = p.cols * Ci / 32;
  p.tail = (p.cols * Ci) % 32 != 0;
  p.a_tail = p.S == 32 && Ci == 16 ? 2 * p.S : p.full * 32;
  p.chunks = p.full + (p.tail ? 1 : 0);
  // Accumulator shapes MB x NB (tiles 0-5, or 0-3 with a 16-value chunk): the one computing the
  // fewest positions past the last output (blocks of 16 MB), then the most accumulators. MB = 1
  // only with NB = 4: fewer than 4 accumulators would wait on each product's latency.
  const int64_t last = (p.Ho - 1) * p.G + p.Wo;  // positions up to the last output, exclusive
  const int64_t shapes[3][2] = {{p.tail ? 4 : 6, 1}, {p.tail ? 2 : 3, 2}, {1, 4}};
  int64_t best = -1;
  for (const auto& sh : shapes) {
    if (Co % (16 * sh[1])) continue;
    const int64_t blk = 16 * sh[0], q = (last + blk - 1) / blk * blk;
    if (best < 0 || q < best || (q == best && sh[0] * sh[1] > p.MB * p.NB))
      best = q, p.MB = sh[0], p.NB = sh[1];
  }
  p.Q = best;
  if (kind == kStride2) {
    // The plane of x's odd rows, with a zero row first (x's padding): buffer row r is x's row
    // 2 r - 1, and the plane of its even rows: row r is x's row 2 r. Output (h, w) reads, for
    // kernel row 0, 1, 2: odd row h, even row h, odd row h + 1, each from pixel 2 w (padded:
    // x's column 2 w - 1) on, 3 Ci values.
    const int64_t reach = 2 * (p.Q - 1) + 3;  // pixels a plane's reads span from its row 0
    const int64_t odd = std::max((p.Ho + 1) * p.Wp, p.Wp + reach);
    const int64_t even_at = (odd * Ci + 31) / 32 * 32;
    // whole 64-byte lines, so that the second buffer's rows start on lines too
    p.values = (even_at + std::max(p.Ho * p.Wp, reach) * Ci + 31) / 32 * 32;
    p.a_off[0] = 0, p.a_off[1] = even_at, p.a_off[2] = p.Wp * Ci;  // odd row h, even h, odd h + 1
  } else {
    // Stride 1's buffer: H + 2 rows of W + 1 pixels, the image at row 1, column 1. The furthest
    // read: position Q - 1, kernel row 2, three pixels (Ci = 16: entry + 2).
    const int64_t px = std::max((H + 2) * p.Wp, p.Q + 2 * p.Wp + 3);
    p.values = (px * p.S + 31) / 32 * 32;
    for (int64_t t = 0; t < 3; ++t) p.a_off[t] = t * p.Wp * p.S;
    // kStride2Back: output (h, w) of phase (ph, pw) reads dy's rows h (, h + 1) from its column
    // w (, w + 1): buffer row h + 1 + t from column w + 1 (a zero column past the row's end
    // and a zero row past the last are the padding).
    if (kind == kStride2Back)
      for (int64_t t = 0; t < 2; ++t) p.a_off[t] = ((1 + t) * p.Wp + 1) * p.S;
  }
  return p;
}

// Weights as the B tiles want them: [tap][chunk][nb of all Co / 16][16 rows][32], row r holding
// (k = chunk 32 + 2r, k + 1) for each of 16 output channels, k over (column tap u, ci) =
// (k / Ci, k % Ci): the weight's value at kernel row p.kh[tap], column p.kw[u].
// transposed: the output channel o and input channel i of this convolution read w[i][o][..]
// (the input gradient of conv2d(., w) is this convolution of the output gradient, the kernel
// flipped: stride 1's plan reads kernel row 2 - t for tap t). w is read in place through its
// strides, on the calling thread, twice a convolution a step. A training step's weight is
// channels_last: a row is then one gather (forward: w[o][ci][kh][kw] and w[o][ci + 1][kh][kw]
// are one 32-bit word, and the 16 output channels' words are s0 apart) or one interleave of two
// 16-value loads (transposed: o is w's contiguous dimension); other layouts go a value at a
// time. (Before session 36 the values went one at a time on all threads, which wrote into the
// same lines: 10-50 us a call at 16-64 channels on 2 cores.)
std::vector<uint16_t> pack_weights(const FwdPlan& p, const at::Tensor& w, bool transposed) {
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t nbs = p.Co / 16, chunks = p.chunks, Ci = p.Ci;
  const int64_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2), s3 = w.stride(3);
  std::vector<uint16_t> out(p.taps * chunks * nbs * 512, 0);  // a 16-value chunk's rows 8-15: 0
  // the 64-byte row of tap t (of the packed layout), pair k, channel block nb
  auto row = [&](int64_t t, int64_t k, int64_t nb) {
    return out.data() + ((t * chunks + (k >> 5)) * nbs + nb) * 512 + ((k & 31) >> 1) * 32;
  };
  // the weight's kernel row and column of tap t, column tap u
  auto kh = [&](int64_t t) { return transposed && p.kind == kStride1 ? 2 - t : p.kh[t]; };
  auto kw = [&](int64_t u) { return transposed && p.kind == kStride1 ? 2 - u : p.kw[u]; };
#if RESLAB_FWD_PACK_VECTOR
  if (!transposed && s1 == 1 && s0 < (int64_t{1} << 26)) {
    const __m512i offsets =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32(static_cast<int32_t>(s0)));
    for (int64_t t = 0; t < p.taps; ++t)
      for (int64_t u = 0; u < p.cols; ++u)
        for (int64_t ci = 0; ci < Ci; ci += 2)
          for (int64_t nb = 0; nb < nbs; ++nb)
            _mm512_storeu_si512(
                row(t, u * Ci + ci, nb),
                _mm512_i32gather_epi32(offsets, W + nb * 16 * s0 + kh(t) * s2 + kw(u) * s3 + ci, 2));
    return out;
  }
  if (transposed && s1 == 1) {
    alignas(64) uint16_t pairs[32];  // (a_c, b_c) for c = 0..15 from two 16-value rows
    for (int c = 0; c < 16; ++c) pairs[2 * c] = c, pairs[2 * c + 1] = 32 + c;
    const __m512i interleave = _mm512_load_si512(pairs);
    auto load16 = [](const uint16_t* q) {
      return _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    };
    for (int64_t t = 0; t < p.taps; ++t)
      for (int64_t u = 0; u < p.cols; ++u)
        for (int64_t i = 0; i < Ci; i += 2)
          for (int64_t nb = 0; nb < nbs; ++nb) {
            // w[i][o..o+15][kh][kw]
            const uint16_t* q = W + i * s0 + nb * 16 + kh(t) * s2 + kw(u) * s3;
            _mm512_storeu_si512(row(t, u * Ci + i, nb),
                                _mm512_permutex2var_epi16(load16(q), interleave, load16(q + s0)));
          }
    return out;
  }
#endif
  // Other layouts a value at a time (and all of them with RESLAB_FWD_PACK_VECTOR=0, on all
  // threads as before session 36, to compare).
  auto values = [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t b = 0; b < w.size(1); ++b) {
        const int64_t o = transposed ? b : a, i = transposed ? a : b;
        const uint16_t* src = W + a * s0 + b * s1;
        for (int64_t t = 0; t < p.taps; ++t)
          for (int64_t u = 0; u < p.cols; ++u) {
            const int64_t k = u * Ci + i;
            row(t, k, o >> 4)[2 * (o & 15) + (k & 1)] = src[kh(t) * s2 + kw(u) * s3];
          }
      }
  };
  if (RESLAB_FWD_PACK_VECTOR)
    values(0, w.size(0));
  else
    at::parallel_for(0, w.size(0), 1, values);
  return out;
}

// Row h of image x ([H][W][Ci] bf16) into its buffer's row h + 1 (kStride2: row (h + 1) / 2 of
// the odd rows' plane, or h / 2 of the even rows'), from column 1; the zero columns and rows are
// never written (zeroed once by the caller). Ci = 16 at stride 1: entry p = (pixel p, pixel
// p + 1) of the grid: column c of row h + 1 is x's column c - 1 (zero at c = 0; c = W + 1 is
// the next row's zero column), and every entry of the row is written.
void fill_row(const FwdPlan& p, const uint16_t* x, uint16_t* buf, int64_t h) {
  if (p.kind == kStride2) {
    const int64_t at = h % 2 ? ((h + 1) / 2 * p.Wp + 1) * p.Ci : p.a_off[1] + (h / 2 * p.Wp + 1) * p.Ci;
    std::memcpy(buf + at, x + h * p.W * p.Ci, p.W * p.Ci * 2);
    return;
  }
  if (p.S == p.Ci) {
    std::memcpy(buf + ((h + 1) * p.Wp + 1) * p.S, x + h * p.W * p.Ci, p.W * p.Ci * 2);
    return;
  }
  const uint16_t* row = x + h * p.W * 16;
  uint16_t* dst = buf + (h + 1) * p.Wp * 32;
  auto col = [&](int64_t c) {  // padded column c: 16 values
    return c >= 1 && c <= p.W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (c - 1) * 16))
                              : _mm256_setzero_si256();
  };
  __m256i cur = col(0);
  for (int64_t c = 0; c < p.Wp; ++c) {
    const __m256i next = col(c + 1);
    _mm512_storeu_si512(dst + c * 32, _mm512_inserti64x4(_mm512_castsi256_si512(cur), next, 1));
    cur = next;
  }
}

// The next image's rows, copied into its buffer a few at a time between tile products (the
// tiles compute apart from the core's loads and stores, which would otherwise wait for them).
struct Filler {
  const FwdPlan* p;
  const uint16_t* x;  // the next image, or nullptr
  uint16_t* buf;
  int64_t row = 0;
  void run(int64_t rows) {
    for (; x && rows > 0 && row < p->H; --rows, ++row) fill_row(*p, x, buf, row);
  }
};

// Accumulator (m, nb) is tile m NB + nb. I runs over (nb, m), nb outer, so B loads once per nb.
template <int MB, int NB, int TA, int TB, int I = 0>
inline void products(const uint16_t* a, int64_t a_step, int64_t a_stride, const uint16_t* b) {
  if constexpr (I < MB * NB) {
    constexpr int nb = I / MB, m = I % MB;
    if constexpr (m == 0) tile_load<TB>(b + nb * 512, 64);
    if constexpr (MB > 1 || nb == 0) tile_load<TA>(a + m * a_step, a_stride);  // MB = 1: kept
    tile_dot<m * NB + nb, TA, TB>();
    products<MB, NB, TA, TB, I + 1>(a, a_step, a_stride, b);
  }
}
template <int T, int N>
inline void zero_tiles() {
  if constexpr (T < N) {
    tile_zero<T>();
    zero_tiles<T + 1, N>();
  }
}
template <int MB, int NB, int I = 0>
inline void store_tiles(float* tmp) {  // tmp: [16 MB positions][16 NB channels] fp32
  if constexpr (I < MB * NB) {
    constexpr int m = I / NB, nb = I % NB;
    tile_store<I>(tmp + m * 16 * 16 * NB + nb * 16, 64 * NB);
    store_tiles<MB, NB, I + 1>(tmp);
  }
}

// fp32 -> bf16 as torch's vectorised conversion does it (its bf16 add's): nearest even,
// subnormals kept, any NaN stored as 0xFFFF (bn_act.cpp's vstore_exact; see write_out's add).
inline __m256i bf16_exact(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(u);
}
inline __m512 bf16_to_fp32(__m256i h) {  // exact: the bits go to the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 sums t to bf16 at dst; with add (not null), then dst = add + that bf16 value, rounded as
// torch's bf16 add rounds: the same bits as storing the convolution and adding `add` after it
// (bn_act.cpp's add, which the block op called for x's two gradients before session 34). With
// a mask (add_mask not null: one bit a value, bn_act.cpp's ReLU mask), add's values where its
// bit is 0 count as 0, and the others as bn_act.cpp's backward stores them for the shortcut
// (through the CPU's bf16 conversion): the shortcut's gradient without storing it.
inline void store16(uint16_t* dst, const float* t, const uint16_t* add, const uint16_t* add_mask) {
  const __m256i r = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(t));
  if (add == nullptr) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
    return;
  }
  __m512 a = bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(add)));
  if (add_mask != nullptr)
    a = bf16_to_fp32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(*add_mask, a)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      bf16_exact(_mm512_add_ps(bf16_to_fp32(r), a)));
}

// What is done to the sums as they are written (one image's pointers): add (or null) a tensor of
// the output's shape and layout added to the rounded sums, where add_mask's bit is set (store16;
// the training paths); bias (or null: then add and the rest as store16 does) the inference
// epilogue: sum + bias[c] (+ add) (then max(., 0) with relu), rounded once (store16_bias).
struct Epilogue {
  const uint16_t* add = nullptr;
  const uint16_t* add_mask = nullptr;
  const float* bias = nullptr;  // [Co] fp32
  bool relu = false;
};

// The inference epilogue of 16 sums t at output channels [c, c + 16): t + bias (+ add's bf16
// values), with relu max(0, .), which keeps a NaN (the second operand of vmaxps is returned
// when either is NaN) as torch.relu does, rounded once to bf16 (nearest even). An eval-mode
// block's conv + bias, add and ReLU as eager ops round after the conv and after the add: this
// rounds the same value once (within one bf16 step of theirs).
inline void store16_bias(uint16_t* dst, const float* t, const float* bias, const uint16_t* add,
                         bool relu) {
  __m512 v = _mm512_add_ps(_mm512_loadu_ps(t), _mm512_loadu_ps(bias));
  if (add != nullptr)
    v = _mm512_add_ps(v, bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(add))));
  if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Grid positions [q0, q0 + n) of one image, sums tmp ([n][16 NB] fp32), to its output's channels
// [g 16 NB, +16 NB) in bf16: (h, w) = divmod(q, G) is output pixel (h os + ph, w os + pw);
// w = Wo is not an output. The rounding is the CPU's (vcvtne2ps2bf16: nearest even as torch
// rounds; a NaN may keep other bits than torch's 0x7FC0). e: what is done to them (Epilogue).
template <int NB>
inline void write_out(const FwdPlan& p, const float* tmp, int64_t q0, int64_t n, int64_t g,
                      uint16_t* out, const Epilogue& e) {
  const uint16_t *add = e.add, *add_mask = e.add_mask;
  int64_t h = q0 / p.G, w = q0 % p.G;
  for (int64_t r = 0; r < n; ++r) {
    if (h >= p.Ho) break;
    if (w < p.Wo) {
      const int64_t at = ((h * p.os + p.ph) * p.Wout + w * p.os + p.pw) * p.Co + g * NB * 16;
      uint16_t* dst = out + at;
      if (e.bias != nullptr)
        for (int nb = 0; nb < NB; ++nb)
          store16_bias(dst + nb * 16, tmp + (r * NB + nb) * 16, e.bias + g * NB * 16 + nb * 16,
                       add != nullptr ? add + at + nb * 16 : nullptr, e.relu);
      else if (add != nullptr)
        for (int nb = 0; nb < NB; ++nb)
          store16(dst + nb * 16, tmp + (r * NB + nb) * 16, add + at + nb * 16,
                  add_mask != nullptr ? add_mask + (at + nb * 16) / 16 : nullptr);
      else if constexpr (NB % 2 == 0)
        for (int nb = 0; nb < NB; nb += 2) {
          const float* t = tmp + (r * NB + nb) * 16;
          _mm512_storeu_si512(dst + nb * 16, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(t + 16),
                                                                          _mm512_loadu_ps(t)));
        }
      else if (RESLAB_FWD_PAIRS && p.Co == 16 && p.os == 1 && w + 1 < p.Wo && r + 1 < n) {
        // 16 channels: this position and the next of its row (32 contiguous values) at once
        const float* t = tmp + r * 16;
        _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(t + 16),
                                                               _mm512_loadu_ps(t)));
        ++r, ++w;
      } else
        store16(dst, tmp + r * 16, nullptr, nullptr);
    }
    if (++w == p.G) w = 0, ++h;
  }
}

// One image's output channels [g 16 NB, +16 NB) at all positions: buf its buffer, bp the packed
// weights, out its output ([Hout][Wout][Co]), tmp room for two blocks' sums. Between a block's
// taps the core writes out a part of the block before (its sums stored after its products) and
// copies fill_rows rows of the next image.
template <int MB, int NB, bool TAIL>
void image_group(const FwdPlan& p, const uint16_t* buf, const std::vector<uint16_t>& bpv, int64_t g,
                 uint16_t* out, const Epilogue& e, float* tmp, Filler& next, int64_t fill_rows) {
  const uint16_t* bp = bpv.data();
  const int64_t nbs = p.Co / 16, a_stride = p.pos * 2, a_step = 16 * p.pos, blk = 16 * MB;
  const int64_t part = (blk + p.taps - 1) / p.taps;  // positions written out after each tap
  for (int64_t q0 = 0; q0 < p.Q; q0 += blk) {
    float* mine = tmp + ((q0 / blk) & 1) * 256 * MB * NB;
    const float* before = tmp + (((q0 / blk) & 1) ^ 1) * 256 * MB * NB;
    zero_tiles<0, MB * NB>();
    for (int64_t t = 0; t < p.taps; ++t) {
      const uint16_t* a = buf + q0 * p.pos + p.a_off[t];
      const uint16_t* b = bp + (t * p.chunks * nbs + g * NB) * 512;
      for (int64_t c = 0; c < p.full; ++c)
        products<MB, NB, 6, 7>(a + c * 32, a_step, a_stride, b + c * nbs * 512);
      if constexpr (TAIL)
        products<MB, NB, 4, 5>(a + p.a_tail, a_step, a_stride, b + p.full * nbs * 512);
      if (q0 > 0) {
        const int64_t r0 = t * part, n = std::min(part, blk - r0);
        if (n > 0) write_out<NB>(p, before + r0 * 16 * NB, q0 - blk + r0, n, g, out, e);
      }
      next.run(fill_rows);
    }
    store_tiles<MB, NB>(mine);
  }
  write_out<NB>(p, tmp + ((p.Q / blk - 1) & 1) * 256 * MB * NB, p.Q - blk, blk, g, out, e);
}

// All of one image's outputs for one plan (a phase, for kStride2Back).
inline void image_all(const FwdPlan& p, const uint16_t* buf, const std::vector<uint16_t>& bp,
                      uint16_t* o, const Epilogue& e, float* tmp, Filler& next, int64_t fill_rows) {
  for (int64_t g = 0; g < p.Co / (16 * p.NB); ++g) {
    const auto args = std::tie(p, buf, bp, g, o, e, tmp, next, fill_rows);
    if (p.NB == 4)
      p.tail ? std::apply(image_group<1, 4, true>, args) : std::apply(image_group<1, 4, false>, args);
    else if (p.NB == 2)
      p.tail ? std::apply(image_group<2, 2, true>, args) : std::apply(image_group<3, 2, false>, args);
    else
      p.tail ? std::apply(image_group<4, 1, true>, args) : std::apply(image_group<6, 1, false>, args);
  }
}

#endif  // RESLAB_AMX

}  // namespace

// conv2d(x, w, stride, padding 1) for x [N, Ci, H, W] and w [Co, Ci, 3, 3], bf16, x channels_last
// on the CPU, Ci and Co multiples of 16 -> [N, Co, H', W'] bf16 channels_last (stride 1: H, W;
// stride 2: (H + 1) / 2, (W + 1) / 2). With transposed, w is [Ci, Co, 3, 3] and the result is
// conv2d's input gradient for the output gradient x: conv_transpose2d(x, w, stride, padding 1)
// ([N, Co, H, W]; stride 2: [N, Co, 2 H, 2 W], the gradient of an input of even sides, and
// Ci a multiple of 32). add (stride 1): a bf16 channels_last tensor of the result's shape added
// to it, with the bits of adding it after (torch's bf16 add, or bn_act.cpp's): one pass over
// memory less where a sum follows the convolution (an identity block's input gradient: the
// shortcut's term). add_mask (with add): bn_act.cpp's ReLU mask of add's shape (int16, a bit a
// value in memory order): only add's values whose bit is set are added (store16). Needs
// conv3x3_wgrad_available().
static at::Tensor conv3x3_run(const at::Tensor& x, const at::Tensor& w, bool transposed,
                              const std::optional<at::Tensor>& add,
                              const std::optional<at::Tensor>& add_mask,
                              const std::optional<at::Tensor>& bias, bool relu, int64_t stride);

at::Tensor conv3x3_forward(const at::Tensor& x, const at::Tensor& w, bool transposed,
                           const std::optional<at::Tensor>& add,
                           const std::optional<at::Tensor>& add_mask, int64_t stride) {
  return conv3x3_run(x, w, transposed, add, add_mask, std::nullopt, false, stride);
}

// Inference: relu(conv2d(x, w, bias, stride, padding 1) [+ add]) (max(0, .) with relu), the
// sums, bias and add's values taken in fp32 and rounded once to bf16: an eval-mode block's
// convolution with its BatchNorm folded in (bias: fp32 [Co]), its ReLU, and, for its second
// convolution, the shortcut's add (stride 1) in one pass over the output.
at::Tensor conv3x3_bias_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const std::optional<at::Tensor>& add, bool relu, int64_t stride) {
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.is_contiguous() && bias.size(0) == w.size(0),
              "conv3x3_bias_act: bias must be a contiguous fp32 CPU tensor of the weight's ",
              w.size(0), " output channels");
  return conv3x3_run(x, w, false, add, std::nullopt, bias, relu, stride);
}

static at::Tensor conv3x3_run(const at::Tensor& x, const at::Tensor& w, bool transposed,
                              const std::optional<at::Tensor>& add,
                              const std::optional<at::Tensor>& add_mask,
                              const std::optional<at::Tensor>& bias, bool relu, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv3x3_forward takes a channels_last bf16 CPU tensor");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 4 &&
                  w.size(2) == 3 && w.size(3) == 3,
              "conv3x3_forward takes a bf16 [out, in, 3, 3] CPU weight");
  const int64_t Ci = x.size(1), Co = transposed ? w.size(1) : w.size(0);
  TORCH_CHECK((transposed ? w.size(0) : w.size(1)) == Ci, "the weight's input channels must be x's");
  TORCH_CHECK(Ci % 16 == 0 && Co % 16 == 0 && Ci > 0 && Co > 0, "channels must be multiples of 16");
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3_forward: stride 1 or 2, not ", stride);
  TORCH_CHECK(stride == 1 || !(add.has_value() || add_mask.has_value()),
              "conv3x3_forward: add and add_mask are for stride 1");
  TORCH_CHECK(stride == 1 || !transposed || Ci % 32 == 0,
              "conv3x3_forward: a stride-2 input gradient needs output gradients of a multiple of "
              "32 channels");
  const int kind = stride == 1 ? kStride1 : transposed ? kStride2Back : kStride2;
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t Hout = kind == kStride1 ? H : kind == kStride2 ? (H + 1) / 2 : 2 * H;
  const int64_t Wout = kind == kStride1 ? W : kind == kStride2 ? (W + 1) / 2 : 2 * W;
  at::Tensor out =
      at::empty({x.size(0), Co, Hout, Wout}, x.options(), at::MemoryFormat::ChannelsLast);
  if (add.has_value())
    TORCH_CHECK(add->device().is_cpu() && add->scalar_type() == at::kBFloat16 &&
                    add->sizes() == out.sizes() &&
                    add->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv3x3_forward: add must be a bf16 channels_last CPU tensor of the result's shape");
  if (add_mask.has_value())
    TORCH_CHECK(add.has_value() && add_mask->device().is_cpu() &&
                    add_mask->scalar_type() == at::kShort && add_mask->is_contiguous() &&
                    add_mask->numel() * 16 == out.numel(),
                "conv3x3_forward: add_mask must be an int16 CPU tensor of a bit per value of add");
  if (out.numel() == 0) return out;
#ifdef RESLAB_AMX
  TORCH_CHECK(reslab_amx::amx_permitted(), "conv3x3_forward needs a CPU with AMX (bf16 tiles)");
  // one plan, or kStride2Back's four phases (ph, pw) = (i / 2, i % 2) over one buffer
  std::vector<FwdPlan> plans;
  for (int64_t i = 0; i < (kind == kStride2Back ? 4 : 1); ++i)
    plans.push_back(make_fwd_plan(x.size(0), Ci, Co, H, W, kind, i / 2, i % 2));
  std::vector<std::vector<uint16_t>> packed;
  for (const FwdPlan& p : plans) packed.push_back(pack_weights(p, w, transposed));
  const FwdPlan& p = plans[0];
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const auto* A = add.has_value() ? reinterpret_cast<const uint16_t*>(add->data_ptr()) : nullptr;
  const auto* AM =
      add_mask.has_value() ? reinterpret_cast<const uint16_t*>(add_mask->data_ptr()) : nullptr;
  const float* B = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t out_image = Hout * Wout * Co;
  at::parallel_for(0, p.N, 1, [&](int64_t n0, int64_t n1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    if (p.tail) cfg.colsb[4] = 32, cfg.rows[5] = 8;  // the 16-value chunk's A and B
    _tile_loadconfig(&cfg);
    // Two buffers: the image being computed and the next, filled meanwhile.
    auto* bufs = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * p.values * 2));
    TORCH_CHECK(bufs != nullptr, "conv3x3_forward: out of memory");
    std::memset(bufs, 0, 2 * p.values * 2);  // the borders and the tail stay zero
    alignas(64) float tmp[2 * 6 * 16 * 16];  // two blocks' sums: see image_group
    int64_t slots = 0;  // tap slots an image (the phases' together)
    for (const FwdPlan& q : plans) slots += q.Co / (16 * q.NB) * q.Q / (16 * q.MB) * q.taps;
    const int64_t fill_rows = RESLAB_FWD_OVERLAP ? (p.H + slots - 1) / slots : 0;
    Filler first{&p, X + n0 * p.H * p.W * p.Ci, bufs};
    first.run(p.H);
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* buf = bufs + (n - n0) % 2 * p.values;
      Filler next{&p, n + 1 < n1 ? X + (n + 1) * p.H * p.W * p.Ci : nullptr,
                  bufs + (n + 1 - n0) % 2 * p.values};
      uint16_t* o = O + n * out_image;
      Epilogue e;
      e.add = A != nullptr ? A + n * out_image : nullptr;
      e.add_mask = AM != nullptr ? AM + n * out_image / 16 : nullptr;
      e.bias = B, e.relu = relu;
      for (size_t i = 0; i < plans.size(); ++i)
        image_all(plans[i], buf, packed[i], o, e, tmp, next, fill_rows);
      next.run(p.H);  // whatever the slots left
    }
    _tile_release();
    std::free(bufs);
  });
#else
  TORCH_CHECK(false, "conv3x3_forward needs a CPU with AMX (bf16 tiles)");
#endif
  return out;
}
