// Native bf16 CPU kernels for Llama-family decoder layers (x86-64 with AMX-BF16).
//
// One call runs a whole decoder layer over the flattened rows of a forward (decode
// steps, draft verification, prefill chunks, many sequences): RMSNorm, fused QKV
// projection (+ bias), rotary embedding, K/V written into the bf16 paged pool,
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
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <new>
#include <vector>

typedef uint16_t bf16;

// 64-byte aligned scratch, for aligned vector loads and stores
template <typename T>
struct LineAligned {
  typedef T value_type;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

#if defined(__GNUC__) && !defined(__clang__)
#define NO_IPA __attribute__((noipa))  // no interprocedural specialization
#else
#define NO_IPA
#endif

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
// the same values (rounded to bf16) widened to fp32: logits as `linear(x).float()` gives them
static inline void store_rows(const float* c, const float* bias, float* y, int rows, int N) {
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < rows; r++) _mm512_storeu_ps(y + (size_t)r * N, round16(_mm512_add_ps(_mm512_load_ps(c + r * 16), bv)));
}

// x[M, K] @ W.T in tiles of 32 outputs x up to 32 rows, N % 32 == 0, K % 32 == 0, inside
// a parallel region: store(c, m0, n0, rows) takes each 16 x 16 fp32 tile c of outputs
// n0..n0+15 of rows m0..m0+rows-1 (row stride 16). Each output is the same sequence of
// tile multiply-adds over K whatever M is.
template <typename Store>
static void linear_tiles(const bf16* wp, const bf16* x, int M, int K, int N, Store&& store) {
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
      store(cbuf[0], m0, n0, ra);
      store(cbuf[1], m0, n0 + 16, ra);
      if (rb) {
        _tile_stored(2, cbuf[2], 64);
        _tile_stored(3, cbuf[3], 64);
        store(cbuf[2], m0 + 16, n0, rb);
        store(cbuf[3], m0 + 16, n0 + 16, rb);
      }
    }
  }
  if (used) _tile_release();  // other AMX users (oneDNN) configure their own tiles
}

// y[M, N] = x[M, K] @ W.T (+ bias) inside a parallel region; y is bf16, or fp32 holding
// the bf16-rounded values.
template <typename Out>
static void linear_omp(const bf16* wp, const float* bias, const bf16* x, Out* y, int M, int K, int N) {
  linear_tiles(wp, x, M, K, N, [&](const float* c, int m0, int n0, int rows) {
    store_rows(c, bias ? bias + n0 : nullptr, y + (size_t)m0 * N + n0, rows, N);
  });
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

extern "C" void ss_linear_f32(const bf16* wp, const float* bias, const bf16* x, float* y, int M, int K, int N) {
#pragma omp parallel
  linear_omp(wp, bias, x, y, M, K, N);
}

// The greedy token of each row: idx[m] = argmax over n of the logits ss_linear_f32 would
// write (bf16-rounded x[m] @ W.T), the first index among equal maxima, as torch's argmax,
// without writing the [M, N] logits or reading them back. Each thread keeps, per row, the
// best value and index of each of 16 lanes (lane j sees outputs n0 + j in increasing n0,
// so a strict > keeps the first of equal values); lanes and threads are then merged by
// value, ties to the lower index, which no order of merging changes. Returns 1 (idx
// untouched) when a logit is NaN: torch's argmax takes a NaN as the maximum, and the
// caller asks the full logits.
// (b, w) <- the better of itself and (v, i): the larger value, ties to the lower index; an
// index < 0 is no candidate
static inline void keep_better(float& b, int64_t& w, float v, int64_t i) {
  if (i >= 0 && (w < 0 || v > b || (v == b && i < w))) {
    b = v;
    w = i;
  }
}

extern "C" int ss_linear_argmax(const bf16* wp, const bf16* x, int64_t* idx, int M, int K, int N) {
  const int nt = omp_get_max_threads();
  std::vector<float> best((size_t)nt * M, -INFINITY);
  std::vector<int64_t> where((size_t)nt * M, -1);
  Buffer<float> lanes_best((size_t)nt * M * 16, -INFINITY);  // per thread, row and lane
  Buffer<int32_t> lanes_idx((size_t)nt * M * 16, -1);
  int has_nan = 0;
#pragma omp parallel reduction(| : has_nan)
  {
    const int t = omp_get_thread_num();
    float* lane_best = lanes_best.data() + (size_t)t * M * 16;
    int32_t* lane_idx = lanes_idx.data() + (size_t)t * M * 16;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 unordered = 0;
    linear_tiles(wp, x, M, K, N, [&](const float* c, int m0, int n0, int rows) {
      const __m512i cols = _mm512_add_epi32(iota, _mm512_set1_epi32(n0));
      for (int r = 0; r < rows; r++) {
        const __m512 v = round16(_mm512_load_ps(c + r * 16));
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        float* bv = lane_best + (size_t)(m0 + r) * 16;
        int32_t* bi = lane_idx + (size_t)(m0 + r) * 16;
        const __m512 old = _mm512_load_ps(bv);
        // strictly greater, or the lane's first value (a row of -inf still has an argmax)
        const __mmask16 take = _mm512_cmp_ps_mask(v, old, _CMP_GT_OQ) |
                               _mm512_cmpeq_epi32_mask(_mm512_load_si512(bi), _mm512_set1_epi32(-1));
        _mm512_store_ps(bv, _mm512_mask_mov_ps(old, take, v));
        _mm512_store_si512(bi, _mm512_mask_mov_epi32(_mm512_load_si512(bi), take, cols));
      }
    });
    has_nan |= unordered != 0;
    for (int m = 0; m < M; m++)
      for (int j = 0; j < 16; j++)
        keep_better(best[(size_t)t * M + m], where[(size_t)t * M + m], lane_best[(size_t)m * 16 + j],
                    lane_idx[(size_t)m * 16 + j]);
  }
  if (has_nan) return 1;
  for (int m = 0; m < M; m++) {
    float b = -INFINITY;
    int64_t w = -1;
    for (int t = 0; t < nt; t++) keep_better(b, w, best[(size_t)t * M + m], where[(size_t)t * M + m]);
    idx[m] = w;
  }
  return 0;
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

// y = rms_norm(x) * w over M rows, bf16 in and out, on the calling thread: a model's final
// norm over a few rows, where torch's op costs more in dispatch than in work
extern "C" void ss_rmsnorm(const bf16* x, const bf16* w, bf16* y, int M, int H, float eps) {
  for (int t = 0; t < M; t++) rmsnorm_row(x + (size_t)t * H, w, y + (size_t)t * H, H, eps);
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
// rotary on one head: fp32 math rounded to bf16, stored as fp32 (queries) or bf16 (keys)
static inline void rope_pair(const bf16* src, const float* c, const float* s, int i, int half, __m512& lo, __m512& hi) {
  const __m512 a = load16(src + i), b = load16(src + i + half);
  lo = _mm512_fmsub_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i)));
  hi = _mm512_fmadd_ps(b, _mm512_loadu_ps(c + i + half), _mm512_mul_ps(a, _mm512_loadu_ps(s + i + half)));
}
static void rope_head(const bf16* src, const float* c, const float* s, float* dst, int D) {
  const int half = D / 2;
  for (int i = 0; i < half; i += 16) {
    __m512 lo, hi;
    rope_pair(src, c, s, i, half, lo, hi);
    _mm512_storeu_ps(dst + i, round16(lo));
    _mm512_storeu_ps(dst + i + half, round16(hi));
  }
}
static void rope_head_bf16(const bf16* src, const float* c, const float* s, bf16* dst, int D) {
  const int half = D / 2;
  for (int i = 0; i < half; i += 16) {
    __m512 lo, hi;
    rope_pair(src, c, s, i, half, lo, hi);
    store16(dst + i, lo);
    store16(dst + i + half, hi);
  }
}

// ---------------------------------------------------------------- attention (AMX)
//
// A job is a block of up to 16 query lines (rows x the `group` query heads sharing a
// K/V head) of one sequence. Scores come from AMX tiles (K rows x Q^T, exact bf16
// inputs: q and k are bf16-rounded, and v is bf16), softmax runs in fp32, and the
// probabilities, split into bf16 hi + lo parts, multiply V (and a ones column for the
// denominator) in AMX tiles, one 32-key step at a time.
//
// Row invariance: a line's scores depend only on its q and the keys; its output is the
// same sequence of 32-key tile steps over the same values at the same positions whatever
// the block holds (tile lines are independent; an all-zero line or step adds exactly 0).
// Key j sits at position j for causal rows. A token-tree row sees the cached keys and its
// ancestors with other branches' keys in between: its P x V steps past the last full
// step of cached keys run over its own visible keys gathered in order, which puts every
// key where a chain of the same tokens has it, so the tree row equals the chain row.

// r[k] <- column k of the 16 x 16 matrix whose rows are r[0..15]
static inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
  }
}

// every tile 16 rows x 64 bytes: tmm0-3 P x V (16 dims each), tmm4 denominator or
// scores, tmm5-6 A operands (K rows, or P hi / lo), tmm7 B operands
static void configure_attention_tiles() {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

struct AttnScratch {
  std::vector<bf16> qt, kb, phi, plo, gphi, gplo, vb;
  std::vector<float> s;
  std::vector<int64_t> keys, gkeys;
  std::vector<int> vis;
  alignas(64) float ct[256];
  alignas(64) bf16 ones[512];
};

// One sequence's view of the pool: keys 0..total-1 at kidx[j] (or base + j).
struct SeqView {
  const bf16 *kh, *vh;
  int64_t base;
  const int64_t* kidx;
  int cs, total;
  const uint8_t* mask;  // [rows, total] or null (causal)
  inline int64_t at(int j) const { return kidx ? kidx[j] : base + j; }
};

// V rows keys[0..31] (pool indices, -1 = a zero row), dims d0..d0 + 16 nd, as nd VNNI B
// tiles [16][16][2] (tile i at vb + 512 i)
static void pack_v(const SeqView& sv, const int64_t* keys, int D, int d0, int nd, bf16* vb) {
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int kp = 0; kp < 16; kp++) {
    const bf16* v0 = keys[2 * kp] >= 0 ? sv.vh + keys[2 * kp] * D : nullptr;
    const bf16* v1 = keys[2 * kp + 1] >= 0 ? sv.vh + keys[2 * kp + 1] * D : nullptr;
    for (int dt = 0; dt < nd; dt++) {
      const int d = d0 + dt * 16;
      const __m256i a = v0 ? _mm256_loadu_si256((const __m256i*)(v0 + d)) : _mm256_setzero_si256();
      const __m256i b = v1 ? _mm256_loadu_si256((const __m256i*)(v1 + d)) : _mm256_setzero_si256();
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);  // a0..a15, b0..b15
      _mm512_storeu_si512(vb + (size_t)dt * 512 + kp * 32, _mm512_permutexvar_epi16(inter, ab));
    }
  }
}

// C (tiles 0..nd-1, and 4 when den) += P[:, cols] x V[keys] over 32-key steps.
static void pv_steps(const SeqView& sv, const bf16* phi, const bf16* plo, int pstride, const int64_t* keys, int nsteps,
                     int d0, int nd, bool den, const bf16* ones, int D, bf16* vb) {
  for (int st = 0; st < nsteps; st++) {
    _tile_loadd(5, phi + st * 32, pstride * 2);
    _tile_loadd(6, plo + st * 32, pstride * 2);
    if (den) {
      _tile_loadd(7, ones, 64);
      _tile_dpbf16ps(4, 5, 7);
      _tile_dpbf16ps(4, 6, 7);
    }
    pack_v(sv, keys + st * 32, D, d0, nd, vb);
    for (int i = 0; i < nd; i++) {
      _tile_loadd(7, vb + (size_t)i * 512, 64);
      switch (i) {  // tile numbers must be immediates
        case 0: _tile_dpbf16ps(0, 5, 7); _tile_dpbf16ps(0, 6, 7); break;
        case 1: _tile_dpbf16ps(1, 5, 7); _tile_dpbf16ps(1, 6, 7); break;
        case 2: _tile_dpbf16ps(2, 5, 7); _tile_dpbf16ps(2, 6, 7); break;
        default: _tile_dpbf16ps(3, 5, 7); _tile_dpbf16ps(3, 6, 7); break;
      }
    }
  }
}

// Rows r0..r0+nr-1 of a sequence (its rows start at forward row t0), K/V head g, for
// `group` query heads each: nl = nr * group <= 16 lines, line m = (row - r0) * group + h.
// NO_IPA: specialized for its one caller's thread-local scratch, the function would look
// the thread-local up again (a call that spills registers) at each use inside its loops
NO_IPA static void attend_block(const SeqView& sv, const float* qf, bf16* ao, int t0, int r0, int nr, int g, int group,
                         int Hq, int D, float scale, AttnScratch& w) {
  const int nl = nr * group;
  const bool causal = sv.mask == nullptr;
  const int kmax = causal ? sv.cs + r0 + nr : sv.total;  // keys any line of the block sees
  const int kpad = (kmax + 31) / 32 * 32;
  const __m512 ninf = _mm512_set1_ps(-INFINITY), svec = _mm512_set1_ps(scale);
  // Q^T as VNNI B tiles [D/32][16 d pairs][16 lines][2]; lines past nl are zero
  w.qt.assign((size_t)D * 16, 0);
  for (int m = 0; m < nl; m++) {
    const float* q = qf + ((size_t)(t0 + r0 + m / group) * Hq + g * group + m % group) * D;
    for (int d = 0; d < D; d++) {
      const float x = q[d];
      uint32_t u;
      memcpy(&u, &x, 4);
      w.qt[(size_t)(d / 32) * 512 + ((d % 32) / 2) * 32 + m * 2 + (d & 1)] = (bf16)(u >> 16);  // exact: q is bf16-rounded
    }
  }
  // scores s[m][j] for j < kmax, 16 keys per tile
  w.s.resize((size_t)16 * kpad);
  w.kb.resize((size_t)16 * D);
  float* s = w.s.data();
  for (int j0 = 0; j0 < kmax; j0 += 16) {
    const int n = kmax - j0 < 16 ? kmax - j0 : 16;
    const bf16* kt = w.kb.data();
    if (j0 + 16 < kmax) {  // the next tile's keys, while this one computes
      const int last = kmax - j0 - 16 < 16 ? kmax - j0 - 16 : 16;
      for (int i = 0; i < last; i++)
        for (int d = 0; d < D; d += 32) _mm_prefetch((const char*)(sv.kh + sv.at(j0 + 16 + i) * D + d), _MM_HINT_T0);
    }
    bool consecutive = n == 16;  // a block of the paged cache (16 tokens) is; check, blocks may be smaller
    for (int i = 1; consecutive && sv.kidx && i < 16; i++) consecutive = sv.kidx[j0 + i] == sv.kidx[j0] + i;
    if (consecutive) {
      kt = sv.kh + sv.at(j0) * D;  // 16 consecutive pool rows: the tile reads them in place
    } else {
      for (int i = 0; i < 16; i++) {
        bf16* dst = w.kb.data() + (size_t)i * D;
        if (i < n) memcpy(dst, sv.kh + sv.at(j0 + i) * D, (size_t)D * 2);
        else memset(dst, 0, (size_t)D * 2);
      }
    }
    _tile_zero(4);
    for (int d = 0; d < D; d += 32) {
      _tile_loadd(5, kt + d, D * 2);
      _tile_loadd(7, w.qt.data() + (size_t)(d / 32) * 512, 64);
      _tile_dpbf16ps(4, 5, 7);
    }
    _tile_stored(4, w.ct, 64);
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(w.ct + i * 16);
    transpose16(r);
    for (int m = 0; m < nl; m++) _mm512_storeu_ps(s + (size_t)m * kpad + j0, r[m]);
  }
  // softmax numerators per line (masked keys exactly 0), split into bf16 hi + lo
  w.phi.assign((size_t)16 * kpad, 0);
  w.plo.assign((size_t)16 * kpad, 0);
  for (int m = 0; m < nl; m++) {
    const int row = r0 + m / group;
    float* sc = s + (size_t)m * kpad;
    const int end = causal ? sv.cs + row + 1 : sv.total;
    const uint8_t* mrow = causal ? nullptr : sv.mask + (size_t)row * sv.total;
    for (int j = 0; j < end; j += 16) {
      const __mmask16 in = end - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - j)) - 1u);
      __mmask16 hide = 0;
      if (mrow && j + 16 > sv.cs) {
        const __m128i bytes = _mm_maskz_loadu_epi8(in, mrow + j);
        hide = _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_setzero_si512()) & in;
      }
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, sc + j), svec);
      _mm512_storeu_ps(sc + j, _mm512_mask_mov_ps(x, (__mmask16)(hide | (__mmask16)~in), ninf));
    }
    __m512 mx = ninf;
    for (int j = 0; j < end; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + j));
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    bf16* hi = w.phi.data() + (size_t)m * kpad;
    bf16* lo = w.plo.data() + (size_t)m * kpad;
    for (int j = 0; j < end; j += 16) {
      const __m512 x = _mm512_loadu_ps(sc + j);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, mv)));
      const __m512 h = round16(e);
      const __mmask16 in = end - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - j)) - 1u);
      _mm256_mask_storeu_epi16(hi + j, in, (__m256i)_mm512_cvtneps_pbh(h));
      _mm256_mask_storeu_epi16(lo + j, in, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(e, h)));
    }
  }
  // P x V: steps of 32 keys at their own positions; for token trees the steps past the
  // last full step of cached keys run per row over its visible keys gathered in order
  const int shared = causal ? kpad / 32 : sv.cs / 32;
  w.keys.resize((size_t)kpad + 32);
  for (int j = 0; j < shared * 32; j++) w.keys[j] = j < kmax ? sv.at(j) : -1;
  w.vb.resize((size_t)D * 32);
  alignas(64) float cbuf[5][256];
  float den[16];
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int nd = D - d0 < 64 ? (D - d0) / 16 : 4;
    const bool want_den = d0 == 0;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    pv_steps(sv, w.phi.data(), w.plo.data(), kpad, w.keys.data(), shared, d0, nd, want_den, w.ones, D, w.vb.data());
    if (!causal) {
      for (int rr = 0; rr < nr; rr++) {
        const int row = r0 + rr;
        const uint8_t* mrow = sv.mask + (size_t)row * sv.total;
        // visible keys past the shared steps, in order
        std::vector<int>& vis = w.vis;
        vis.clear();
        for (int j = shared * 32; j < sv.total; j++)
          if (j < sv.cs || mrow[j]) vis.push_back(j);
        const int len = (int)vis.size();
        const int steps = (len + 31) / 32;
        const int gstride = steps * 32;
        w.gphi.assign((size_t)16 * gstride, 0);
        w.gplo.assign((size_t)16 * gstride, 0);
        std::vector<int64_t>& gkeys = w.gkeys;
        gkeys.assign((size_t)gstride, -1);
        for (int i = 0; i < len; i++) gkeys[i] = sv.at(vis[i]);
        for (int h = 0; h < group; h++) {
          const int m = rr * group + h;
          for (int i = 0; i < len; i++) {
            w.gphi[(size_t)m * gstride + i] = w.phi[(size_t)m * kpad + vis[i]];
            w.gplo[(size_t)m * gstride + i] = w.plo[(size_t)m * kpad + vis[i]];
          }
        }
        pv_steps(sv, w.gphi.data(), w.gplo.data(), gstride, gkeys.data(), steps, d0, nd, want_den, w.ones, D,
                 w.vb.data());
      }
    }
    _tile_stored(0, cbuf[0], 64);
    _tile_stored(1, cbuf[1], 64);
    _tile_stored(2, cbuf[2], 64);
    _tile_stored(3, cbuf[3], 64);
    if (want_den) {
      _tile_stored(4, cbuf[4], 64);
      for (int m = 0; m < 16; m++) den[m] = cbuf[4][m * 16];
    }
    for (int m = 0; m < nl; m++) {
      const __m512 iv = _mm512_set1_ps(1.0f / den[m]);
      bf16* out = ao + (size_t)(t0 + r0 + m / group) * Hq * D + (size_t)(g * group + m % group) * D + d0;
      for (int i = 0; i < nd; i++) store16(out + i * 16, _mm512_mul_ps(_mm512_load_ps(cbuf[i] + m * 16), iv));
    }
  }
}

// ---------------------------------------------------------------- the layer

enum Weight { LN1, LN2, WQKV, BQKV, WO, WGU, WD, KCACHE, VCACHE, NUM_WEIGHTS };
enum Dim { HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, POOL, NUM_DIMS };

struct Job {
  int seq, r0, nr, head;
};

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
  bf16* kc = (bf16*)w[KCACHE];
  bf16* vc = (bf16*)w[VCACHE];

  // attention jobs: per sequence, blocks of 16 / group rows, per K/V head
  std::vector<Job> jobs;
  const int rows_per_job = 16 / group;
  for (int s = 0; s < nseq; s++)
    for (int r0 = 0; r0 < (int)(qs[s + 1] - qs[s]); r0 += rows_per_job) {
      const int left = (int)(qs[s + 1] - qs[s]) - r0;
      for (int g = 0; g < Hkv; g++) jobs.push_back(Job{s, r0, left < rows_per_job ? left : rows_per_job, g});
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
      for (int h = 0; h < Hq; h++) rope_head(row + h * D, c, s, qf + ((size_t)t * Hq + h) * D, D);
      for (int h = 0; h < Hkv; h++) {
        rope_head_bf16(row + (Hq + h) * D, c, s, kc + (h * P + widx[t]) * D, D);
        memcpy(vc + (h * P + widx[t]) * D, row + (Hq + Hkv + h) * D, (size_t)D * 2);
      }
    }
    // attention: blocks of up to 16 query lines (rows x the heads sharing a K/V head)
    bool tiles = false;
    static thread_local AttnScratch ws;
#pragma omp for schedule(dynamic, 1)
    for (size_t b = 0; b < jobs.size(); b++) {
      if (!tiles) {
        configure_attention_tiles();
        tiles = true;
      }
      if (ws.ones[0] == 0)
        for (int i = 0; i < 16; i++) ws.ones[i * 32] = ws.ones[i * 32 + 1] = 0x3F80;  // column 0 = 1.0
      const Job& jb = jobs[b];
      const int sq = jb.seq, rows = (int)(qs[sq + 1] - qs[sq]);
      const SeqView sv{kc + jb.head * P * D, vc + jb.head * P * D, base[sq], (const int64_t*)kidx[sq], (int)cs[sq],
                       (int)cs[sq] + rows, (const uint8_t*)masks[sq]};
      attend_block(sv, qf, ao, (int)qs[sq], jb.r0, jb.nr, jb.head, group, Hq, D, scale, ws);
    }
    if (tiles) _tile_release();
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
