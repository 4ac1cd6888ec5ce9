// Fused windowed group attention for the CPU: forward and backward of
// training/attention_kernels.py's chunked kernel, one query position at a time, with every
// intermediate (scores, probabilities, their gradients) in buffers of a few KB per thread.
//
// Axes as in attention_kernels.py: B batch, NH heads, X query positions, GQ query orientations
// (1 for lifting), G output orientations, NK key positions (padded image), GK key orientations,
// P window offsets, J = P * GK keys per query, D head dim.
//
//   q      [B, NH, X, GQ, D]    k, v  [B, NH, NK, GK, D]    index [X, P] (key position of offset p)
//          (q, dout and out: any strides with d contiguous; k and v are read as [B, NH, D, NK GK],
//          a copy unless the layers already laid them out so)
//   bias   [X, P] (0 or -inf) or an empty tensor
//   table  paper [D, G, J] (element (d, h, j) at d*G*J + h*J + j), aligned [G, D, J]
//   out    [B, NH, X, G, D]
//
// paper:   s[gq, h, j] = q[gq] . (k[j] + T[h, j]) + bias[j],  A[h, j] = sum_gq softmax_j(s[gq, h]) m[gq, h, j]
// aligned: s[h, j]     = q[h]  . (k[j] + T[h, j]) + bias[j],  A[h, j] = softmax_j(s[h]) m[h, j]
// out[h] = sum_j A[h, j] v[j]; m is the dropout mask (1 without dropout).
//
// The dropout mask is a hash of (seed, score index), so the backward pass regenerates it: a score
// is kept when 16 bits of the hash are below round((1 - p) 2^16) and then scaled by 2^16 / that
// threshold (the mask's expectation is exactly 1, as with the chunked kernel's CPU mask).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Fixed-width vectors (GCC/Clang vector extensions: 512 bits, split by the compiler on narrower
// hardware). Every per-query buffer is padded to a whole number of vectors along the keys j, so
// the loops have no remainders; padded keys carry score -inf and zero keys, values and encodings.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64), aligned(4)));
  typedef int32_t I __attribute__((vector_size(64), aligned(4)));
  static constexpr int N = 16;

  // exp(x) for x <= 0 (softmax after subtracting the row maximum). Cephes' expf: range reduction
  // by ln 2 in two parts, a degree-5 polynomial, the power of two written into the exponent bits
  // (n is rounded with the 1.5 * 2^23 trick); relative error about 1e-7. Arguments below -87,
  // the masked keys' -inf among them, give exactly 0.
  static V exp_neg(V x) {
    const V xc = x < -87.0f ? V{} - 87.0f : x;
    const V t = xc * 1.44269504088896341f + 12582912.0f;
    const V n = t - 12582912.0f;
    const V r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const V y = p * r * r + r + 1.0f;
    const I scale_bits = (((I)t - 0x4B400000) + 127) << 23;  // vector casts reinterpret the bits
    const V out = y * (V)scale_bits;
    const I keep = x >= -87.0f;
    const I bits = (I)out & keep;
    return (V)bits;
  }
};

template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64), aligned(8)));
  static constexpr int N = 8;

  static V exp_neg(V x) {
    V out;
    for (int i = 0; i < N; ++i) out[i] = std::exp(x[i]);
    return out;
  }
};

template <typename T>
inline typename Vec<T>::V load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::V*>(p);
}

template <typename T>
inline void store(T* p, typename Vec<T>::V v) {
  *reinterpret_cast<typename Vec<T>::V*>(p) = v;
}

// Horizontal sum and maximum: halving steps of whole-vector shuffles (a lane-by-lane loop compiles
// to 16 dependent scalar operations).
#if defined(__clang__)
#define GSA_SWAP(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define GSA_SWAP(v, ...) __builtin_shuffle(v, Vec<float>::I{__VA_ARGS__})
#endif

template <typename Op>
inline float reduce16(Vec<float>::V v, Op op) {
  v = op(v, GSA_SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, GSA_SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, GSA_SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, GSA_SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
#undef GSA_SWAP

template <typename T>
inline T hsum(typename Vec<T>::V v) {
  if constexpr (std::is_same_v<T, float>) {
    return reduce16(v, [](Vec<float>::V a, Vec<float>::V b) { return a + b; });
  } else {
    T s = 0;
    for (int i = 0; i < Vec<T>::N; ++i) s += v[i];
    return s;
  }
}

template <typename T>
inline T hmax(typename Vec<T>::V v) {
  if constexpr (std::is_same_v<T, float>) {
    return reduce16(v, [](Vec<float>::V a, Vec<float>::V b) { return a > b ? a : b; });
  } else {
    T m = v[0];
    for (int i = 1; i < Vec<T>::N; ++i) m = std::max(m, v[i]);
    return m;
  }
}

// Blocked kernels over whole vectors. A loop that adds D products into one accumulator is a chain
// of dependent FMAs (4 cycles each); blocks of K independent accumulators keep the FMA units busy.

// out[v] = init[v] + sum_i coef[i * cstride] * rows[i * rstride + v] for K vectors v (init may be null).
template <typename T, int K>
inline void combine_block(const T* init, const T* coef, int64_t cstride, int64_t n, const T* rows, int64_t rstride,
                          T* out) {
  using V = typename Vec<T>::V;
  constexpr int N = Vec<T>::N;
  V a[K];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) a[k] = init ? load(init + k * N) : V{};
  for (int64_t i = 0; i < n; ++i) {
    const T c = coef[i * cstride];
    const T* r = rows + i * rstride;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) a[k] += c * load(r + k * N);
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) store(out + k * N, a[k]);
}

// combine_block over NV vectors (out may alias init).
template <typename T>
inline void combine(const T* init, const T* coef, int64_t cstride, int64_t n, const T* rows, int64_t rstride,
                    int64_t NV, T* out) {
  constexpr int N = Vec<T>::N;
  int64_t v = 0;
  for (; v + 4 <= NV; v += 4)
    combine_block<T, 4>(init ? init + v * N : nullptr, coef, cstride, n, rows + v * N, rstride, out + v * N);
  const T* in = init ? init + v * N : nullptr;
  switch (NV - v) {
    case 3: combine_block<T, 3>(in, coef, cstride, n, rows + v * N, rstride, out + v * N); break;
    case 2: combine_block<T, 2>(in, coef, cstride, n, rows + v * N, rstride, out + v * N); break;
    case 1: combine_block<T, 1>(in, coef, cstride, n, rows + v * N, rstride, out + v * N); break;
    default: break;
  }
}

// acc[k] += sum_v a[v] * rows[k * rstride + v] (vector partial sums, reduced later) for K rows.
template <typename T, int K>
inline void vdots_block(const T* a, const T* rows, int64_t rstride, int64_t NV, T* acc) {
  using V = typename Vec<T>::V;
  constexpr int N = Vec<T>::N;
  V s[K];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) s[k] = load(acc + k * N);
  for (int64_t v = 0; v < NV; ++v) {
    const V av = load(a + v * N);
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) s[k] += av * load(rows + k * rstride + v * N);
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) store(acc + k * N, s[k]);
}

// vdots_block over n rows: acc [n][N].
template <typename T>
inline void vdots(const T* a, const T* rows, int64_t rstride, int64_t n, int64_t NV, T* acc) {
  constexpr int N = Vec<T>::N;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vdots_block<T, 4>(a, rows + i * rstride, rstride, NV, acc + i * N);
  switch (n - i) {
    case 3: vdots_block<T, 3>(a, rows + i * rstride, rstride, NV, acc + i * N); break;
    case 2: vdots_block<T, 2>(a, rows + i * rstride, rstride, NV, acc + i * N); break;
    case 1: vdots_block<T, 1>(a, rows + i * rstride, rstride, NV, acc + i * N); break;
    default: break;
  }
}

inline uint32_t mix32(uint32_t x) {  // a 32-bit integer hash (bijective), good avalanche
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Shape {
  int64_t B, NH, X, GQ, G, NK, GK, P, D, J;
  int64_t Jp;  // J padded to whole vectors
  bool paper;
  int64_t t_sd, t_sh;  // strides of d and h in the caller's table
  int64_t pairs() const { return paper ? GQ * G : G; }
};

Shape make_shape(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& table,
                 const torch::Tensor& index, bool paper, int lanes) {
  Shape s;
  s.B = q.size(0);
  s.NH = q.size(1);
  s.X = q.size(2);
  s.GQ = q.size(3);
  s.D = q.size(4);
  s.NK = k.size(2);
  s.GK = k.size(3);
  s.P = index.size(1);
  s.J = s.P * s.GK;
  s.Jp = (s.J + lanes - 1) / lanes * lanes;
  s.paper = paper;
  if (paper) {
    TORCH_CHECK(table.dim() == 2 && table.size(0) == s.D && table.size(1) % s.J == 0,
                "paper-form table must be [d, G*J] with d = ", s.D, " and J = ", s.J, ", got ", table.sizes());
    s.G = table.size(1) / s.J;
    s.t_sd = s.G * s.J;
    s.t_sh = s.J;
  } else {
    TORCH_CHECK(table.dim() == 3 && table.size(1) == s.D && table.size(2) == s.J && table.size(0) == s.GQ,
                "aligned-form table must be [G, d, J] with G = ", s.GQ, ", d = ", s.D, ", J = ", s.J, ", got ",
                table.sizes());
    s.G = s.GQ;
    s.t_sd = s.J;
    s.t_sh = s.D * s.J;
  }
  TORCH_CHECK(k.size(0) == s.B && k.size(1) == s.NH && k.size(4) == s.D, "k must be [B, nh, N, G', d], got ",
              k.sizes(), " for q ", q.sizes());
  TORCH_CHECK(index.size(0) == s.X, "index must have one row per query position: ", index.sizes(), " for X = ", s.X);
  return s;
}

// Strides of a [B, nh, X, G, d] tensor (d contiguous): the layers' q, out and dout are
// permuted views of [B, X, G, nh, d] memory, read and written in place.
struct Strides {
  int64_t b, h, x, g;
  explicit Strides(const torch::Tensor& t) : b(t.stride(0)), h(t.stride(1)), x(t.stride(2)), g(t.stride(3)) {
    TORCH_CHECK(t.stride(4) == 1, "the fused attention kernel needs the head dim contiguous, got strides ",
                t.strides());
  }
  int64_t row(int64_t bh, int64_t NH, int64_t x_) const { return (bh / NH) * b + (bh % NH) * h + x_ * x; }
};

// 64-byte aligned scratch memory.
template <typename T>
struct Buffer {
  T* data = nullptr;
  explicit Buffer(int64_t n, T fill = T(0)) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    data = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data != nullptr, "out of memory for ", bytes, " bytes of attention scratch");
    std::fill(data, data + n, fill);
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// Dropout: a per-layer key and the mask of one score row (gq, h) of one query.
struct Dropout {
  bool on = false;
  uint32_t threshold = 65536;  // kept when a 16-bit lane < threshold
  double scale = 1.0;
  uint64_t seed = 0;
  std::vector<uint32_t> inner;  // mix32(j ^ key) per key j

  Dropout(double p, int64_t seed_, int64_t J) {
    if (p <= 0.0) return;
    on = true;
    const long t = std::lround((1.0 - p) * 65536.0);
    threshold = static_cast<uint32_t>(std::min(std::max(t, 1L), 65536L));
    scale = 65536.0 / threshold;
    seed = mix64(static_cast<uint64_t>(seed_));
    inner.resize(J);
    const uint32_t key = static_cast<uint32_t>(seed >> 32);
    for (int64_t j = 0; j < J; ++j) inner[j] = mix32(static_cast<uint32_t>(j) ^ key);
  }

  template <typename T>
  void fill(T* mask, uint64_t row, int64_t J, int64_t Jp) const {
    const uint64_t h = mix64(seed ^ (row * 0xd1b54a32d192ed03ULL));
    const uint32_t base = static_cast<uint32_t>(h) ^ static_cast<uint32_t>(h >> 32);
    const T kept = static_cast<T>(scale);
    const uint32_t* in = inner.data();
    for (int64_t j = 0; j < J; ++j) mask[j] = (mix32(in[j] ^ base) >> 16) < threshold ? kept : T(0);
    for (int64_t j = J; j < Jp; ++j) mask[j] = T(0);
  }
};

inline uint64_t row_id(const Shape& s, int64_t bh, int64_t x, int64_t gq, int64_t h) {
  return static_cast<uint64_t>(((bh * s.X + x) * s.GQ + gq) * s.G + h);
}

// Calls f(p, idx[p], len) for each run idx[p], idx[p] + 1, ..., idx[p] + len - 1 of a window.
template <typename F>
inline void for_runs(const int64_t* idx, int64_t P, F&& f) {
  for (int64_t p = 0; p < P;) {
    int64_t len = 1;
    while (p + len < P && idx[p + len] == idx[p] + len) ++len;
    f(p, idx[p], len);
    p += len;
  }
}

// The caller's table as [G][D][Jp], zero-padded.
template <typename T>
void pad_table(const Shape& s, const T* table, T* Tp) {
  for (int64_t h = 0; h < s.G; ++h)
    for (int64_t d = 0; d < s.D; ++d)
      for (int64_t j = 0; j < s.J; ++j) Tp[(h * s.D + d) * s.Jp + j] = table[d * s.t_sd + h * s.t_sh + j];
}

// Per-thread work of one query position: the window's keys and values, content scores, the
// probabilities of every (gq, h) row and their masked sum A.
template <typename T>
struct Query {
  using V = typename Vec<T>::V;
  static constexpr int N = Vec<T>::N;
  const Shape& s;
  const Dropout& drop;
  const T* Tp;
  Buffer<T> Kt, Vt, c, P, M, A, qx;
  int64_t NV;

  Query(const Shape& s_, const Dropout& drop_, const T* Tp_)
      : s(s_), drop(drop_), Tp(Tp_), Kt(s_.D * s_.Jp), Vt(s_.D * s_.Jp), c(s_.GQ * s_.Jp),
        P(s_.pairs() * s_.Jp), M(drop_.on ? s_.pairs() * s_.Jp : 0), A(s_.G * s_.Jp), qx(s_.GQ * s_.D),
        NV(s_.Jp / N) {}

  // Kt, Vt [D][Jp] from kt, vt [D][NK GK] of this (batch, head): so that the loops run over j
  // (padding stays zero). A window's offsets in one row are consecutive key positions, so
  // each run of them is one contiguous copy per d.
  void gather(const T* kt_bh, const T* vt_bh, const int64_t* idx) {
    const int64_t D = s.D, Jp = s.Jp, row = s.NK * s.GK;
    for_runs(idx, s.P, [&](int64_t p, int64_t pos, int64_t len) {
      const int64_t n = len * s.GK;
      for (int64_t d = 0; d < D; ++d) {  // short runs (5 x 4 for R4): a loop, not memcpy calls
        T* __restrict kw = Kt.data + d * Jp + p * s.GK;
        T* __restrict vw = Vt.data + d * Jp + p * s.GK;
        const T* __restrict ks = kt_bh + d * row + pos * s.GK;
        const T* __restrict vs = vt_bh + d * row + pos * s.GK;
        for (int64_t i = 0; i < n; ++i) {
          kw[i] = ks[i];
          vw[i] = vs[i];
        }
      }
    });
  }

  // c[gq][j] = q[gq] . k[j] + bias[j] (-inf on padding).
  void content(const T* qx, const T* bias_x) {
    const int64_t D = s.D, Jp = s.Jp;
    T* c0 = c.data;
    for (int64_t gq = 0; gq < s.GQ; ++gq) {
      T* cr = c0 + gq * Jp;
      for (int64_t p = 0; p < s.P; ++p)
        for (int64_t gk = 0; gk < s.GK; ++gk) cr[p * s.GK + gk] = bias_x ? bias_x[p] : T(0);
      for (int64_t j = s.J; j < Jp; ++j) cr[j] = -std::numeric_limits<T>::infinity();
      combine(cr, qx + gq * D, 1, D, Kt.data, Jp, NV, cr);
    }
  }

  // Row pi = (gq, h): P[pi] = softmax_j(c[gq] + q[gq] . T[h]); A[h] += P[pi] M[pi].
  void row(const T* qx, int64_t gq, int64_t h, int64_t pi, uint64_t rid) {
    const int64_t D = s.D, Jp = s.Jp;
    const T* qv = qx + gq * D;
    const T* cr = c.data + gq * Jp;
    const T* th = Tp + h * D * Jp;
    T* pr = P.data + pi * Jp;
    combine(cr, qv, 1, D, th, Jp, NV, pr);
    V vmax = load(pr);
    for (int64_t v = 1; v < NV; ++v) {
      const V sv = load(pr + v * N);
      vmax = vmax > sv ? vmax : sv;
    }
    const T m = hmax<T>(vmax);
    V vsum = V{};
    for (int64_t v = 0; v < NV; ++v) {
      const V e = Vec<T>::exp_neg(load(pr + v * N) - m);
      store(pr + v * N, e);
      vsum += e;
    }
    const T inv = T(1) / hsum<T>(vsum);
    T* a = A.data + h * Jp;
    if (drop.on) {
      T* mr = M.data + pi * Jp;
      drop.fill(mr, rid, s.J, Jp);
      for (int64_t v = 0; v < NV; ++v) {
        const V pv = load(pr + v * N) * inv;
        store(pr + v * N, pv);
        store(a + v * N, load(a + v * N) + pv * load(mr + v * N));
      }
    } else {
      for (int64_t v = 0; v < NV; ++v) {
        const V pv = load(pr + v * N) * inv;
        store(pr + v * N, pv);
        store(a + v * N, load(a + v * N) + pv);
      }
    }
  }

  // Everything of the forward pass at query x up to A; q_row[gq * q_sg + d] is q[gq][d].
  void probabilities(const T* q_row, int64_t q_sg, const T* k_bh, const T* v_bh, const int64_t* idx,
                     const T* bias_x, int64_t bh, int64_t x) {
    for (int64_t gq = 0; gq < s.GQ; ++gq)
      for (int64_t d = 0; d < s.D; ++d) qx.data[gq * s.D + d] = q_row[gq * q_sg + d];
    gather(k_bh, v_bh, idx);
    content(qx.data, bias_x);
    std::fill(A.data, A.data + s.G * s.Jp, T(0));
    int64_t pi = 0;
    for (int64_t gq = 0; gq < s.GQ; ++gq)
      for (int64_t h = s.paper ? 0 : gq; h < (s.paper ? s.G : gq + 1); ++h, ++pi)
        row(qx.data, gq, h, pi, row_id(s, bh, x, gq, h));
  }
};

template <typename T>
void forward_impl(const Shape& s, const T* q, const Strides& qs, const T* k, const T* v, const T* table,
                  const int64_t* index, const T* bias, const Dropout& drop, T* out, const Strides& os) {
  constexpr int N = Vec<T>::N;
  const int64_t D = s.D, Jp = s.Jp;
  Buffer<T> Tp(s.G * D * Jp);
  pad_table(s, table, Tp.data);
  at::parallel_for(0, s.B * s.NH * s.X, 1, [&](int64_t begin, int64_t end) {
    Query<T> w(s, drop, Tp.data);
    Buffer<T> partial(D * N);  // vector partial sums of one output row
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / s.X, x = r % s.X;
      w.probabilities(q + qs.row(bh, s.NH, x), qs.g, k + bh * D * s.NK * s.GK, v + bh * D * s.NK * s.GK,
                      index + x * s.P, bias ? bias + x * s.P : nullptr, bh, x);
      T* o = out + os.row(bh, s.NH, x);
      for (int64_t h = 0; h < s.G; ++h) {
        std::fill(partial.data, partial.data + D * N, T(0));
        vdots(w.A.data + h * Jp, w.Vt.data, Jp, D, w.NV, partial.data);
        for (int64_t d = 0; d < D; ++d) o[h * os.g + d] = hsum<T>(load(partial.data + d * N));
      }
    }
  });
}

template <typename T>
void backward_impl(const Shape& s, const T* q, const Strides& qs, const T* k, const T* v, const T* table,
                   const int64_t* index, const T* bias, const Dropout& drop, const T* dout, const Strides& ds_,
                   T* dq, const Strides& dqs, T* dk, T* dv, T* dtable) {
  using V = typename Vec<T>::V;
  constexpr int N = Vec<T>::N;
  const int64_t J = s.J, Jp = s.Jp, D = s.D, GQ = s.GQ, G = s.G;
  const int64_t table_padded = G * D * Jp;
  Buffer<T> Tp(table_padded);
  pad_table(s, table, Tp.data);
  const int threads = at::get_num_threads();
  Buffer<T> partial(static_cast<int64_t>(threads) * table_padded);  // dT per thread, [G][D][Jp]
  at::parallel_for(0, s.B * s.NH, 1, [&](int64_t begin, int64_t end) {
    T* dT = partial.data + static_cast<int64_t>(at::get_thread_num()) * table_padded;
    Query<T> w(s, drop, Tp.data);
    const int64_t NV = w.NV;
    Buffer<T> dA(G * Jp), dS(s.pairs() * Jp), dc(GQ * Jp), dKt(D * Jp), dVt(D * Jp), dqacc(GQ * D * N), dout_local(G * D);
    T* dox = dout_local.data;
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* k_bh = k + bh * D * s.NK * s.GK;  // all four [D][NK GK]
      const T* v_bh = v + bh * D * s.NK * s.GK;
      T* dk_bh = dk + bh * D * s.NK * s.GK;
      T* dv_bh = dv + bh * D * s.NK * s.GK;
      for (int64_t x = 0; x < s.X; ++x) {
        const int64_t* idx = index + x * s.P;
        w.probabilities(q + qs.row(bh, s.NH, x), qs.g, k_bh, v_bh, idx, bias ? bias + x * s.P : nullptr, bh, x);
        const T* qx = w.qx.data;
        const T* dout_row = dout + ds_.row(bh, s.NH, x);
        for (int64_t h = 0; h < G; ++h)
          for (int64_t d = 0; d < D; ++d) dox[h * D + d] = dout_row[h * ds_.g + d];
        T* dq_row = dq + dqs.row(bh, s.NH, x);
        // dA[h][j] = dout[h] . v[j];  dv[j][d] = sum_h A[h][j] dout[h][d]
        for (int64_t h = 0; h < G; ++h) combine<T>(nullptr, dox + h * D, 1, D, w.Vt.data, Jp, NV, dA.data + h * Jp);
        for (int64_t d = 0; d < D; ++d) combine<T>(nullptr, dox + d, D, G, w.A.data, Jp, NV, dVt.data + d * Jp);
        // softmax backward per row: ds = p (dp - sum_j p dp), dp = dA[h] m
        std::fill(dc.data, dc.data + GQ * Jp, T(0));
        int64_t pi = 0;
        for (int64_t gq = 0; gq < GQ; ++gq) {
          for (int64_t h = s.paper ? 0 : gq; h < (s.paper ? G : gq + 1); ++h, ++pi) {
            const T* pr = w.P.data + pi * Jp;
            const T* da = dA.data + h * Jp;
            T* dsr = dS.data + pi * Jp;
            V vdot = V{};
            for (int64_t vi = 0; vi < NV; ++vi) {
              V dp = load(da + vi * N);
              if (drop.on) dp *= load(w.M.data + pi * Jp + vi * N);
              store(dsr + vi * N, dp);
              vdot += load(pr + vi * N) * dp;
            }
            const T dot = hsum<T>(vdot);
            T* dcr = dc.data + gq * Jp;
            for (int64_t vi = 0; vi < NV; ++vi) {
              const V ds = load(pr + vi * N) * (load(dsr + vi * N) - dot);
              store(dsr + vi * N, ds);
              store(dcr + vi * N, load(dcr + vi * N) + ds);
            }
          }
        }
        // dq[gq] (vector partial sums, reduced at the end): positional and content terms
        std::fill(dqacc.data, dqacc.data + GQ * D * N, T(0));
        pi = 0;
        for (int64_t gq = 0; gq < GQ; ++gq) {
          for (int64_t h = s.paper ? 0 : gq; h < (s.paper ? G : gq + 1); ++h, ++pi) {
            vdots(dS.data + pi * Jp, Tp.data + h * D * Jp, Jp, D, NV, dqacc.data + gq * D * N);
          }
        }
        for (int64_t gq = 0; gq < GQ; ++gq) {
          vdots(dc.data + gq * Jp, w.Kt.data, Jp, D, NV, dqacc.data + gq * D * N);
          for (int64_t d = 0; d < D; ++d) dq_row[gq * dqs.g + d] = hsum<T>(load(dqacc.data + (gq * D + d) * N));
        }
        // dT[h][d][j] += sum_gq q[gq][d] ds[gq, h][j]
        for (int64_t h = 0; h < G; ++h) {
          for (int64_t d = 0; d < D; ++d) {
            T* dtr = dT + (h * D + d) * Jp;
            if (s.paper)  // rows dS[gq * G + h] for gq = 0 .. GQ-1
              combine(dtr, qx + d, D, GQ, dS.data + h * Jp, G * Jp, NV, dtr);
            else
              combine(dtr, qx + h * D + d, 1, 1, dS.data + h * Jp, Jp, NV, dtr);
          }
        }
        // dk[j] = sum_gq dc[gq][j] q[gq]
        for (int64_t d = 0; d < D; ++d) combine<T>(nullptr, qx + d, D, GQ, dc.data, Jp, NV, dKt.data + d * Jp);
        // add the window's key and value gradients at their positions
        const int64_t krow = s.NK * s.GK;
        for_runs(idx, s.P, [&](int64_t p, int64_t pos, int64_t len) {
          const int64_t n = len * s.GK;
          for (int64_t d = 0; d < D; ++d) {
            T* __restrict dks = dk_bh + d * krow + pos * s.GK;
            T* __restrict dvs = dv_bh + d * krow + pos * s.GK;
            const T* __restrict dkw = dKt.data + d * Jp + p * s.GK;
            const T* __restrict dvw = dVt.data + d * Jp + p * s.GK;
            for (int64_t i = 0; i < n; ++i) {
              dks[i] += dkw[i];
              dvs[i] += dvw[i];
            }
          }
        });
      }
    }
  });
  for (int t = 0; t < threads; ++t) {
    const T* src = partial.data + static_cast<int64_t>(t) * table_padded;
    for (int64_t h = 0; h < G; ++h)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < J; ++j) dtable[d * s.t_sd + h * s.t_sh + j] += src[(h * D + d) * Jp + j];
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& table,
                  const torch::Tensor& index, const torch::Tensor& bias) {
  for (const auto* t : {&q, &k, &v, &table}) {
    TORCH_CHECK(t->device().is_cpu(), "the fused attention kernel runs on the CPU only");
    TORCH_CHECK(t != &table || t->is_contiguous(), "the fused attention kernel needs a contiguous table");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v and table must share one dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  }
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.sizes() == k.sizes(), "q, k, v must be 5-d with k and v alike");
  TORCH_CHECK(index.scalar_type() == torch::kLong && index.dim() == 2 && index.is_contiguous(),
              "index must be a contiguous int64 [X, P] tensor");
  if (bias.numel() > 0)
    TORCH_CHECK(bias.sizes() == index.sizes() && bias.scalar_type() == q.scalar_type() && bias.is_contiguous(),
                "bias must be a contiguous [X, P] tensor of q's dtype");
}

}  // namespace

torch::Tensor fused_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                            torch::Tensor index, torch::Tensor bias, bool paper, double p_drop, int64_t seed) {
  check_inputs(q, k, v, table, index, bias);
  const Shape s = make_shape(q, k, table, index, paper, q.scalar_type() == torch::kFloat ? 16 : 8);
  // [B, nh, X, G, d] over [B, X, G, nh, d] memory: the layer merges the heads without a copy
  auto out = torch::empty({s.B, s.X, s.G, s.NH, s.D}, q.options()).permute({0, 3, 1, 2, 4});
  const Dropout drop(p_drop, seed, s.J);
  // keys and values as [B, nh, d, N G']: a window row is then one contiguous run per d
  const auto kt = k.permute({0, 1, 4, 2, 3}).contiguous();
  const auto vt = v.permute({0, 1, 4, 2, 3}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_window_attention_forward", [&] {
    forward_impl<scalar_t>(s, q.data_ptr<scalar_t>(), Strides(q), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(),
                           table.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                           bias.numel() ? bias.data_ptr<scalar_t>() : nullptr, drop, out.data_ptr<scalar_t>(),
                           Strides(out));
  });
  return out;
}

std::vector<torch::Tensor> fused_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                                          torch::Tensor index, torch::Tensor bias, bool paper, double p_drop,
                                          int64_t seed, torch::Tensor dout) {
  check_inputs(q, k, v, table, index, bias);
  const Shape s = make_shape(q, k, table, index, paper, q.scalar_type() == torch::kFloat ? 16 : 8);
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.sizes() == torch::IntArrayRef({s.B, s.NH, s.X, s.G, s.D}),
              "dout must be a [B, nh, X, G, d] tensor of q's dtype, got ", dout.sizes());
  auto dq = torch::empty_like(q);  // q's memory layout
  const auto kt = k.permute({0, 1, 4, 2, 3}).contiguous();
  const auto vt = v.permute({0, 1, 4, 2, 3}).contiguous();
  auto dkt = torch::zeros_like(kt);
  auto dvt = torch::zeros_like(vt);
  auto dtable = torch::zeros_like(table);
  const Dropout drop(p_drop, seed, s.J);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_window_attention_backward", [&] {
    backward_impl<scalar_t>(s, q.data_ptr<scalar_t>(), Strides(q), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(),
                            table.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                            bias.numel() ? bias.data_ptr<scalar_t>() : nullptr, drop, dout.data_ptr<scalar_t>(),
                            Strides(dout), dq.data_ptr<scalar_t>(), Strides(dq), dkt.data_ptr<scalar_t>(),
                            dvt.data_ptr<scalar_t>(), dtable.data_ptr<scalar_t>());
  });
  // back to [B, nh, N, G', d] (views of the [B, nh, d, N, G'] gradients)
  return {dq, dkt.permute({0, 1, 3, 4, 2}), dvt.permute({0, 1, 3, 4, 2}), dtable};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fused_forward, "fused windowed group attention, forward (CPU)");
  m.def("backward", &fused_backward, "fused windowed group attention, backward (CPU)");
}
