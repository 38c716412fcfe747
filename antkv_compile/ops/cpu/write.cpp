// Quantize-on-write of one cache side on CPU: what `state.append` computes (window flush, anchor
// selection by Anchor Score, basis map, nearest centroid per subspace, quantization error, the
// concatenations) in one call instead of ~25 small PyTorch ops.
//
// Per (batch, kv head), in the order of state.append:
//   flush: the oldest n_leave = Tw - window window tokens leave; candidates = current anchors, then
//     the leavers; a NaN score loses (-inf), a leaver whose row has a NaN / Inf entry scores +inf;
//     if the budget A_new (state.flush_lengths, computed by the caller) holds every candidate they
//     stay in order, else the top A_new by torch.topk's own algorithm (ATen's TopKImpl.h: the same
//     std::partial_sort / nth_element + sort with the same comparator over (score, index) pairs),
//     so ties pick what torch.topk picks;
//   new rows: x A (float32, sum over d in ascending order), rounded to the new rows' dtype, then to
//     the exact-row dtype (the window's): the reference's to_basis(...).to(window.dtype);
//   codes: argmin over k of |c_k|^2 - 2 x . c_k in float32 (encode's formula), NaN wins and the
//     first minimum wins as in torch.argmin; the codebook is read transposed, 8 centroids per
//     vector operation (`vq_prepare`, memoized by the caller: ops/cpu/__init__.py `prepared`);
//   error: |x - c_code| ("actual") or the head's expected error; the new window scores are 0.
// Outputs are fresh tensors (the op contract), except vq_append_'s buffers, written in place. Rows
// are bit-equal to the reference's without a key basis (up to NaN payloads); sums (basis map, distances, error) are float32 in an order of their
// own, so with a basis a row may differ from the reference's (a BLAS matmul) by one rounding, a
// code where two centroids are equidistant within float32 rounding, an error by float32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include "vq_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows of the three float dtypes as float32 and back (c10's conversions: round to nearest even).
void load_row(const void* p, at::ScalarType t, int64_t n, float* out) {
  if (t == at::kFloat) std::memcpy(out, p, n * sizeof(float));
  else if (t == at::kHalf) for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  else for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
}

void store_row(void* p, at::ScalarType t, int64_t n, const float* in) {
  if (t == at::kFloat) std::memcpy(p, in, n * sizeof(float));
  else if (t == at::kHalf) for (int64_t i = 0; i < n; ++i) static_cast<c10::Half*>(p)[i] = c10::Half(in[i]);
  else for (int64_t i = 0; i < n; ++i) static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(in[i]);
}

// out [D] = x [D] M [D, D] (M row-major), summed over i in ascending order in float32: the basis
// map of a key row (write_side) and of a query row (query_to_basis, with M = (A^-1)^T).
void row_times(const float* x, const float* M, int64_t D, float* out) {
  std::fill(out, out + D, 0.f);
  for (int64_t i = 0; i < D; ++i) {
    const float xi = x[i];
    const float* mrow = M + i * D;
    for (int64_t e = 0; e < D; ++e) out[e] += xi * mrow[e];
  }
}

// x rounded to dtype t's precision, in place (what `.to(t)` then `.float()` gives).
void round_row(float* x, at::ScalarType t, int64_t n) {
  if (t == at::kHalf) for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(c10::Half(x[i]));
  else if (t == at::kBFloat16) for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(c10::BFloat16(x[i]));
}

bool finite_row(const void* p, at::ScalarType t, int64_t n, float* buf) {
  load_row(p, t, n, buf);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(buf[i])) return false;
  return true;
}

// torch.argmin's choice: the first NaN if any, else the first minimum.
int64_t argmin(const float* v, int64_t K) {
  int64_t best = 0;
  float bv = v[0];
  if (std::isnan(bv)) return 0;
  for (int64_t k = 1; k < K; ++k) {
    if (std::isnan(v[k])) return k;
    if (v[k] < bv) bv = v[k], best = k;
  }
  return best;
}

// torch.topk(largest=True, sorted=True) on one row, exactly as ATen's topk_impl_loop (TopKImpl.h)
// does it, so equal scores resolve the same way: the first k entries of q are the result.
void topk(std::vector<std::pair<float, int64_t>>& q, int64_t k) {
  using elem_t = std::pair<float, int64_t>;
  if (k == 0) return;
  auto gt = [](const elem_t& x, const elem_t& y) -> bool {
    return (std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first);
  };
  const int64_t n = static_cast<int64_t>(q.size());
  if (k * 64 <= n) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), gt);
  } else {
    std::nth_element(q.begin(), q.begin() + k - 1, q.end(), gt);
    std::sort(q.begin(), q.begin() + k - 1, gt);
  }
}

// 8 floats / int32 as one SIMD value (GCC / Clang vector extensions; AVX with -mavx2, two SSE
// halves without), unaligned.
typedef float V8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t I8 __attribute__((vector_size(32), aligned(4), may_alias));
inline V8& v8(float* p) { return *reinterpret_cast<V8*>(p); }

// torch.argmin of dist[0 .. K) (K a multiple of 8): per lane the first minimum, then the smallest
// index among the lanes holding the overall minimum; the first NaN if there is one.
int64_t argmin8(float* dist, int64_t K) {
  V8 mn = v8(dist);
  I8 idx = {0, 1, 2, 3, 4, 5, 6, 7}, at = idx, nan = mn != mn;
  for (int64_t k = 8; k < K; k += 8) {
    at += 8;
    const V8 v = v8(dist + k);
    const I8 lt = v < mn;
    mn = lt ? v : mn;
    idx = lt ? at : idx;
    nan |= v != v;
  }
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) any_nan |= nan[j] != 0;
  if (any_nan) return argmin(dist, K);
  int64_t best = idx[0];
  float bv = mn[0];
  for (int j = 1; j < 8; ++j)
    if (mn[j] < bv || (mn[j] == bv && idx[j] < best)) bv = mn[j], best = idx[j];
  return best;
}

// The distances of a row to one subspace's K centroids, from the codebook transposed to [d, Kp]
// (Kp = K rounded up to 8, padding 0; `vq_prepare`) and |c_k|^2 [Kp]: d vector multiply-adds per
// 8 centroids. encode's |c|^2 - 2 x . c, then torch.argmin's choice.
int64_t nearest(const float* x, const float* ct, const float* csq, int64_t K, int64_t Kp, int64_t d, float* dist) {
  for (int64_t k = 0; k < Kp; k += 8) {
    V8 dot = {};
    for (int64_t i = 0; i < d; ++i) dot += x[i] * v8(const_cast<float*>(ct + i * Kp + k));
    v8(dist + k) = v8(const_cast<float*>(csq + k)) - 2.f * dot;
  }
  return K % 8 ? argmin(dist, K) : argmin8(dist, K);
}

// Codes and errors of the new rows X [B, H, n, D] (float32, exactly as stored). Tasks: (head,
// chunk of that head's B * n rows); decode is one inline task per head.
template <typename C>
void encode_rows(const float* X, const float* cent, const float* ct, const float* csq, int64_t B, int64_t H, int64_t n,
                 int64_t S, int64_t K, int64_t d, C* codes_out, int64_t code_sbh, int64_t code_off, float* err_out,
                 int64_t err_sbh, int64_t err_off, const float* expected, bool actual) {
  const int64_t D = S * d, per_head = B * n, Kp = (K + 7) / 8 * 8;
  const int64_t chunk = std::max<int64_t>(16, (int64_t(1) << 20) / std::max<int64_t>(K * D, 1));
  const int64_t nchunk = (per_head + chunk - 1) / chunk;
  at::parallel_for(0, H * nchunk, nchunk > 1 ? 1 : H, [&](int64_t i0, int64_t i1) {
    std::vector<float> dist(Kp);
    for (int64_t task = i0; task < i1; ++task) {
      const int64_t h = task / nchunk, m0 = (task % nchunk) * chunk, m1 = std::min(per_head, m0 + chunk);
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t b = m / n, t = m % n, bh = b * H + h;
        const float* x = X + (bh * n + t) * D;
        float e2 = 0.f;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t hs = h * S + s;
          const int64_t k = nearest(x + s * d, ct + hs * d * Kp, csq + hs * Kp, K, Kp, d, dist.data());
          codes_out[bh * code_sbh + (code_off + t) * S + s] = static_cast<C>(k);
          if (actual) {
            const float* c = cent + (hs * K + k) * d;
            for (int64_t i = 0; i < d; ++i) {
              const float diff = x[s * d + i] - c[i];
              e2 += diff * diff;
            }
          }
        }
        err_out[bh * err_sbh + err_off + t] = actual ? std::sqrt(e2) : expected[h];
      }
    }
  });
}

}  // namespace

// The shared body of vq_append (functional) and vq_append_ (in place). Functional: `codes` is the
// side's [B, H, T, S], outputs are allocated. In place (`in_place`: codes, anchor rows, positions and
// scores are capacity buffers, Tc >= T + n and Ac >= the new anchor count, holding T tokens and A
// anchors in their first slots; they are also the outputs): the new codes are written at [T, T + n)
// of the codes buffer (nothing else of it is touched), and the flush changes only the anchor slots it must: a winning leaver takes
// the slot of an anchor that lost (or a new slot past A); a kept anchor keeps its slot (and its row),
// so slots are not in score order (the set of anchors is the reference's). Window, its errors and
// scores are fresh tensors in both (O(window) per step).
static std::tuple<std::vector<at::Tensor>, int64_t> write_side(
    const at::Tensor& codes, const at::Tensor& anchor_rows_in, const at::Tensor& anchor_pos_in,
    const at::Tensor& anchor_score_in, const at::Tensor& window_in, const at::Tensor& window_err_in,
    const at::Tensor& window_score_in, const at::Tensor& centroids_in, const at::Tensor& expected_err_in,
    const at::Tensor& basis_in, const at::Tensor& new_in, const at::Tensor& ct_in, const at::Tensor& csq_in, int64_t window,
    int64_t anchors, bool actual_error, bool in_place = false, int64_t T_in = -1, int64_t A_in = -1, int64_t Tw_in = -1,
    at::TensorList window_dst = {}) {
  TORCH_CHECK(codes.dim() == 4 && new_in.dim() == 4 && centroids_in.dim() == 4, "codes, new and centroids must be 4-d");
  const int64_t B = codes.size(0), H = codes.size(1), S = codes.size(3);
  const int64_t T = T_in >= 0 ? T_in : codes.size(2);  // in place: the buffers' filled lengths
  const int64_t K = centroids_in.size(2), d = centroids_in.size(3), D = S * d, n = new_in.size(2);
  const int64_t A = A_in >= 0 ? A_in : anchor_pos_in.size(2);
  // The window inputs hold Tw rows per (batch, head) at a stride of w_sbh rows (a static side's
  // window buffers: Tw_in filled of their capacity).
  const int64_t w_sbh = window_in.size(2), Tw = Tw_in >= 0 ? Tw_in : w_sbh;
  const at::ScalarType ct = codes.scalar_type(), et = window_in.scalar_type(), nt = new_in.scalar_type();
  auto is_float = [](at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; };
  TORCH_CHECK((ct == at::kByte && K <= 256) || (ct == at::kShort && K > 256 && K <= 32768),
              "codes must be uint8 for up to 256 centroids, int16 above");
  TORCH_CHECK(codes.stride(3) == 1 || S <= 1, "codes: subspace stride 1");
  TORCH_CHECK(codes.stride(2) == S || T <= 1, "codes: token stride S");
  TORCH_CHECK(is_float(et) && anchor_rows_in.scalar_type() == et && is_float(nt),
              "anchor rows and window in one of float32 / float16 / bfloat16, new rows too");
  TORCH_CHECK(anchor_pos_in.scalar_type() == at::kInt, "anchor positions must be int32");
  for (const auto* t : {&anchor_score_in, &window_err_in, &window_score_in, &centroids_in, &expected_err_in, &basis_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "scores, errors, centroids and basis must be float32");
  TORCH_CHECK(centroids_in.size(0) == H && centroids_in.size(1) == S && new_in.size(0) == B && new_in.size(1) == H &&
                  new_in.size(3) == D && window_in.size(3) == D && anchor_rows_in.size(3) == D &&
                  anchor_rows_in.size(2) >= A && anchor_score_in.size(2) == anchor_rows_in.size(2) &&
                  anchor_pos_in.size(2) == anchor_rows_in.size(2) && window_err_in.size(2) == w_sbh &&
                  window_score_in.size(2) == w_sbh && Tw <= w_sbh && Tw <= T && expected_err_in.numel() == H,
              "inconsistent cache shapes");
  const bool has_basis = basis_in.size(-1) != 0;
  TORCH_CHECK(!has_basis || (basis_in.dim() == 3 && basis_in.size(0) == H && basis_in.size(1) == D && basis_in.size(2) == D),
              "basis must be [H, D, D] or [H, 0, 0]");

  // In place the anchor inputs are the buffers themselves (slots [0, A) filled): stride = capacity.
  const auto arows = anchor_rows_in.contiguous(), apos = anchor_pos_in.contiguous(), ascore = anchor_score_in.contiguous();
  const int64_t ain = arows.size(2);
  const auto win = window_in.contiguous(), werr = window_err_in.contiguous(), wscore = window_score_in.contiguous();
  const auto cent = centroids_in.contiguous(), expected = expected_err_in.contiguous(), newc = new_in.contiguous();
  const auto basis = has_basis ? basis_in.contiguous() : basis_in;

  const int64_t n_leave = std::max<int64_t>(Tw - window, 0);
  const int64_t A_out = n_leave > 0 ? anchors : A, Tw_out = Tw - n_leave + n, C = A + n_leave;
  TORCH_CHECK(A_out >= 0 && A_out <= C, "anchor count after the flush out of range");
  const int64_t es = win.element_size(), row_bytes = D * es;

  auto f32 = codes.options().dtype(at::kFloat);
  at::Tensor codes_out, arows_out, apos_out, ascore_out;
  if (in_place) {
    codes_out = codes, arows_out = anchor_rows_in, apos_out = anchor_pos_in, ascore_out = anchor_score_in;
    TORCH_CHECK(codes_out.is_contiguous() && arows_out.is_contiguous() && apos_out.is_contiguous() && ascore_out.is_contiguous(),
                "in-place write: contiguous buffers");
    TORCH_CHECK(codes_out.size(0) == B && codes_out.size(1) == H && codes_out.size(3) == S && codes_out.size(2) >= T + n &&
                    arows_out.size(2) >= std::max(A, A_out) && apos_out.size(2) == arows_out.size(2) &&
                    ascore_out.size(2) == arows_out.size(2) && arows_out.scalar_type() == et,
                "in-place write: buffers too small or of another shape");
  } else {
    codes_out = at::empty({B, H, T + n, S}, codes.options());
    arows_out = at::empty({B, H, A_out, D}, win.options());
    apos_out = at::empty({B, H, A_out}, apos.options());
    ascore_out = at::empty({B, H, A_out}, f32);
  }
  // Per-(batch, head) strides of the outputs: the buffers' capacities in place.
  const int64_t code_sbh = in_place ? codes_out.size(2) * S : (T + n) * S;
  const int64_t a_sbh = in_place ? arows_out.size(2) : A_out;
  // The window outputs: fresh, or `window_dst` (window, errors, scores buffers, not the inputs) at a
  // stride of their capacity.
  at::Tensor win_out, werr_out, wscore_out;
  if (window_dst.empty()) {
    win_out = at::empty({B, H, Tw_out, D}, win.options());
    werr_out = at::empty({B, H, Tw_out}, f32);
    wscore_out = at::empty({B, H, Tw_out}, f32);
  } else {
    TORCH_CHECK(window_dst.size() == 3, "window outputs: window, errors, scores");
    win_out = window_dst[0], werr_out = window_dst[1], wscore_out = window_dst[2];
    const int64_t cap = win_out.size(2);
    TORCH_CHECK(win_out.is_contiguous() && werr_out.is_contiguous() && wscore_out.is_contiguous() && cap >= Tw_out &&
                    werr_out.size(2) == cap && wscore_out.size(2) == cap && win_out.scalar_type() == et &&
                    werr_out.scalar_type() == at::kFloat && wscore_out.scalar_type() == at::kFloat &&
                    win_out.numel() == B * H * cap * D && werr_out.numel() == B * H * cap,
                "window outputs: contiguous buffers of the window's dtype with room for the window");
  }
  const int64_t wo_sbh = win_out.size(2);

  // 1. Per (batch, head): old codes, the flush, what stays in the window.
  const int64_t cs = codes.element_size();
  const char* codes_p = static_cast<const char*>(codes.data_ptr());
  char* codes_o = static_cast<char*>(codes_out.data_ptr());
  const char* arows_p = static_cast<const char*>(arows.data_ptr());
  const char* win_p = static_cast<const char*>(win.data_ptr());
  char* arows_o = static_cast<char*>(arows_out.data_ptr());
  char* win_o = static_cast<char*>(win_out.data_ptr());
  const int32_t* apos_p = apos.data_ptr<int32_t>();
  int32_t* apos_o = apos_out.data_ptr<int32_t>();
  const float *ascore_p = ascore.data_ptr<float>(), *werr_p = werr.data_ptr<float>(), *wscore_p = wscore.data_ptr<float>();
  float *ascore_o = ascore_out.data_ptr<float>(), *werr_o = werr_out.data_ptr<float>(), *wscore_o = wscore_out.data_ptr<float>();
  int64_t nonfinite = 0;
  std::vector<std::pair<float, int64_t>> q(C);
  std::vector<float> buf(D);
  std::vector<char> won;
  std::vector<int64_t> free_slots;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    if (T > 0 && !in_place) {
      const char* src = codes_p + (b * codes.stride(0) + h * codes.stride(1)) * cs;
      std::memcpy(codes_o + bh * code_sbh * cs, src, T * S * cs);
    }
    const char* wrows = win_p + bh * w_sbh * row_bytes;
    if (n_leave == 0) {
      if (!in_place) {
        std::memcpy(arows_o + bh * A * row_bytes, arows_p + bh * ain * row_bytes, A * row_bytes);
        std::memcpy(apos_o + bh * A, apos_p + bh * ain, A * sizeof(int32_t));
        std::memcpy(ascore_o + bh * A, ascore_p + bh * ain, A * sizeof(float));
      }
    } else {
      for (int64_t j = 0; j < A; ++j) {
        const float s = ascore_p[bh * ain + j];
        q[j] = {std::isnan(s) ? -kInf : s, j};
      }
      for (int64_t j = 0; j < n_leave; ++j) {
        float s = wscore_p[bh * w_sbh + j];
        s = std::isnan(s) ? -kInf : s;
        if (!finite_row(wrows + j * row_bytes, et, D, buf.data())) s = kInf, ++nonfinite;
        q[A + j] = {s, A + j};
      }
      if (A_out != C) topk(q, A_out);
      auto put = [&](int64_t o, int64_t i) {  // winner q[i] into output slot o of this (b, h)
        const int64_t src = q[i].second;
        if (src < A) {
          std::memmove(arows_o + o * row_bytes, arows_p + (bh * ain + src) * row_bytes, row_bytes);
          apos_o[o] = apos_p[bh * ain + src];
        } else {
          std::memcpy(arows_o + o * row_bytes, wrows + (src - A) * row_bytes, row_bytes);
          apos_o[o] = static_cast<int32_t>(T - Tw + src - A);
        }
        ascore_o[o] = q[i].first;
      };
      if (!in_place) {
        for (int64_t i = 0; i < A_out; ++i) put(bh * a_sbh + i, i);
      } else {
        // Kept anchors stay in their slot (if it is below A_out); every other winner takes a free
        // slot below A_out: a loser's, one past A, or (the budget shrank after a crop) the slot of
        // a kept anchor that sat at or above A_out. The input anchors are the buffer's own slots.
        won.assign(A, 0);
        for (int64_t i = 0; i < A_out; ++i)
          if (q[i].second < A) won[q[i].second] = 1;
        free_slots.clear();
        for (int64_t j = 0; j < A_out; ++j)
          if (j >= A || !won[j]) free_slots.push_back(j);
        size_t next = 0;
        for (int64_t i = 0; i < A_out; ++i) {
          const int64_t src = q[i].second;
          if (src < A && src < A_out) {
            ascore_o[bh * a_sbh + src] = q[i].first;  // NaN scores are stored as the -inf they ranked as
            continue;
          }
          put(bh * a_sbh + free_slots[next++], i);
        }
      }
    }
    const int64_t stay = Tw - n_leave;
    std::memcpy(win_o + bh * wo_sbh * row_bytes, wrows + n_leave * row_bytes, stay * row_bytes);
    std::memcpy(werr_o + bh * wo_sbh, werr_p + bh * w_sbh + n_leave, stay * sizeof(float));
    std::memcpy(wscore_o + bh * wo_sbh, wscore_p + bh * w_sbh + n_leave, stay * sizeof(float));
    std::fill(wscore_o + bh * wo_sbh + stay, wscore_o + bh * wo_sbh + Tw_out, 0.f);
  }

  // 2. The new rows: basis map and rounding (stored to the window), then codes and errors.
  const int64_t rows = B * H * n;
  if (rows > 0) {
    const int64_t stay = Tw - n_leave;
    auto x_rows = at::empty({rows, D}, f32);
    float* X = x_rows.data_ptr<float>();
    const char* new_p = static_cast<const char*>(newc.data_ptr());
    const int64_t ns = newc.element_size();
    const float* basis_p = has_basis ? basis.data_ptr<float>() : nullptr;
    // Enough work per task to pay for waking a thread (decode runs inline on the caller).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(K * D + (has_basis ? D * D : 0), 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> in(D);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bh = r / n, t = r % n, h = bh % H;
        float* x = X + r * D;
        if (has_basis) {
          load_row(new_p + r * D * ns, nt, D, in.data());
          row_times(in.data(), basis_p + h * D * D, D, x);
          round_row(x, nt, D);
        } else {
          load_row(new_p + r * D * ns, nt, D, x);
        }
        round_row(x, et, D);
        store_row(win_o + (bh * wo_sbh + stay + t) * row_bytes, et, D, x);
      }
    });
    const int64_t Kp = (K + 7) / 8 * 8;
    TORCH_CHECK(ct_in.scalar_type() == at::kFloat && ct_in.is_contiguous() && ct_in.numel() == H * S * d * Kp &&
                    csq_in.scalar_type() == at::kFloat && csq_in.is_contiguous() && csq_in.numel() == H * S * Kp,
                "prepared codebook: vq_prepare(centroids)");
    const float *cent_p = cent.data_ptr<float>(), *ct_p = ct_in.data_ptr<float>(), *csq_p = csq_in.data_ptr<float>();
    if (ct == at::kByte)
      encode_rows<uint8_t>(X, cent_p, ct_p, csq_p, B, H, n, S, K, d, codes_out.data_ptr<uint8_t>(), code_sbh, T, werr_o,
                           wo_sbh, stay, expected.data_ptr<float>(), actual_error);
    else
      encode_rows<int16_t>(X, cent_p, ct_p, csq_p, B, H, n, S, K, d, codes_out.data_ptr<int16_t>(), code_sbh, T, werr_o,
                           wo_sbh, stay, expected.data_ptr<float>(), actual_error);
  }
  return {{codes_out, arows_out, apos_out, ascore_out, win_out, werr_out, wscore_out}, nonfinite};
}

// The state after state.append(side, new, settings) on CPU tensors (see the top of this file).
// codes [B, H, T, S] uint8 / int16 with unit subspace stride and token stride S; anchor rows
// [B, H, A, D] and window [B, H, Tw, D] in one float dtype; anchor_pos int32 [B, H, A]; scores and
// errors float32; centroids [H, S, K, d], expected_err [H], basis [H, D, D] or [H, 0, 0] float32;
// new [B, H, n, D] float32 / float16 / bfloat16. `window` is settings.window, `anchors` the anchor
// count after the flush (state.flush_lengths; unused without a flush). Returns the seven state
// tensors (state.STATE_FIELDS order) and the number of leaving rows with a NaN / Inf entry.
std::tuple<std::vector<at::Tensor>, int64_t> vq_append(
    const at::Tensor& codes, const at::Tensor& anchor_rows, const at::Tensor& anchor_pos, const at::Tensor& anchor_score,
    const at::Tensor& window, const at::Tensor& window_err, const at::Tensor& window_score, const at::Tensor& centroids,
    const at::Tensor& expected_err, const at::Tensor& basis, const at::Tensor& new_rows, const at::Tensor& ct,
    const at::Tensor& csq, int64_t window_setting, int64_t anchors, bool actual_error) {
  return write_side(codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, centroids, expected_err,
                    basis, new_rows, ct, csq, window_setting, anchors, actual_error);
}

// The same write in place into capacity buffers (contiguous): codes [B, H, Tc, S] holding T tokens,
// anchor rows / positions / scores [B, H, Ac, ...] holding A anchors in their first slots. Writes the
// new codes at [T, T + n) and the anchor slots the flush changes (see write_side); returns the new
// window, its errors and scores (fresh) and the non-finite count. The anchor count after the call is
// `anchors` if the window flushed (Tw > window), else A.
std::tuple<std::vector<at::Tensor>, int64_t> vq_append_(
    at::Tensor codes, at::Tensor anchor_rows, at::Tensor anchor_pos, at::Tensor anchor_score, int64_t T, int64_t A,
    const at::Tensor& window, const at::Tensor& window_err, const at::Tensor& window_score, const at::Tensor& centroids,
    const at::Tensor& expected_err, const at::Tensor& basis, const at::Tensor& new_rows, const at::Tensor& ct,
    const at::Tensor& csq, int64_t window_setting, int64_t anchors, bool actual_error) {
  TORCH_CHECK(T >= 0 && T <= codes.size(2) && A >= 0 && A <= anchor_pos.size(2), "in-place write: filled lengths out of range");
  auto out = write_side(codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, centroids,
                        expected_err, basis, new_rows, ct, csq, window_setting, anchors, actual_error, true, T, A);
  auto& t = std::get<0>(out);
  return {{t[4], t[5], t[6]}, std::get<1>(out)};
}

// The codebook as the encoder reads it: centroids [H, S, K, d] float32 -> (transposed [H, S, d, Kp],
// zero-padded to Kp = K rounded up to 8; |c_k|^2 [H, S, Kp], padding 0).
std::tuple<at::Tensor, at::Tensor> vq_prepare(const at::Tensor& centroids_in) {
  TORCH_CHECK(centroids_in.dim() == 4 && centroids_in.scalar_type() == at::kFloat, "centroids: float32 [H, S, K, d]");
  const auto cent = centroids_in.contiguous();
  const int64_t HS = cent.size(0) * cent.size(1), K = cent.size(2), d = cent.size(3), Kp = (K + 7) / 8 * 8;
  auto ct = at::zeros({cent.size(0), cent.size(1), d, Kp}, cent.options());
  auto csq = at::zeros({cent.size(0), cent.size(1), Kp}, cent.options());
  const float* c = cent.data_ptr<float>();
  float *t = ct.data_ptr<float>(), *q = csq.data_ptr<float>();
  for (int64_t hs = 0; hs < HS; ++hs) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < d; ++i) t[(hs * d + i) * Kp + k] = c[(hs * K + k) * d + i];
    for (int64_t i = 0; i < d; ++i)
      for (int64_t k = 0; k < Kp; ++k) q[hs * Kp + k] += t[(hs * d + i) * Kp + k] * t[(hs * d + i) * Kp + k];
  }
  return {ct, csq};
}

// A function of a codebook tensor, memoized per tensor, as ops/cpu/__init__.py `prepared` does for
// the Python callers: used only for the very tensor it was made from (weak reference; expired
// entries are dropped on the next insert) at the same version counter; inference tensors are not
// memoized. `tag` tells the functions apart.
template <typename F>
static std::vector<at::Tensor> memoized(int tag, const at::Tensor& t, F fn) {
  if (t.is_inference()) return fn(t);
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> ref;
    uint32_t version;
    std::vector<at::Tensor> value;
  };
  static std::mutex mu;
  static std::unordered_map<const c10::TensorImpl*, Entry> memo[2];
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const uint32_t version = t._version();
  std::lock_guard<std::mutex> lock(mu);
  auto& m = memo[tag];
  auto it = m.find(impl);
  if (it != m.end() && !it->second.ref.expired() && it->second.ref.lock().get() == impl && it->second.version == version)
    return it->second.value;
  for (auto e = m.begin(); e != m.end();) e = e->second.ref.expired() ? m.erase(e) : std::next(e);
  auto value = fn(t);
  m.insert_or_assign(impl, Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()), version, value});
  return value;
}

// The encoder's codebook (vq_prepare), memoized.
static std::vector<at::Tensor> prepared(const at::Tensor& centroids) {
  return memoized(0, centroids, [](const at::Tensor& c) {
    auto [ct, csq] = vq_prepare(c);
    return std::vector<at::Tensor>{ct, csq};
  });
}

// q [B, H, R, D] (contiguous float32) mapped into the key basis: q A^-T per head, A^-1 [H, D, D]
// read transposed (memoized) so the sum runs over contiguous rows; rounded to `dtype` as
// query_to_basis rounds (ops/__init__.py). Summed in ascending order in float32, so it may differ
// from the reference's BLAS matmul by a rounding.
static at::Tensor query_to_basis(const at::Tensor& q, const at::Tensor& basis_inv, at::ScalarType dtype) {
  const auto inv_t = memoized(1, basis_inv, [](const at::Tensor& a) {
    return std::vector<at::Tensor>{a.to(at::kFloat).transpose(-1, -2).contiguous()};
  })[0];
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  TORCH_CHECK(inv_t.size(0) == H && inv_t.size(1) == D && inv_t.size(2) == D, "key basis: [H, D, D]");
  auto out = at::empty_like(q);
  const float *x = q.data_ptr<float>(), *a = inv_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t r = 0; r < R; ++r) {
      float* orow = o + (bh * R + r) * D;
      row_times(x + (bh * R + r) * D, a + (bh % H) * D * D, D, orow);
      round_row(orow, dtype, D);
    }
  return out;
}

// Whether a [., ., ., capacity] mask (bool: keep; float: additive) lets a query see a column >= from:
// a loop over its strides, no tensor ops (a decode step's mask is one row).
static bool mask_leaks(const at::Tensor& m, int64_t from) {
  if (m.dim() != 4 || (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat)) {
    const auto rest = m.narrow(-1, from, m.size(-1) - from);
    return m.scalar_type() == at::kBool ? rest.any().item<bool>() : rest.ne(-std::numeric_limits<double>::infinity()).any().item<bool>();
  }
  const bool keep = m.scalar_type() == at::kBool;
  const char* base = static_cast<const char*>(m.data_ptr());
  const int64_t es = m.element_size();
  for (int64_t i = 0; i < m.size(0); ++i)
    for (int64_t j = 0; j < m.size(1); ++j)
      for (int64_t l = 0; l < m.size(2); ++l)
        for (int64_t t = from; t < m.size(3); ++t) {
          const char* e = base + (i * m.stride(0) + j * m.stride(1) + l * m.stride(2) + t * m.stride(3)) * es;
          if (keep ? *reinterpret_cast<const bool*>(e) : *reinterpret_cast<const float*>(e) != -kInf) return true;
        }
  return false;
}

// state.flush_lengths: (anchors, window) after appending n tokens to T tokens, A anchors, Tw window rows.
static std::pair<int64_t, int64_t> flush_lengths(int64_t T, int64_t A, int64_t Tw, int64_t n, int64_t window, double frac) {
  const int64_t n_leave = Tw - window;
  if (n_leave <= 0) return {A, Tw + n};
  return {std::min<int64_t>(static_cast<int64_t>(std::ceil(frac * static_cast<double>(T - Tw + n_leave))), A + n_leave),
          window + n};
}

// One call of a layer over a static compressed cache (antkv::static_attention_, ops/__init__.py, on
// CPU), in one C++ call: each side is its state.STATIC_BUFFERS (codes, anchor rows / positions / scores,
// window / errors / scores at fixed capacities, lengths int64 [3]: tokens, anchors, window rows) and its
// book (centroids, expected error, basis, basis^-1) with the encoder's prepared codebook (ct, csq).
// Writes the n new tokens at [T, T + n) (encode, codes in place), attends q over the T + n tokens (the
// call's tokens exact in the window), adds the window's Anchor Score, flushes the window down to
// `window` rows (anchor slots in place) and stores it back; updates the lengths. Returns (out [B, Hq, L,
// D] in q's dtype, the number of leaving rows with NaN / Inf entries).
std::tuple<at::Tensor, int64_t> vq_static_step(
    const at::Tensor& q, at::TensorList key, at::TensorList key_book, const at::Tensor& kct, const at::Tensor& kcsq,
    at::TensorList value, at::TensorList value_book, const at::Tensor& vct, const at::Tensor& vcsq, const at::Tensor& k_new,
    const at::Tensor& v_new, const at::Tensor& pos, const c10::optional<at::Tensor>& attn_mask, bool is_causal,
    c10::optional<double> scale, int64_t window, double anchor_frac, bool actual_error, int64_t chunk_tokens) {
  TORCH_CHECK(key.size() == 8 && value.size() == 8 && key_book.size() == 4 && value_book.size() == 4,
              "static step: 8 buffers and 4 book tensors per side");
  const at::Tensor &klen = key[7], &vlen = value[7];
  for (const auto* t : {&klen, &vlen})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == 3 && t->is_cpu(), "lengths: int64 [3]");
  int64_t* kl = klen.data_ptr<int64_t>();
  int64_t* vl = vlen.data_ptr<int64_t>();
  const int64_t T = kl[0], A = kl[1], Tw = kl[2], n = k_new.size(2), capacity = key[0].size(2);
  TORCH_CHECK(vl[0] == T && vl[2] == Tw && value[0].size(2) == capacity, "static step: key and value caches hold different tokens");
  TORCH_CHECK_VALUE(T + n <= capacity, "antkv static cache full: ", T, " tokens held + ", n, " new > max_cache_len ", capacity,
              "; make the cache larger");
  bool in_order = pos.numel() == n;
  if (in_order && pos.dim() == 1 && pos.scalar_type() == at::kLong) {  // the usual case, read in place
    const int64_t* p = pos.data_ptr<int64_t>();
    for (int64_t i = 0; in_order && i < n; ++i) in_order = p[i * pos.stride(0)] == T + i;
  } else if (in_order) {
    const auto p = pos.reshape({-1}).to(at::kLong).contiguous();
    for (int64_t i = 0; in_order && i < n; ++i) in_order = p.data_ptr<int64_t>()[i] == T + i;
  }
  TORCH_CHECK_VALUE(in_order, "antkv static cache: the ", n, " new tokens must be written at positions ", T, "..", T + n - 1,
              " (right after the ", T, " held, in order): a static compressed cache cannot overwrite or skip slots");
  c10::optional<at::Tensor> mask;
  if (attn_mask && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.size(-1) == capacity, "attn_mask must cover the cache's ", capacity, " slots");
    TORCH_CHECK_VALUE(!mask_leaks(m, T + n), "antkv static cache: attn_mask lets queries attend to the unfilled slots past ", T + n,
                      "; mask them out");
    mask = m.narrow(-1, 0, T + n);
  }
  int64_t nonfinite = 0;
  // 1. Encode the new tokens (no flush: the stored window holds at most `window` rows): codes in
  // place, the window (Tw + n rows) fresh.
  auto anchors_in = flush_lengths(T, A, Tw, n, window, anchor_frac).first;
  std::vector<at::Tensor> win[2];
  at::TensorList sides[2] = {key, value}, books[2] = {key_book, value_book};
  const at::Tensor* news[2] = {&k_new, &v_new};
  const at::Tensor *cts[2] = {&kct, &vct}, *csqs[2] = {&kcsq, &vcsq};
  for (int s = 0; s < 2; ++s) {
    RECORD_FUNCTION("antkv::static_write", std::vector<c10::IValue>());  // profiler ranges: speed.py's write share
    at::TensorList b = sides[s], bk = books[s];
    auto out = write_side(b[0], b[1], b[2], b[3], b[4], b[5], b[6], bk[0], bk[1], bk[2], *news[s], *cts[s], *csqs[s], window,
                          anchors_in, actual_error, true, T, A, Tw);
    win[s] = std::get<0>(out);
    nonfinite += std::get<1>(out);
  }
  const int64_t A1 = Tw > window ? anchors_in : A;
  // 2. Attention over T + n tokens, q in the key basis (query_to_basis, rounded to q's dtype as there).
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3), H = key[0].size(1), G = Hq / H;
  TORCH_CHECK(Hq % H == 0, Hq, " query heads do not share ", H, " kv heads");
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous(); };
  auto qg = f32(q.reshape({B, H, G * L, D}));
  const at::Tensor& kinv = key_book[3];
  if (kinv.size(-1) != 0) qg = query_to_basis(qg, kinv, q.scalar_type());
  // Anchor rows in float32 are read in their buffers (the first A1 slots); others converted.
  auto anchor_rows = [&](const at::Tensor& buf) { return buf.scalar_type() == at::kFloat ? buf : f32(buf.narrow(2, 0, A1)); };
  c10::optional<at::Tensor> mx;
  if (mask) {
    auto m = mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat ? *mask : mask->to(at::kFloat);
    mx = m.expand({B, Hq, L, T + n});
  }
  const double sc = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  auto att = vq_attention_filled(qg, T + n, key[0], f32(key_book[0]), anchor_rows(key[1]), key[2], A1, f32(win[0][4]), win[0][5],
                                 value[0], f32(value_book[0]), anchor_rows(value[1]), value[2], A1, f32(win[1][4]), win[1][5], mx,
                                 is_causal, sc, L, chunk_tokens);
  // 3. The window's Anchor Score, the flush down to `window` rows (anchor slots in place), written
  // into the window buffers.
  const auto [A2, Tw2] = flush_lengths(T + n, A1, Tw + n, 0, window, anchor_frac);
  for (int s = 0; s < 2; ++s) {
    RECORD_FUNCTION("antkv::static_flush", std::vector<c10::IValue>());
    at::TensorList b = sides[s], bk = books[s];
    win[s][6].add_(att[1]);
    auto out = write_side(b[0], b[1], b[2], b[3], win[s][4], win[s][5], win[s][6], bk[0], bk[1], bk[2], news[s]->narrow(2, 0, 0),
                          *cts[s], *csqs[s], window, A2, actual_error, true, T + n, A1, -1, {b[4], b[5], b[6]});
    nonfinite += std::get<1>(out);
  }
  for (int64_t* l : {kl, vl}) l[0] = T + n, l[1] = A2, l[2] = Tw2;
  return {att[0].view({B, Hq, L, D}).to(q.scalar_type()), nonfinite};
}

// What Python sets once the library is loaded (ops/cpu/__init__.py `extension`, where they are
// defined and measured): query rows per kv head the attention kernel takes (MAX_ROWS), shortest
// sequence chunk per thread (CHUNK_TOKENS).
static int64_t max_rows = 0, chunk_tokens = 0;

void vq_configure(int64_t rows, int64_t chunk) { max_rows = rows, chunk_tokens = chunk; }

static bool row_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Whether vq_static_step takes this call (ops/cpu/__init__.py `append_supported` and `supported`,
// asked of both sides): codes uint8 for up to 256 centroids (int16 above), exact rows and new rows in a
// row dtype, anchor positions int32, at most max_rows query rows per kv head, all on the CPU.
static bool static_supported(const at::Tensor& q, at::TensorList key, at::TensorList key_book, at::TensorList value,
                             at::TensorList value_book, const at::Tensor& k_new, const at::Tensor& v_new) {
  if (key.size() != 8 || value.size() != 8 || key_book.size() != 4 || value_book.size() != 4 || max_rows == 0) return false;
  const int64_t Hq = q.size(1), L = q.size(2), H = key[0].size(1);
  if (!q.is_cpu() || H == 0 || Hq % H != 0 || (Hq / H) * L > max_rows) return false;
  for (auto [b, bk, nw] : {std::make_tuple(key, key_book, &k_new), std::make_tuple(value, value_book, &v_new)}) {
    const auto codes = bk[0].size(2) <= 256 ? at::kByte : at::kShort;
    if (b[0].scalar_type() != codes || !row_dtype(b[4].scalar_type()) || b[1].scalar_type() != b[4].scalar_type() ||
        !row_dtype(nw->scalar_type()) || b[2].scalar_type() != at::kInt || !nw->is_cpu())
      return false;
  }
  return true;
}

// antkv::static_attention_'s CPU kernel (the op is declared in ops/__init__.py; registered below, so
// a compiled graph's call reaches C++ without a Python hop): vq_static_step with the prepared
// codebooks; any call it does not take goes to antkv::static_step_composed, the op's body in Python.
at::Tensor static_attention_cpu(const at::Tensor& q, at::TensorList key, at::TensorList key_book, at::TensorList value,
                                at::TensorList value_book, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& pos,
                                const c10::optional<at::Tensor>& attn_mask, bool is_causal, c10::optional<double> scale,
                                int64_t window, double anchor_frac, c10::string_view error,
                                c10::optional<at::ScalarType> exact_dtype) {
  if (!static_supported(q, key, key_book, value, value_book, k_new, v_new)) {
    static auto composed = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("antkv::static_step_composed", "")
                               .typed<decltype(static_attention_cpu)>();
    return composed.call(q, key, key_book, value, value_book, k_new, v_new, pos, attn_mask, is_causal, scale, window,
                         anchor_frac, error, exact_dtype);
  }
  const auto kp = prepared(key_book[0]), vp = prepared(value_book[0]);
  auto [out, nonfinite] = vq_static_step(q, key, key_book, kp[0], kp[1], value, value_book, vp[0], vp[1], k_new, v_new, pos, attn_mask,
                                         is_causal, scale, window, anchor_frac, error == "actual", chunk_tokens);
  if (nonfinite)  // the text of state.warn_nonfinite (the Python callers' warning)
    TORCH_WARN("antkv: ", nonfinite, " cache rows with NaN / Inf left the exact window: they stay exact as anchors (attention ",
               "output non-finite, as with a dense cache) while the anchor budget (", key[7].data_ptr<int64_t>()[1],
               " per head) allows, beyond it they are encoded to finite codes. Check the model's keys and values (overflow in float16?).");
  return out;
}

TORCH_LIBRARY_IMPL(antkv, CPU, m) { m.impl("static_attention_", &static_attention_cpu); }

// torch.ops.antkv_cpu.vq_append / vq_prepare (antkv::append's CPU kernel calls them); a fragment:
// attention.cpp defines the library.
TORCH_LIBRARY_FRAGMENT(antkv_cpu, m) {
  m.def("vq_configure", &vq_configure);
  m.def("vq_append", &vq_append);
  m.def("vq_append_(Tensor(a!) codes, Tensor(b!) anchor_rows, Tensor(c!) anchor_pos, Tensor(d!) anchor_score, int T, int A, "
        "Tensor window, Tensor window_err, Tensor window_score, Tensor centroids, Tensor expected_err, Tensor basis, "
        "Tensor new_rows, Tensor ct, Tensor csq, int window_setting, int anchors, bool actual_error) -> (Tensor[], int)",
        &vq_append_);
  m.def("vq_prepare", &vq_prepare);
  m.def("vq_static_step", &vq_static_step);
}
