// Training-mode BatchNorm + (residual add) + ReLU over channels_last tensors in two passes over
// memory each way, for the CPU. Built on first use by reslab/models/bn_act.py.
//
// A channels_last [N, C, H, W] tensor is M = N*H*W rows of C contiguous channels. Every loop
// below walks rows and, inside a row, the channels as one fixed-length loop the compiler turns
// into vector code (rows of 16/32 channels are packed 64 wide: see CT below). Activations are bf16
// (stored as raw uint16) or fp32; every sum is accumulated in fp32 per task and in double across
// tasks.
//
// forward : pass 1 sums (x - shift) and its square per channel; pass 2 writes
//           y = relu(x * a + b' [+ r]) with a = weight * rstd, b' = bias - mean * a.
// backward: pass 1 sums g and g * (x - mean) with g = dy masked by y > 0; pass 2 writes
//           dx = a * (g - sum_g / M - (x - mean) * rstd^2 * sum_gx / M) and, with a residual,
//           dr = g (the gradient the shortcut receives).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;    // C must be a multiple: one AVX-512 register of fp32
constexpr int64_t kGrain = 1024;  // rows per parallel task

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  // Round to nearest even, as torch's own float -> bf16 conversion does for finite values.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  p[i] = uint16_t(u >> 16);
}

// Per-thread fp32 partial sums, added in double at the end: acc is [threads, 2, C].
struct Partials {
  int nt;
  int64_t C;
  std::vector<float> acc;
  Partials(int64_t C_) : nt(at::get_num_threads()), C(C_), acc(static_cast<size_t>(2 * nt * C_), 0.f) {}
  void add(const float* l1, const float* l2) {
    float* a = acc.data() + 2 * at::get_thread_num() * C;
    for (int64_t c = 0; c < C; ++c) {
      a[c] += l1[c];
      a[C + c] += l2[c];
    }
  }
  // Sums per real channel: column k of a packed row is channel k % Cr.
  void total(std::vector<double>& s1, std::vector<double>& s2, int64_t Cr) const {
    s1.assign(static_cast<size_t>(Cr), 0.0);
    s2.assign(static_cast<size_t>(Cr), 0.0);
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < C; ++k) {
        s1[k % Cr] += acc[2 * t * C + k];
        s2[k % Cr] += acc[2 * t * C + C + k];
      }
  }
};

// CT > 0: rows are CT = 64 values wide, a compile-time constant, so every row loop is fully
// unrolled vector code; 16 and 32 channels are packed 4 or 2 pixels to a row (measured on Intel
// Xeon with AMX: 16-wide rows ran 4x slower per value than 64-wide). CT == 0 reads C at run time
// (any multiple of 16).

template <typename T, int64_t CT>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight,
                  const at::Tensor& bias, const at::Tensor& shift, double eps, at::Tensor& y,
                  at::Tensor& mean, at::Tensor& var, at::Tensor& rstd) {
  // The loops see rows of C = CT values: with CT = 64 and 16 or 32 real channels (Cr), one
  // row holds 4 or 2 consecutive pixels and column k is channel k % Cr.
  const int64_t Cr = x.size(1), C = CT > 0 ? CT : Cr, M = x.numel() / C;
  const T* __restrict__ xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* __restrict__ rp = r.defined() ? reinterpret_cast<const T*>(r.data_ptr()) : nullptr;
  T* __restrict__ yp = reinterpret_cast<T*>(y.data_ptr());
  std::vector<float> shift_w(static_cast<size_t>(C));
  for (int64_t k = 0; k < C; ++k) shift_w[k] = shift.data_ptr<float>()[k % Cr];
  const float* shift_p = shift_w.data();
  Partials part(C);
  at::parallel_for(0, M, kGrain, [=, &part](int64_t m0, int64_t m1) {
    alignas(64) float buf[CT > 0 ? 3 * CT : 1];
    std::vector<float> heap(CT > 0 ? 0 : static_cast<size_t>(3 * C));
    float* __restrict__ l1 = CT > 0 ? buf : heap.data();
    float* __restrict__ l2 = l1 + C;
    float* __restrict__ sh = l2 + C;
    for (int64_t c = 0; c < C; ++c) {
      l1[c] = l2[c] = 0.f;
      sh[c] = shift_p[c];
    }
    for (int64_t m = m0; m < m1; ++m) {
      const T* __restrict__ row = xp + m * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = load(row, c) - sh[c];
        l1[c] += v;
        l2[c] += v * v;
      }
    }
    part.add(l1, l2);
  });
  std::vector<double> s1, s2;
  part.total(s1, s2, Cr);
  // Shifted sums keep the variance exact to fp32 when |mean| >> std (shift = running mean).
  const int64_t Mr = x.numel() / Cr;  // values per channel
  std::vector<float> ab(static_cast<size_t>(2 * C));
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  float* rs = rstd.data_ptr<float>();
  for (int64_t c = 0; c < Cr; ++c) {
    const double d = s1[c] / double(Mr);
    const double v = std::max(s2[c] / double(Mr) - d * d, 0.0);
    mp[c] = float(d + shift_p[c]);
    vp[c] = float(v);
    rs[c] = float(1.0 / std::sqrt(v + eps));
  }
  for (int64_t k = 0; k < C; ++k) {
    const int64_t c = k % Cr;
    ab[k] = w[c] * rs[c];
    ab[C + k] = bi[c] - mp[c] * ab[k];
  }
  const float* abp = ab.data();
  at::parallel_for(0, M, kGrain, [=](int64_t m0, int64_t m1) {
    alignas(64) float buf[CT > 0 ? 2 * CT : 1];
    std::vector<float> heap(CT > 0 ? 0 : static_cast<size_t>(2 * C));
    float* __restrict__ a = CT > 0 ? buf : heap.data();
    float* __restrict__ b = a + C;
    for (int64_t c = 0; c < 2 * C; ++c) a[c] = abp[c];
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t o = m * C;
      if (rp) {
        for (int64_t c = 0; c < C; ++c) {
          const float z = load(xp, o + c) * a[c] + b[c] + load(rp, o + c);
          store(yp, o + c, z > 0.f ? z : 0.f);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float z = load(xp, o + c) * a[c] + b[c];
          store(yp, o + c, z > 0.f ? z : 0.f);
        }
      }
    }
  });
}

template <typename T, int64_t CT>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                   const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                   at::Tensor& dx, at::Tensor& dr, at::Tensor& dw, at::Tensor& db) {
  const int64_t Cr = x.size(1), C = CT > 0 ? CT : Cr, M = x.numel() / C;  // as in forward
  const T* __restrict__ gp = reinterpret_cast<const T*>(dy.data_ptr());
  const T* __restrict__ xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* __restrict__ yp = reinterpret_cast<const T*>(y.data_ptr());
  T* __restrict__ dxp = reinterpret_cast<T*>(dx.data_ptr());
  T* __restrict__ drp = dr.defined() ? reinterpret_cast<T*>(dr.data_ptr()) : nullptr;
  std::vector<float> mean_w(static_cast<size_t>(C));
  for (int64_t k = 0; k < C; ++k) mean_w[k] = mean.data_ptr<float>()[k % Cr];
  const float* mean_p = mean_w.data();
  Partials part(C);
  at::parallel_for(0, M, kGrain, [=, &part](int64_t m0, int64_t m1) {
    alignas(64) float buf[CT > 0 ? 3 * CT : 1];
    std::vector<float> heap(CT > 0 ? 0 : static_cast<size_t>(3 * C));
    float* __restrict__ l1 = CT > 0 ? buf : heap.data();
    float* __restrict__ l2 = l1 + C;
    float* __restrict__ mu = l2 + C;
    for (int64_t c = 0; c < C; ++c) {
      l1[c] = l2[c] = 0.f;
      mu[c] = mean_p[c];
    }
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t o = m * C;
      for (int64_t c = 0; c < C; ++c) {
        const float g = load(yp, o + c) > 0.f ? load(gp, o + c) : 0.f;
        l1[c] += g;
        l2[c] += g * (load(xp, o + c) - mu[c]);
      }
    }
    part.add(l1, l2);
  });
  std::vector<double> sg, sgx;
  part.total(sg, sgx, Cr);
  const int64_t Mr = x.numel() / Cr;
  std::vector<float> coef(static_cast<size_t>(4 * C));  // a, k1, k2, mean per column
  const float* w = weight.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  for (int64_t c = 0; c < Cr; ++c) {
    dwp[c] = float(sgx[c]) * rs[c];
    dbp[c] = float(sg[c]);
  }
  for (int64_t k = 0; k < C; ++k) {
    const int64_t c = k % Cr;
    coef[k] = w[c] * rs[c];
    coef[C + k] = float(sg[c] / double(Mr));
    coef[2 * C + k] = float(sgx[c] / double(Mr)) * rs[c] * rs[c];
    coef[3 * C + k] = mean_p[k];
  }
  const float* cp = coef.data();
  at::parallel_for(0, M, kGrain, [=](int64_t m0, int64_t m1) {
    alignas(64) float buf[CT > 0 ? 4 * CT : 1];
    std::vector<float> heap(CT > 0 ? 0 : static_cast<size_t>(4 * C));
    float* __restrict__ a = CT > 0 ? buf : heap.data();
    for (int64_t c = 0; c < 4 * C; ++c) a[c] = cp[c];
    const float* __restrict__ k1 = a + C;
    const float* __restrict__ k2 = a + 2 * C;
    const float* __restrict__ mu = a + 3 * C;
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t o = m * C;
      if (drp) {
        for (int64_t c = 0; c < C; ++c) {
          const float g = load(yp, o + c) > 0.f ? load(gp, o + c) : 0.f;
          store(dxp, o + c, a[c] * (g - k1[c] - (load(xp, o + c) - mu[c]) * k2[c]));
          store(drp, o + c, g);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float g = load(yp, o + c) > 0.f ? load(gp, o + c) : 0.f;
          store(dxp, o + c, a[c] * (g - k1[c] - (load(xp, o + c) - mu[c]) * k2[c]));
        }
      }
    }
  });
}

// Calls f(integral_constant<CT>): 64 where C divides 64 and whole packed rows fit, else 0.
template <typename F>
void dispatch_width(const at::Tensor& x, F&& f) {
  const int64_t C = x.size(1);
  if (64 % C == 0 && (x.numel() / C) % (64 / C) == 0)
    f(std::integral_constant<int64_t, 64>{});
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
  TORCH_CHECK(x.size(1) % kBlock == 0, "channels must be a multiple of 16");
  check(x, x, "x");
}

}  // namespace

// -> (y, mean, biased var, rstd); r may be None (no residual).
std::vector<at::Tensor> bn_act_forward(const at::Tensor& x, const c10::optional<at::Tensor>& r,
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
  at::Tensor mean = at::empty({C}, f), var = at::empty({C}, f), rstd = at::empty({C}, f);
  auto run = [&](auto ct) {
    constexpr int64_t CT = decltype(ct)::value;
    if (x.scalar_type() == at::kBFloat16)
      forward_impl<uint16_t, CT>(x, res, weight, bias, shift, eps, y, mean, var, rstd);
    else
      forward_impl<float, CT>(x, res, weight, bias, shift, eps, y, mean, var, rstd);
  };
  dispatch_width(x, run);
  return {y, mean, var, rstd};
}

// -> (dx, dweight, dbias, dresidual); dresidual is computed only when with_residual.
std::vector<at::Tensor> bn_act_backward(const at::Tensor& dy, const at::Tensor& x,
                                        const at::Tensor& y, const at::Tensor& mean,
                                        const at::Tensor& rstd, const at::Tensor& weight,
                                        bool with_residual) {
  check_x(x);
  check(dy, x, "grad");
  check(y, x, "y");
  const int64_t C = x.size(1);
  auto f = weight.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dr = with_residual ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor dw = at::empty({C}, f), db = at::empty({C}, f);
  auto run = [&](auto ct) {
    constexpr int64_t CT = decltype(ct)::value;
    if (x.scalar_type() == at::kBFloat16)
      backward_impl<uint16_t, CT>(dy, x, y, mean, rstd, weight, dx, dr, dw, db);
    else
      backward_impl<float, CT>(dy, x, y, mean, rstd, weight, dx, dr, dw, db);
  };
  dispatch_width(x, run);
  return {dx, dw, db, dr};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &bn_act_forward, "BatchNorm (+residual) + ReLU forward, training mode");
  m.def("backward", &bn_act_backward, "BatchNorm (+residual) + ReLU backward");
}
