// Native bf16 CPU kernels for Llama-family decoder layers (x86-64 with AMX-BF16).
//
// One call runs a whole decoder layer over the flattened rows of a forward (decode
// steps, draft verification, prefill chunks, many sequences): RMSNorm, fused QKV
// projection (+ bias), rotary embedding, K/V written into the fp32 paged pool,
// attention of every row over its own sequence's cache (causal, or a boolean mask for
// token trees), output projection, residual, RMSNorm, fused gate/up projection,
// SiLU * up, down projection, residual. At decode sizes PyTorch spends more time
// dispatching ~25 small ops per layer than computing them; here they are loops over
// a few KB, and the matmuls are AMX tile multiply-adds.
//
// Every output row is computed by the same instructions in the same order whatever
// the other rows of the call are (row invariance): a token decoded alone, verified
// among drafts, prefilled in a chunk of any size or batched with other requests gets
// bit-identical results.
//
// Linear weights use the VNNI layout [N/16][K/2][16][2] (bf16), which is exactly an
// AMX B tile per 16 outputs x 32 inputs. Built at first use by specserve.model.native.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// round to nearest even, as torch does
static inline bf16 f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

// ---------------------------------------------------------------- linear (AMX)

struct TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: C tiles (2 row blocks x 2 column blocks of 16), tmm4-5: A (x rows), tmm6-7: B (weights)
static void configure_tiles(int rows_a, int rows_b) {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  const int rows[8] = {rows_a, rows_a, rows_b, rows_b, rows_a, rows_b, 16, 16};
  for (int i = 0; i < 8; i++) {
    c.rows[i] = (uint8_t)rows[i];
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

static inline void store_rows(const float* c, const float* bias, bf16* y, int rows, int N) {
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < rows; r++) {
    __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + r * 16), bv));
    _mm256_storeu_si256((__m256i*)(y + (size_t)r * N), (__m256i)v);
  }
}

// y[M, N] = x[M, K] @ W.T (+ bias), N % 32 == 0, K % 32 == 0, inside a parallel region.
// Each output is the same sequence of tile multiply-adds over K whatever M is.
static void linear_omp(const bf16* wp, const float* bias, const bf16* x, bf16* y, int M, int K, int N) {
  const int pairs = N / 32;
  alignas(64) float cbuf[4][256];
  int cur_a = -1, cur_b = -1;
  bool used = false;
#pragma omp for schedule(static)
  for (int g = 0; g < pairs; g++) {
    const bf16* b0 = wp + (size_t)(2 * g) * (K / 2) * 32;
    const bf16* b1 = b0 + (size_t)(K / 2) * 32;
    for (int m0 = 0; m0 < M; m0 += 32) {
      const int ra = M - m0 < 16 ? M - m0 : 16;
      const int rb = M - m0 - 16 >= 16 ? 16 : (M - m0 - 16 > 0 ? M - m0 - 16 : 0);
      if (ra != cur_a || rb != cur_b) {
        configure_tiles(ra, rb ? rb : 1);
        cur_a = ra;
        cur_b = rb;
        used = true;
      }
      const bf16* a0 = x + (size_t)m0 * K;
      const bf16* a1 = a0 + (size_t)16 * K;
      _tile_zero(0);
      _tile_zero(1);
      if (rb) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(4, a0 + k, K * 2);
        _tile_loadd(6, b0 + (size_t)k * 16, 64);
        _tile_loadd(7, b1 + (size_t)k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (rb) {
          _tile_loadd(5, a1 + k, K * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, cbuf[0], 64);
      _tile_stored(1, cbuf[1], 64);
      const int n0 = 32 * g;
      bf16* y0 = y + (size_t)m0 * N + n0;
      store_rows(cbuf[0], bias ? bias + n0 : nullptr, y0, ra, N);
      store_rows(cbuf[1], bias ? bias + n0 + 16 : nullptr, y0 + 16, ra, N);
      if (rb) {
        _tile_stored(2, cbuf[2], 64);
        _tile_stored(3, cbuf[3], 64);
        store_rows(cbuf[2], bias ? bias + n0 : nullptr, y0 + (size_t)16 * N, rb, N);
        store_rows(cbuf[3], bias ? bias + n0 + 16 : nullptr, y0 + (size_t)16 * N + 16, rb, N);
      }
    }
  }
  if (used) _tile_release();  // other AMX users (oneDNN) configure their own tiles
}

// The kernel may use AMX only after the process asked Linux for the tile state.
extern "C" int ss_init(void) {
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

extern "C" void ss_linear(const bf16* wp, const float* bias, const bf16* x, bf16* y, int M, int K, int N) {
#pragma omp parallel
  linear_omp(wp, bias, x, y, M, K, N);
}

// ---------------------------------------------------------------- elementwise

// torch's rms_norm on bf16: everything in fp32, rounded once
static void rmsnorm_row(const bf16* x, const bf16* w, bf16* out, int H, float eps) {
  float ss = 0.f;
  for (int i = 0; i < H; i++) {
    float v = bf2f(x[i]);
    ss += v * v;
  }
  const float r = 1.0f / sqrtf(ss / (float)H + eps);
  for (int i = 0; i < H; i++) out[i] = f2bf(bf2f(x[i]) * r * bf2f(w[i]));
}

// exp for softmax: Cephes-style range reduction + degree-6 polynomial (about 1 ulp)
static inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, c1, x);
  x = _mm512_fnmadd_ps(fx, c2, x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

// ---------------------------------------------------------------- attention

// One query row of one head over keys [0, total) of its sequence (visible per `mask`
// row, or all of them), keys/values at pool indices kidx[j] (or base + j) of a [P, D]
// head slice.
static void attend_row(const float* q, const float* kh, const float* vh, int64_t base, const int64_t* kidx, int total,
                       const uint8_t* mask, int D, float scale, float* scores, bf16* out) {
  float mx = -INFINITY;
  for (int j = 0; j < total; j++) {
    if (mask && !mask[j]) {
      scores[j] = -INFINITY;
      continue;
    }
    const float* k = kh + (kidx ? kidx[j] : base + j) * D;
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
    const float s = _mm512_reduce_add_ps(acc) * scale;
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  __m512 sum16 = _mm512_setzero_ps();
  const __m512 mxv = _mm512_set1_ps(mx);
  int j = 0;
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= total; j += 16) {
    const __m512 sv = _mm512_loadu_ps(scores + j);
    // masked keys get exactly 0 (the clamped polynomial would give ~1e-38)
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(sv, mxv)));
    _mm512_storeu_ps(scores + j, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  if (j < total) {
    const __mmask16 m = (__mmask16)((1u << (total - j)) - 1u);
    const __m512 sv = _mm512_mask_loadu_ps(ninf, m, scores + j);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(sv, mxv)));
    _mm512_mask_storeu_ps(scores + j, m, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum16);
  // D <= 256: accumulate in at most 16 registers
  __m512 acc[16];
  const int nd = D / 16;
  for (int c = 0; c < nd; c++) acc[c] = _mm512_setzero_ps();
  for (int t = 0; t < total; t++) {
    const float p = scores[t];
    if (p == 0.f) continue;  // masked (exp(-inf) = 0) or underflowed: adds nothing
    const __m512 pv = _mm512_set1_ps(p);
    const float* v = vh + (kidx ? kidx[t] : base + t) * D;
    for (int c = 0; c < nd; c++) acc[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + c * 16), acc[c]);
  }
  const __m512 iv = _mm512_set1_ps(inv);
  for (int c = 0; c < nd; c++) {
    __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], iv));
    _mm256_storeu_si256((__m256i*)(out + c * 16), (__m256i)r);
  }
}

// ---------------------------------------------------------------- the layer

enum Weight { LN1, LN2, WQKV, BQKV, WO, WGU, WD, KCACHE, VCACHE, NUM_WEIGHTS };
enum Dim { HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, POOL, NUM_DIMS };

struct Scratch {
  std::vector<bf16> xn, qkv, ao, h, gu, act;
  std::vector<float> q;
};

// x [T, H] bf16 is updated in place. Sequence s owns rows qs[s]..qs[s+1]-1; its cache
// entries 0..cs[s] + rows - 1 sit at pool indices kidx[s][j] (an int64 array), or
// base[s] + j where kidx[s] is 0. masks[s] is 0 (causal) or a [rows, cs[s] + rows]
// bool mask. pos [T] are rotary positions, widx [T] the pool index each row's K/V
// goes to, cos/sin [max_len, D] fp32 tables.
extern "C" int ss_layer(const int64_t* w, const int64_t* dims, float eps, float scale, bf16* x, int T, int nseq,
                        const int64_t* qs, const int64_t* cs, const int64_t* base, const int64_t* kidx,
                        const int64_t* masks, const int64_t* pos, const int64_t* widx, const float* cos_t,
                        const float* sin_t) {
  const int H = (int)dims[HIDDEN], Hq = (int)dims[HEADS], Hkv = (int)dims[KV_HEADS], D = (int)dims[HEAD_DIM];
  const int I = (int)dims[INTERMEDIATE];
  const int64_t P = dims[POOL];
  if (D % 32 != 0 || D > 256 || H % 32 != 0 || I % 32 != 0 || Hq % Hkv != 0) return -1;
  const int NQKV = (Hq + 2 * Hkv) * D;
  const int group = Hq / Hkv, half = D / 2;
  const bf16* ln1 = (const bf16*)w[LN1];
  const bf16* ln2 = (const bf16*)w[LN2];
  const bf16* wqkv = (const bf16*)w[WQKV];
  const float* bqkv = (const float*)w[BQKV];
  const bf16* wo = (const bf16*)w[WO];
  const bf16* wgu = (const bf16*)w[WGU];
  const bf16* wd = (const bf16*)w[WD];
  float* kc = (float*)w[KCACHE];
  float* vc = (float*)w[VCACHE];

  int max_total = 0;
  for (int s = 0; s < nseq; s++) {
    const int total = (int)(cs[s] + qs[s + 1] - qs[s]);
    max_total = total > max_total ? total : max_total;
  }
  static thread_local Scratch sc;
  sc.xn.resize((size_t)T * H);
  sc.qkv.resize((size_t)T * NQKV);
  sc.ao.resize((size_t)T * Hq * D);
  sc.h.resize((size_t)T * H);
  sc.gu.resize((size_t)T * 2 * I);
  sc.act.resize((size_t)T * I);
  sc.q.resize((size_t)T * Hq * D);
  bf16 *xn = sc.xn.data(), *qkv = sc.qkv.data(), *ao = sc.ao.data(), *hb = sc.h.data();
  bf16 *gu = sc.gu.data(), *act = sc.act.data();
  float* qf = sc.q.data();

#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rmsnorm_row(x + (size_t)t * H, ln1, xn + (size_t)t * H, H, eps);
    linear_omp(wqkv, bqkv, xn, qkv, T, H, NQKV);
    // rotary on q and k heads (fp32 math, rounded to bf16 as the projection's dtype), K/V into the pool
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
      const float* c = cos_t + pos[t] * D;
      const float* s = sin_t + pos[t] * D;
      const bf16* row = qkv + (size_t)t * NQKV;
      for (int h = 0; h < Hq + Hkv; h++) {
        const bf16* src = row + h * D;
        float* dst = h < Hq ? qf + ((size_t)t * Hq + h) * D : kc + ((h - Hq) * P + widx[t]) * D;
        for (int i = 0; i < half; i++) {
          const float a = bf2f(src[i]), b = bf2f(src[i + half]);
          dst[i] = round_bf(a * c[i] - b * s[i]);
          dst[i + half] = round_bf(b * c[i + half] + a * s[i + half]);
        }
      }
      for (int h = 0; h < Hkv; h++) {
        const bf16* src = row + (Hq + Hkv + h) * D;
        float* dst = vc + (h * P + widx[t]) * D;
        for (int i = 0; i < D; i++) dst[i] = bf2f(src[i]);
      }
    }
    // attention: every (row, head) on its own
    static thread_local std::vector<float> scores;
    scores.resize((size_t)max_total + 16);
#pragma omp for schedule(dynamic, 4)
    for (int job = 0; job < T * Hq; job++) {
      const int t = job / Hq, h = job % Hq;
      int s = 0;
      while (qs[s + 1] <= t) s++;
      const int r = t - (int)qs[s];
      const int rows = (int)(qs[s + 1] - qs[s]);
      const int total = (int)cs[s] + rows;
      const uint8_t* m = (const uint8_t*)masks[s];
      const int visible = m ? total : (int)cs[s] + r + 1;
      const int g = h / group;
      attend_row(qf + ((size_t)t * Hq + h) * D, kc + g * P * D, vc + g * P * D, base[s], (const int64_t*)kidx[s],
                 visible, m ? m + (size_t)r * total : nullptr, D, scale, scores.data(),
                 ao + (size_t)t * Hq * D + h * D);
    }
    linear_omp(wo, nullptr, ao, hb, T, Hq * D, H);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
      bf16* xr = x + (size_t)t * H;
      const bf16* hr = hb + (size_t)t * H;
      for (int i = 0; i < H; i++) xr[i] = f2bf(bf2f(xr[i]) + bf2f(hr[i]));
      rmsnorm_row(xr, ln2, xn + (size_t)t * H, H, eps);
    }
    linear_omp(wgu, nullptr, xn, gu, T, H, 2 * I);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
      const bf16* g = gu + (size_t)t * 2 * I;
      bf16* a = act + (size_t)t * I;
      for (int i = 0; i < I; i++) {
        const float v = bf2f(g[i]);
        a[i] = f2bf(round_bf(v / (1.0f + expf(-v))) * bf2f(g[I + i]));
      }
    }
    linear_omp(wd, nullptr, act, hb, T, I, H);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
      bf16* xr = x + (size_t)t * H;
      const bf16* hr = hb + (size_t)t * H;
      for (int i = 0; i < H; i++) xr[i] = f2bf(bf2f(xr[i]) + bf2f(hr[i]));
    }
  }
  return 0;
}
