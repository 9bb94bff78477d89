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

// 16 lanes: bf16 <-> fp32 (the narrowing rounds to nearest even, as torch does)
static inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline __m512 round16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

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

// torch's rms_norm on bf16: everything in fp32, rounded once (H % 16 == 0)
static void rmsnorm_row(const bf16* x, const bf16* w, bf16* out, int H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int i = 0; i < H; i += 16) {
    const __m512 v = load16(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
  for (int i = 0; i < H; i += 16) store16(out + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), r), load16(w + i)));
}

// x += h (bf16, rounded once)
static void residual_row(bf16* x, const bf16* h, int H) {
  for (int i = 0; i < H; i += 16) store16(x + i, _mm512_add_ps(load16(x + i), load16(h + i)));
}

// act = silu(gate) * up, each rounded to bf16 as the separate torch ops do
static void silu_mul_row(const bf16* gate, const bf16* up, bf16* act, int I) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < I; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(act + i, _mm512_mul_ps(round16(silu), load16(up + i)));
  }
}

// rotate-half rotary embedding of one head (D % 32 == 0), fp32 math rounded to bf16
static void rope_head(const bf16* src, const float* c, const float* s, float* dst, int D) {
  const int half = D / 2;
  for (int i = 0; i < half; i += 16) {
    const __m512 a = load16(src + i), b = load16(src + i + half);
    _mm512_storeu_ps(dst + i, round16(_mm512_fmsub_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i)))));
    _mm512_storeu_ps(dst + i + half, round16(_mm512_fmadd_ps(b, _mm512_loadu_ps(c + i + half),
                                                             _mm512_mul_ps(a, _mm512_loadu_ps(s + i + half)))));
  }
}

// ---------------------------------------------------------------- attention

// Sums of 16 vectors: lane j of the result = sum of the lanes of v[j] (a transpose-add tree).
static inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; i++)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; i++)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// q . k[i] for i < N (lanes N.. are 0), every lane reduced by the same tree
template <int N>
static inline __m512 key_dots(const float* q, const float* const* k, int D) {
  __m512 acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int i = 0; i < N; i++) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[i] + d), acc[i]);
  }
  return hsum16(acc);
}

static __m512 key_dots_tail(const float* q, const float* const* k, int n, int D) {
  switch (n) {
    case 1: return key_dots<1>(q, k, D);
    case 2: return key_dots<2>(q, k, D);
    case 3: return key_dots<3>(q, k, D);
    case 4: return key_dots<4>(q, k, D);
    case 5: return key_dots<5>(q, k, D);
    case 6: return key_dots<6>(q, k, D);
    case 7: return key_dots<7>(q, k, D);
    case 8: return key_dots<8>(q, k, D);
    case 9: return key_dots<9>(q, k, D);
    case 10: return key_dots<10>(q, k, D);
    case 11: return key_dots<11>(q, k, D);
    case 12: return key_dots<12>(q, k, D);
    case 13: return key_dots<13>(q, k, D);
    case 14: return key_dots<14>(q, k, D);
    default: return key_dots<15>(q, k, D);
  }
}

// One query row of `group` heads that share a K/V head, over keys [0, total) of its
// sequence (visible per `mask` row, or all of them); keys/values at pool indices
// kidx[j] (or base + j) of a [P, D] head slice. scores: group x (total + 16) floats.
// Each head's result is computed the same way whatever `group` is.
static void attend_group(const float* q, int group, const float* kh, const float* vh, int64_t base,
                         const int64_t* kidx, int total, const uint8_t* mask, int D, float scale, float* scores,
                         bf16* out) {
  const int stride = total + 16;
  const __m512 ninf = _mm512_set1_ps(-INFINITY), sv = _mm512_set1_ps(scale);
  // 16 keys at a time (the last block padded with zero sums): a key's score is the same
  // whichever block it falls in, so rows that see more or fewer keys agree exactly
  for (int j0 = 0; j0 < total; j0 += 16) {
    const int n = total - j0 < 16 ? total - j0 : 16;
    const __mmask16 in = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    const float* k[16];
    for (int i = 0; i < n; i++) k[i] = kh + (kidx ? kidx[j0 + i] : base + j0 + i) * D;
    __mmask16 hide = 0;
    if (mask) {
      const __m128i bytes = _mm_maskz_loadu_epi8(in, mask + j0);
      hide = _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_setzero_si512()) & in;
    }
    for (int g = 0; g < group; g++) {
      const __m512 dots = n == 16 ? key_dots<16>(q + g * D, k, D) : key_dots_tail(q + g * D, k, n, D);
      _mm512_mask_storeu_ps(scores + g * stride + j0, in, _mm512_mask_mov_ps(_mm512_mul_ps(dots, sv), hide, ninf));
    }
  }
  // softmax numerators per head; masked keys get exactly 0 (the clamped polynomial would give ~1e-38)
  for (int g = 0; g < group; g++) {
    float* sc = scores + g * stride;
    __m512 mx = ninf;
    int j = 0;
    for (; j + 16 <= total; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + j));
    float m = _mm512_reduce_max_ps(mx);
    for (; j < total; j++) m = sc[j] > m ? sc[j] : m;
    const __m512 mv = _mm512_set1_ps(m);
    for (j = 0; j < total; j += 16) {
      const __mmask16 in = total - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (total - j)) - 1u);
      const __m512 x = _mm512_mask_loadu_ps(ninf, in, sc + j);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, mv)));
      _mm512_mask_storeu_ps(sc + j, in, e);
    }
  }
  // out = sum_j p_j v_j / sum_j p_j per head, each V row loaded once for the group. Both
  // sums run over the keys in order, so masked keys (p = 0) anywhere leave them exact: a
  // token-tree row whose ancestors sit between other branches' keys agrees with the chain.
  const int nd = D / 16;
  for (int g0 = 0; g0 < group; g0 += 4) {
    const int gn = group - g0 < 4 ? group - g0 : 4;
    __m512 acc[4][16];
    float den[4] = {0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < gn; g++)
      for (int c = 0; c < nd; c++) acc[g][c] = _mm512_setzero_ps();
    for (int j = 0; j < total; j++) {
      const float* v = vh + (kidx ? kidx[j] : base + j) * D;
      __m512 pv[4];
      for (int g = 0; g < gn; g++) {
        const float p = scores[(g0 + g) * stride + j];
        den[g] += p;
        pv[g] = _mm512_set1_ps(p);
      }
      for (int c = 0; c < nd; c++) {
        const __m512 vv = _mm512_loadu_ps(v + c * 16);
        for (int g = 0; g < gn; g++) acc[g][c] = _mm512_fmadd_ps(pv[g], vv, acc[g][c]);
      }
    }
    for (int g = 0; g < gn; g++) {
      const __m512 iv = _mm512_set1_ps(1.0f / den[g]);
      for (int c = 0; c < nd; c++) store16(out + (size_t)(g0 + g) * D + c * 16, _mm512_mul_ps(acc[g][c], iv));
    }
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
  if (D % 32 != 0 || D > 256 || Hq / Hkv > 16 || H % 32 != 0 || I % 32 != 0 || Hq % Hkv != 0) return -1;
  const int NQKV = (Hq + 2 * Hkv) * D;
  const int group = Hq / Hkv;
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
        float* dst = h < Hq ? qf + ((size_t)t * Hq + h) * D : kc + ((h - Hq) * P + widx[t]) * D;
        rope_head(row + h * D, c, s, dst, D);
      }
      for (int h = 0; h < Hkv; h++) {
        const bf16* src = row + (Hq + Hkv + h) * D;
        float* dst = vc + (h * P + widx[t]) * D;
        for (int i = 0; i < D; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
      }
    }
    // attention: every (row, K/V head) on its own, with the query heads that share it
    static thread_local std::vector<float> scores;
    scores.resize((size_t)group * (max_total + 16));
#pragma omp for schedule(dynamic, 2)
    for (int job = 0; job < T * Hkv; job++) {
      const int t = job / Hkv, g = job % Hkv;
      int s = 0;
      while (qs[s + 1] <= t) s++;
      const int r = t - (int)qs[s];
      const int rows = (int)(qs[s + 1] - qs[s]);
      const int total = (int)cs[s] + rows;
      const uint8_t* m = (const uint8_t*)masks[s];
      const int visible = m ? total : (int)cs[s] + r + 1;
      attend_group(qf + ((size_t)t * Hq + g * group) * D, group, kc + g * P * D, vc + g * P * D, base[s],
                   (const int64_t*)kidx[s], visible, m ? m + (size_t)r * total : nullptr, D, scale, scores.data(),
                   ao + (size_t)t * Hq * D + (size_t)g * group * D);
    }
    linear_omp(wo, nullptr, ao, hb, T, Hq * D, H);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
      residual_row(x + (size_t)t * H, hb + (size_t)t * H, H);
      rmsnorm_row(x + (size_t)t * H, ln2, xn + (size_t)t * H, H, eps);
    }
    linear_omp(wgu, nullptr, xn, gu, T, H, 2 * I);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) silu_mul_row(gu + (size_t)t * 2 * I, gu + (size_t)t * 2 * I + I, act + (size_t)t * I, I);
    linear_omp(wd, nullptr, act, hb, T, I, H);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) residual_row(x + (size_t)t * H, hb + (size_t)t * H, H);
  }
  return 0;
}
