// VQ attention over a compressed K/V cache on CPU: the loop PyTorch cannot express without
// materializing [rows, tokens, subspaces] intermediates.
//
// Per (batch, kv head) and block of RB query rows (the G*L rows sharing a kv head, padded to RB
// so that every inner step is one RB-wide vector operation):
//   score[t, :] = sum_s LUT[s, code_k[t, s], :]     LUT[s, k, r] = scale * q_r[s] . ck[s, k]
//   exact scores at K anchors and window tokens, mask / causal, softmax,
//   hist[s, code_v[t, s], :] += p[t, :]             (V anchors excluded, added exactly)
//   out = hist @ cv + exact anchors + exact window.
// The LUT and the histogram are S * K * RB floats (tens of KB) and stay in cache; the codes are
// read once per row block. The sequence is split into chunks (flash-decoding): each chunk keeps
// its own row max / sum / partial output, merged afterwards, so decode (one row block per kv
// head) still uses every core. Then the Anchor Score sums of the window tokens.
//
// Semantics are those of attention.py's `vq_attention` (SDPA masking: boolean keep-mask or
// additive float mask broadcast to [B, Hq, L, T], top-left causal; a fully masked row gives 0).

// Only the headers it needs (not torch/extension.h): the first-use build takes seconds, not minutes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vq_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Side {  // one side (K or V) of the cache, raw pointers and sizes
  const void* codes;
  int64_t code_sb, code_sh;  // batch / head strides of codes; token stride is S, subspace stride 1
  const float* cent;         // [H, S, K, d]
  const float* arows;        // [B, H, As, D], the first A slots of each (b, h) used
  const int32_t* apos;       // [B, H, As]
  const float* win;          // [B, H, Tw, D]
  int64_t S, K, d, A, As;
};

Side side(const at::Tensor& codes, const at::Tensor& cent, const at::Tensor& arows, const at::Tensor& apos,
          const at::Tensor& win, int64_t A) {
  return {codes.data_ptr(), codes.stride(0), codes.stride(1), cent.data_ptr<float>(), arows.data_ptr<float>(),
          apos.data_ptr<int32_t>(), win.data_ptr<float>(), cent.size(1), cent.size(2), cent.size(3), A, arows.size(2)};
}

struct Mask {  // attn_mask expanded to [B, Hq, L, T]; null data = no mask
  const bool* keep = nullptr;
  const float* add = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, st = 0;
};

struct Problem {
  int64_t B, H, R, D, T, Tw, Tc, G, L, NRB, NC, CT;
  float scale;
  bool causal;
  const float* q;  // [B, H, R, D]
};

// RB floats (or int32) as one SIMD value: GCC/Clang vector extensions, unaligned, may alias float.
// With RB = 4 or 8 every per-token step below is one SSE / AVX instruction.
template <int RB>
struct Vec {
  typedef float F __attribute__((vector_size(RB * 4), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(RB * 4), aligned(4), may_alias));
};
template <int RB>
inline typename Vec<RB>::F& vec(float* p) { return *reinterpret_cast<typename Vec<RB>::F*>(p); }
template <int RB>
inline const typename Vec<RB>::F& vec(const float* p) { return *reinterpret_cast<const typename Vec<RB>::F*>(p); }

// exp(x) for x <= 0 (scores minus their row max); 0 below -87 and for -inf. Cephes' expf (a
// degree-7 polynomial after range reduction, ~1 ulp) on a whole vector: std::exp is a library call
// per element, and there is one exponential per (token, row).
template <int RB>
inline typename Vec<RB>::F exp_nonpositive(typename Vec<RB>::F x) {
  using F = typename Vec<RB>::F;
  using I = typename Vec<RB>::I;
  const F zero = {}, lo = zero - 87.f;
  const I tiny = x < lo;
  x = tiny ? lo : x;
  const F r = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: r's low bits = round(x / ln 2)
  const F n = r - 12582912.f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  F y = zero + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  const I pow2 = ((reinterpret_cast<const I&>(r) - 0x4B400000) + 127) << 23;  // 2^n, n >= -126
  y = y * reinterpret_cast<const F&>(pow2);
  return tiny ? zero : y;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// LUT[s, k, :] = scale * q_rows[s] . centroid[s, k], vectorized over the RB rows (padding rows 0).
// Built by every task for its row block: a few microseconds, and no table for all blocks is held.
template <int RB>
void build_lut(const Problem& P, const Side& k, int64_t bh, int64_t rb, float* lut) {
  using F = typename Vec<RB>::F;
  std::vector<float> qt(P.D * RB, 0.f);  // the block's query rows, transposed and scaled: [D, RB]
  for (int j = 0; j < RB && rb * RB + j < P.R; ++j)
    for (int64_t i = 0; i < P.D; ++i) qt[i * RB + j] = P.scale * P.q[(bh * P.R + rb * RB + j) * P.D + i];
  const float* cent = k.cent + (bh % P.H) * k.S * k.K * k.d;
  for (int64_t s = 0; s < k.S; ++s)
    for (int64_t c = 0; c < k.K; ++c) {
      F acc = {};
      const float* cv = cent + (s * k.K + c) * k.d;
      for (int64_t i = 0; i < k.d; ++i) acc += vec<RB>(&qt[(s * k.d + i) * RB]) * cv[i];
      vec<RB>(lut + (s * k.K + c) * RB) = acc;
    }
}

// One (batch, kv head, row block, chunk) task: exponentiated scores relative to the chunk's row
// max, their sum, and the chunk's unnormalized output o[D, RB].
template <typename KC, typename VC, int RB>
void chunk_task(const Problem& P, const Side& k, const Side& v, const Mask& mask, int64_t b, int64_t h,
                int64_t rb, int64_t chunk, float* m_out, float* l_out, float* o_out, float* ew) {
  const int64_t t0 = chunk * P.CT, t1 = std::min(P.T, t0 + P.CT), tc1 = std::min(t1, P.Tc);
  const int64_t n = std::max<int64_t>(t1 - t0, 0);
  const int64_t bh = b * P.H + h;
  std::vector<float> sc(n * RB);
  const float* q = P.q + bh * P.R * P.D;
  const int nreal = static_cast<int>(std::min<int64_t>(RB, P.R - rb * RB));
  std::vector<float> lut(k.S * k.K * RB);
  build_lut<RB>(P, k, bh, rb, lut.data());

  using F = typename Vec<RB>::F;
  const F zero = {};
  // scores: codes, then exact rows at K anchors and in the window
  const KC* kcodes = static_cast<const KC*>(k.codes) + b * k.code_sb + h * k.code_sh;
  for (int64_t t = t0; t < tc1; ++t) {
    F acc = zero;
    const KC* code = kcodes + t * k.S;
    for (int64_t s = 0; s < k.S; ++s) acc += vec<RB>(&lut[(s * k.K + static_cast<int64_t>(code[s])) * RB]);
    vec<RB>(&sc[(t - t0) * RB]) = acc;
  }
  auto exact = [&](int64_t t, const float* row) {
    for (int j = 0; j < nreal; ++j) sc[(t - t0) * RB + j] = P.scale * dot(q + (rb * RB + j) * P.D, row, P.D);
  };
  for (int64_t a = 0; a < k.A; ++a) {
    int64_t pos = k.apos[bh * k.As + a];
    if (pos >= t0 && pos < tc1) exact(pos, k.arows + (bh * k.As + a) * P.D);
  }
  for (int64_t t = std::max(t0, P.Tc); t < t1; ++t) exact(t, k.win + (bh * P.Tw + t - P.Tc) * P.D);

  // mask (rows r = g * L + l of query head h * G + g), causal (key t > query l)
  for (int j = 0; j < nreal; ++j) {
    const int64_t r = rb * RB + j, l = r % P.L, hq = h * P.G + r / P.L;
    float* col = sc.data() + j;
    if (mask.keep || mask.add) {
      const int64_t base = b * mask.sb + hq * mask.sh + l * mask.sl;
      if (mask.keep) {
        for (int64_t t = t0; t < t1; ++t)
          if (!mask.keep[base + t * mask.st]) col[(t - t0) * RB] = kNegInf;
      } else {
        for (int64_t t = t0; t < t1; ++t) col[(t - t0) * RB] += mask.add[base + t * mask.st];
      }
    }
    if (P.causal)
      for (int64_t t = std::max(t0, l + 1); t < t1; ++t) col[(t - t0) * RB] = kNegInf;
  }

  // row max, then exponentials and their sum (a fully masked row stays all 0)
  F mx = zero + kNegInf, sum = zero;
  for (int64_t i = 0; i < n; ++i) {
    const F x = vec<RB>(&sc[i * RB]);
    mx = x > mx ? x : mx;
  }
  const F msafe = mx == kNegInf ? zero : mx;
  for (int64_t i = 0; i < n; ++i) sum += (vec<RB>(&sc[i * RB]) = exp_nonpositive<RB>(vec<RB>(&sc[i * RB]) - msafe));

  std::vector<float> o(P.D * RB, 0.f);  // [D, RB]
  auto add_row = [&](const F e, const float* row) {
    for (int64_t i = 0; i < P.D; ++i) vec<RB>(&o[i * RB]) += e * row[i];
  };
  // V anchors exactly, and out of the histogram
  for (int64_t a = 0; a < v.A; ++a) {
    int64_t pos = v.apos[bh * v.As + a];
    if (pos >= t0 && pos < tc1) {
      add_row(vec<RB>(&sc[(pos - t0) * RB]), v.arows + (bh * v.As + a) * P.D);
      vec<RB>(&sc[(pos - t0) * RB]) = zero;
    }
  }
  // histogram of attention weight per value centroid, then times the codebook
  std::vector<float> hist(v.S * v.K * RB, 0.f);
  const VC* vcodes = static_cast<const VC*>(v.codes) + b * v.code_sb + h * v.code_sh;
  for (int64_t t = t0; t < tc1; ++t) {
    const F e = vec<RB>(&sc[(t - t0) * RB]);
    const VC* code = vcodes + t * v.S;
    for (int64_t s = 0; s < v.S; ++s) vec<RB>(&hist[(s * v.K + static_cast<int64_t>(code[s])) * RB]) += e;
  }
  const float* vcent = v.cent + h * v.S * v.K * v.d;
  for (int64_t s = 0; s < v.S; ++s)
    for (int64_t c = 0; c < v.K; ++c) {
      const F hs = vec<RB>(&hist[(s * v.K + c) * RB]);
      const float* cv = vcent + (s * v.K + c) * v.d;
      float* os = o.data() + s * v.d * RB;
      for (int64_t i = 0; i < v.d; ++i) vec<RB>(os + i * RB) += hs * cv[i];
    }
  // window exactly; keep its exponentials for the Anchor Score
  for (int64_t t = std::max(t0, P.Tc); t < t1; ++t) {
    const F e = vec<RB>(&sc[(t - t0) * RB]);
    add_row(e, v.win + (bh * P.Tw + t - P.Tc) * P.D);
    vec<RB>(ew + (t - P.Tc) * RB) = e;
  }
  float m[RB], l_sum[RB];
  for (int j = 0; j < RB; ++j) m[j] = mx[j], l_sum[j] = sum[j];
  std::copy(m, m + RB, m_out);
  std::copy(l_sum, l_sum + RB, l_out);
  std::copy(o.begin(), o.end(), o_out);
}

// Runs fn(0) .. fn(n - 1) on the calling thread and up to threads - 1 helpers from ATen's inter-op
// pool, each taking the next index until none is left. The caller waits only for tasks already
// taken, never for a helper to start. (With an OpenMP parallel-for the caller waits at the join for
// every thread of the team: on a machine whose cores are busy with other processes a woken thread
// may not run for a scheduler time slice, and the 3 ms decode step took ~12 ms at the median.)
template <typename Fn>
void parallel_tasks(int64_t n, int64_t threads, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, left{0};
    int64_t n = 0;
    std::function<void(int64_t)> fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();  // a helper that starts late still finds it alive (and no work)
  st->n = n, st->left = n, st->fn = [&fn](int64_t i) { fn(i); };
  auto drain = [st] {
    for (int64_t i; (i = st->next.fetch_add(1)) < st->n;) {
      st->fn(i);
      if (st->left.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t) at::launch(drain);
  drain();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->left.load() == 0; });
}

template <typename KC, typename VC, int RB>
void run(const Problem& P, const Side& k, const Side& v, const Mask& mask, const float* kerr, const float* verr,
         float* out, float* score) {
  const int64_t nblk = P.B * P.H * P.NRB, ntask = nblk * P.NC;
  const int nthreads = at::get_num_threads();
  std::vector<float> m(ntask * RB), l(ntask * RB), o(ntask * P.D * RB), ew(nblk * P.Tw * RB);

  parallel_tasks(ntask, nthreads, [&](int64_t i) {
    const int64_t blk = i / P.NC;
    chunk_task<KC, VC, RB>(P, k, v, mask, blk / (P.H * P.NRB), (blk / P.NRB) % P.H,
                           blk % P.NRB, i % P.NC, m.data() + i * RB, l.data() + i * RB, o.data() + i * P.D * RB,
                           ew.data() + blk * P.Tw * RB);
  });

  // Merge the chunks (rescaled to the row max), normalize, then score the window tokens. Microseconds
  // for decode: helpers only when there is enough of it to pay for waking them.
  const bool wide = P.B * P.H * P.R * P.D * (P.NC + 2 * P.Tw) > (1 << 20);
  parallel_tasks(P.B * P.H, wide ? nthreads : 1, [&](int64_t bh) {
    std::vector<double> pw(P.R * P.Tw);  // normalized weights of the window tokens [R, Tw]
    for (int64_t rb = 0; rb < P.NRB; ++rb) {
      const int64_t blk = bh * P.NRB + rb;
      for (int j = 0; j < RB && rb * RB + j < P.R; ++j) {
        const int64_t r = rb * RB + j;
        float mx = kNegInf;
        for (int64_t c = 0; c < P.NC; ++c) mx = std::max(mx, m[(blk * P.NC + c) * RB + j]);
        std::vector<float> alpha(P.NC, 0.f);
        float total = 0.f;
        for (int64_t c = 0; c < P.NC; ++c) {
          const float mc = m[(blk * P.NC + c) * RB + j];
          alpha[c] = mc == kNegInf ? 0.f : std::exp(mc - mx);
          total += alpha[c] * l[(blk * P.NC + c) * RB + j];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;  // fully masked row -> 0, as SDPA
        float* orow = out + (bh * P.R + r) * P.D;
        for (int64_t i = 0; i < P.D; ++i) {
          float acc = 0.f;
          for (int64_t c = 0; c < P.NC; ++c) acc += alpha[c] * o[((blk * P.NC + c) * P.D + i) * RB + j];
          orow[i] = acc * inv;
        }
        for (int64_t t = 0; t < P.Tw; ++t)
          pw[r * P.Tw + t] = ew[(blk * P.Tw + t) * RB + j] * alpha[(P.Tc + t) / P.CT] * inv;
      }
    }
    // S1_t = sum_r p[r, t] * scale * |q_r| * |v_t - o_r|,  S0_t = sum_r p[r, t]
    for (int64_t t = 0; t < P.Tw; ++t) {
      const float* vt = v.win + (bh * P.Tw + t) * P.D;
      double s1 = 0.0, s0 = 0.0;
      for (int64_t r = 0; r < P.R; ++r) {
        const double p = pw[r * P.Tw + t];
        if (p == 0.0) continue;
        const float* qr = P.q + (bh * P.R + r) * P.D;
        const float* orow = out + (bh * P.R + r) * P.D;
        double qn = 0.0, dist = 0.0;
        for (int64_t i = 0; i < P.D; ++i) {
          qn += double(qr[i]) * qr[i];
          const double diff = double(vt[i]) - orow[i];
          dist += diff * diff;
        }
        s1 += p * P.scale * std::sqrt(qn) * std::sqrt(dist);
        s0 += p;
      }
      score[bh * P.Tw + t] = static_cast<float>(kerr[bh * P.Tw + t] * s1 + verr[bh * P.Tw + t] * s0);
    }
  });
}

template <int RB>
void dispatch(const Problem& P, const Side& k, const Side& v, const Mask& mask, at::ScalarType kt, at::ScalarType vt,
              const float* kerr, const float* verr, float* out, float* score) {
  const bool k8 = kt == at::kByte, v8 = vt == at::kByte;
  if (k8 && v8) run<uint8_t, uint8_t, RB>(P, k, v, mask, kerr, verr, out, score);
  else if (k8) run<uint8_t, int16_t, RB>(P, k, v, mask, kerr, verr, out, score);
  else if (v8) run<int16_t, uint8_t, RB>(P, k, v, mask, kerr, verr, out, score);
  else run<int16_t, int16_t, RB>(P, k, v, mask, kerr, verr, out, score);
}

}  // namespace

// qg [B, H, R, D] float32 contiguous (R = G * L rows per kv head, row r = g * L + l); codes
// [B, H, T, S] uint8/int16 with unit subspace stride and token stride S; centroids [H, S, K, d],
// anchor rows [B, H, A, D], window [B, H, Tw, D], errors [B, H, Tw]: float32 contiguous; anchor
// positions int32 contiguous; mask None, bool or float32 expanded to [B, H * G, L, T].
// Returns (out [B, H, R, D] float32, score [B, H, Tw] float32).
//
// vq_attention_filled: the same over buffers filled in part (a static side, write.cpp): the first T
// tokens of the codes and the first Ak / Av anchor slots of each (batch, head); the mask covers T.
std::vector<at::Tensor> vq_attention_filled(const at::Tensor& qg, int64_t T, const at::Tensor& k_codes, const at::Tensor& k_cent,
                                            const at::Tensor& k_arows, const at::Tensor& k_apos, int64_t Ak,
                                            const at::Tensor& k_win, const at::Tensor& k_err, const at::Tensor& v_codes,
                                            const at::Tensor& v_cent, const at::Tensor& v_arows, const at::Tensor& v_apos,
                                            int64_t Av, const at::Tensor& v_win, const at::Tensor& v_err,
                                            const c10::optional<at::Tensor>& attn_mask, bool is_causal, double scale, int64_t L,
                                            int64_t chunk_tokens) {
  // The Python wrapper (cpu/__init__.py) prepares the layouts; a direct call with others fails here.
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cpu(); };
  TORCH_CHECK(qg.dim() == 4 && f32(qg) && L > 0 && qg.size(2) % L == 0, "qg: float32 contiguous [B, H, G * L, D]");
  for (const auto* side : {&k_codes, &v_codes}) {
    const at::Tensor& c = *side;
    TORCH_CHECK(c.dim() == 4 && c.is_cpu() && (c.scalar_type() == at::kByte || c.scalar_type() == at::kShort) &&
                    c.size(0) == qg.size(0) && c.size(1) == qg.size(1) && c.size(2) >= T &&
                    (c.stride(3) == 1 || c.size(3) <= 1) && (c.stride(2) == c.size(3) || c.size(2) <= 1),
                "codes: uint8 / int16 [B, H, T, S], token-major (token stride S, subspace stride 1)");
  }
  for (const auto* t : {&k_cent, &k_arows, &k_win, &k_err, &v_cent, &v_arows, &v_win, &v_err})
    TORCH_CHECK(f32(*t), "centroids, anchor rows, windows and errors must be float32 contiguous");
  for (const auto* t : {&k_apos, &v_apos})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "anchor positions must be int32 contiguous");
  TORCH_CHECK(k_apos.size(2) == k_arows.size(2) && v_apos.size(2) == v_arows.size(2) && Ak >= 0 && Ak <= k_arows.size(2) &&
                  Av >= 0 && Av <= v_arows.size(2),
              "anchor slots: rows and positions of one capacity, holding the anchors used");
  TORCH_CHECK(k_cent.size(1) * k_cent.size(3) == qg.size(3) && v_cent.size(1) * v_cent.size(3) == qg.size(3) &&
                  k_cent.size(1) == k_codes.size(3) && v_cent.size(1) == v_codes.size(3) &&
                  k_win.size(2) == v_win.size(2) && k_win.size(2) <= T,
              "inconsistent cache shapes");

  Problem P;
  P.B = qg.size(0), P.H = qg.size(1), P.R = qg.size(2), P.D = qg.size(3);
  P.T = T, P.Tw = k_win.size(2), P.Tc = P.T - P.Tw, P.L = L, P.G = P.R / L;
  P.scale = static_cast<float>(scale), P.causal = is_causal, P.q = qg.data_ptr<float>();
  const int RB = P.R <= 4 ? 4 : 8;
  P.NRB = (P.R + RB - 1) / RB;
  // Enough chunks for every thread to get several, none shorter than chunk_tokens.
  const int64_t threads = at::get_num_threads(), blocks = std::max<int64_t>(P.B * P.H * P.NRB, 1);
  P.NC = std::max<int64_t>(1, std::min((8 * threads + blocks - 1) / blocks, P.T / std::max<int64_t>(chunk_tokens, 1)));
  P.CT = std::max<int64_t>((P.T + P.NC - 1) / P.NC, 1);

  Mask mask;
  if (attn_mask && attn_mask->defined()) {
    const at::Tensor& mt = *attn_mask;
    TORCH_CHECK(mt.dim() == 4 && mt.size(0) == P.B && mt.size(1) == P.H * P.G && mt.size(2) == L && mt.size(3) == P.T,
                "mask must be expanded to [B, Hq, L, T]");
    if (mt.scalar_type() == at::kBool) mask.keep = mt.data_ptr<bool>();
    else mask.add = mt.data_ptr<float>();
    mask.sb = mt.stride(0), mask.sh = mt.stride(1), mask.sl = mt.stride(2), mask.st = mt.stride(3);
  }
  const Side k = side(k_codes, k_cent, k_arows, k_apos, k_win, Ak), v = side(v_codes, v_cent, v_arows, v_apos, v_win, Av);
  auto out = at::empty({P.B, P.H, P.R, P.D}, qg.options());
  auto score = at::empty({P.B, P.H, P.Tw}, qg.options());
  if (P.B * P.H * P.R == 0) {
    score.zero_();
    return {out, score};
  }
  auto go = [&](auto rb) {
    dispatch<decltype(rb)::value>(P, k, v, mask, k_codes.scalar_type(), v_codes.scalar_type(), k_err.data_ptr<float>(),
                                  v_err.data_ptr<float>(), out.data_ptr<float>(), score.data_ptr<float>());
  };
  if (RB == 4) go(std::integral_constant<int, 4>{});
  else go(std::integral_constant<int, 8>{});
  return {out, score};
}

std::vector<at::Tensor> vq_attention(const at::Tensor& qg, const at::Tensor& k_codes, const at::Tensor& k_cent,
                                     const at::Tensor& k_arows, const at::Tensor& k_apos, const at::Tensor& k_win,
                                     const at::Tensor& k_err, const at::Tensor& v_codes, const at::Tensor& v_cent,
                                     const at::Tensor& v_arows, const at::Tensor& v_apos, const at::Tensor& v_win,
                                     const at::Tensor& v_err, const c10::optional<at::Tensor>& attn_mask,
                                     bool is_causal, double scale, int64_t L, int64_t chunk_tokens) {
  TORCH_CHECK(k_codes.dim() == 4 && k_arows.dim() == 4 && v_arows.dim() == 4, "codes and anchor rows: [B, H, ., .]");
  return vq_attention_filled(qg, k_codes.size(2), k_codes, k_cent, k_arows, k_apos, k_arows.size(2), k_win, k_err, v_codes,
                             v_cent, v_arows, v_apos, v_arows.size(2), v_win, v_err, attn_mask, is_causal, scale, L, chunk_tokens);
}

// torch.ops.antkv_cpu.vq_attention (a plain library op; antkv::attention's CPU kernel calls it).
TORCH_LIBRARY(antkv_cpu, m) { m.def("vq_attention", &vq_attention); }
