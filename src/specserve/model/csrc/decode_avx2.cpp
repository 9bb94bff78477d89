// Native bf16 CPU kernels for Llama-family decoder layers (x86-64 with AVX2 and FMA,
// no AMX): the same entry points, weight layout and rounding points as decode.cpp, for
// the many CPUs without bf16 hardware.
//
// bf16 here is a storage format: weights, activations and the K/V pool hold bf16
// values, and every product of two bf16 values is exact in fp32, so a matmul is fp32
// fused multiply-adds over bf16 inputs widened by a shift, accumulated in fp32 (as the
// AMX tiles do; the order of the additions differs, so the two libraries agree to
// rounding, not bit for bit). Activations are rounded to bf16 where torch's bf16 ops
// round them.
//
// Row invariance, as in decode.cpp: every output row is computed by the same
// instructions in the same order whatever the other rows of the call are. A linear
// output accumulates its K products in order in one fp32 lane; an attention row visits
// its visible keys in order (the cached ones, then its own and its ancestors' for a
// token tree), so a tree row equals the chain row of the same tokens bit for bit.
//
// Linear weights use decode.cpp's layout [N/16][K/2][16][2] (bf16): per 16 outputs and
// 2 inputs, 64 bytes, which widen into the even and odd inputs of 8 outputs per register.

#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

typedef uint16_t bf16;

#if defined(__GNUC__) && !defined(__clang__)
#define NO_IPA __attribute__((noipa))  // no interprocedural specialization
#else
#define NO_IPA
#endif

// ---------------------------------------------------------------- bf16 <-> fp32

static inline __m256 load8(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
// fp32 -> bf16 bits in the high half of each lane, rounded to nearest even (as torch rounds)
static inline __m256i round_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN stays a (quiet) NaN
  return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}
static inline __m256 round8(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(round_bits(v), _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline void store8(bf16* p, __m256 v) {
  const __m256i h = _mm256_srli_epi32(round_bits(v), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}
// 8 lanes of bf16 pairs (element 2i in the low half of lane i, 2i+1 in the high half):
// the even elements and the odd ones as fp32
static inline __m256 even_dims(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
static inline __m256 odd_dims(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline float bf16_to_f32(bf16 b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// ---------------------------------------------------------------- linear

static inline void store_out(bf16* y, __m256 v) { store8(y, v); }
static inline void store_out(float* y, __m256 v) { _mm256_storeu_ps(y, round8(v)); }

// Weight elements (4 KB) ahead of its loads that a group's first tile prefetches. Zen 1's
// hardware prefetchers alone leave a 1-row linear at about 15 GB/s of the 18 the memory
// gives, and do worse while 3-4 rows keep the FMA units busy (docs/native.md).
static const int PFW = 2048;

// R rows (x fp32 holding bf16 values, row stride K) x 16 outputs of group g over input
// pairs p0..p1-1. Each p reads one 64-byte line of weights; STREAM (the group's first tile)
// prefetches PFW ahead, into the next group where this thread's range goes on (a prefetch
// past the end is harmless). The even inputs of p go to every row, then the odd ones: each
// accumulator still adds input 2p before 2p + 1, and only two widened weight registers are
// live besides the 2R accumulators (10% faster from 3 rows on than widening all four at
// once). The accumulators start at zero (p0 = 0) or from `carry` [R][16], and end in
// `carry` or, after the last pair, with the bias in y: a group taken in slices adds every
// product in the same order as in one go.
template <int R, bool STREAM, bool WHOLE, typename Out>
static inline void tile(const bf16* wg, int p0, int p1, float* carry, const float* bias, const float* x, Out* y,
                        int K, int N, int n0) {
  if (WHOLE) p0 = 0, p1 = K / 2;  // the whole group in one go (a constant range for the compiler)
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) {
    acc[r][0] = p0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(carry + r * 16);
    acc[r][1] = p0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(carry + r * 16 + 8);
  }
  for (int p = p0; p < p1; p++) {
    if (STREAM) _mm_prefetch((const char*)(wg + (size_t)p * 32 + PFW), _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)p * 32));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)p * 32 + 16));
    const __m256 w0e = even_dims(w0), w1e = even_dims(w1);
    for (int r = 0; r < R; r++) {
      const __m256 xe = _mm256_broadcast_ss(x + (size_t)r * K + 2 * p);
      acc[r][0] = _mm256_fmadd_ps(w0e, xe, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1e, xe, acc[r][1]);
    }
    const __m256 w0o = odd_dims(w0), w1o = odd_dims(w1);
    for (int r = 0; r < R; r++) {
      const __m256 xo = _mm256_broadcast_ss(x + (size_t)r * K + 2 * p + 1);
      acc[r][0] = _mm256_fmadd_ps(w0o, xo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1o, xo, acc[r][1]);
    }
  }
  if (!WHOLE && p1 < K / 2) {
    for (int r = 0; r < R; r++) {
      _mm256_storeu_ps(carry + r * 16, acc[r][0]);
      _mm256_storeu_ps(carry + r * 16 + 8, acc[r][1]);
    }
    return;
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; r++) {
    store_out(y + (size_t)r * N + n0, _mm256_add_ps(acc[r][0], b0));
    store_out(y + (size_t)r * N + n0 + 8, _mm256_add_ps(acc[r][1], b1));
  }
}

// the group's first tile streams its weights from memory; later ones find them in cache
template <int R, bool WHOLE, typename Out>
static inline void tile_rows(bool first, const bf16* wg, int p0, int p1, float* carry, const float* bias,
                             const float* x, Out* y, int K, int N, int n0) {
  if (first) tile<R, true, WHOLE>(wg, p0, p1, carry, bias, x, y, K, N, n0);
  else tile<R, false, WHOLE>(wg, p0, p1, carry, bias, x, y, K, N, n0);
}

// Rows in tiles of at most 4 run over a group one after another. With several tiles, the
// first streams the group from memory while the FMA units idle behind it, and the later
// ones compute from cache while memory idles. From 5 rows to fewer than SLICE_ROWS the
// group is taken in slices of SLICE_PAIRS input pairs instead, every tile over a slice
// before the next: memory streams the next slice while the later tiles compute, and each
// output's products are added in the same order as in one go. Measured on Zen 3
// (docs/native.md): the default model's linears 4-8% faster at 5-8 rows, its forwards of 5
// and 6 rows 9-13%; from 12 rows, where compute outweighs the stream, slices of 16-64 pairs
// gain nothing or lose up to 10%.
static const int SLICE_ROWS = 12;
static const int SLICE_PAIRS = 32;

// the rows m.. of group g over pairs p0..p1-1 (WHOLE: all of them), in tiles of at most 4
// rows of near-equal size (5 rows as 3 + 2, not 4 + 1: a 1-row tile widens the weights for 4 FMAs)
template <bool WHOLE, typename Out>
static inline void group_rows(const bf16* wg, int p0, int p1, float* carry, const float* bias, const float* x, Out* y,
                              int M, int K, int N, int n0) {
  for (int m = 0; m < M;) {
    const int left = M - m, tiles = (left + 3) / 4, r = (left + tiles - 1) / tiles;
    const float* xm = x + (size_t)m * K;
    float* cm = carry + (WHOLE ? 0 : m * 16);
    Out* ym = y + (size_t)m * N;
    switch (r) {
      case 4: tile_rows<4, WHOLE>(m == 0, wg, p0, p1, cm, bias, xm, ym, K, N, n0); break;
      case 3: tile_rows<3, WHOLE>(m == 0, wg, p0, p1, cm, bias, xm, ym, K, N, n0); break;
      case 2: tile_rows<2, WHOLE>(m == 0, wg, p0, p1, cm, bias, xm, ym, K, N, n0); break;
      default: tile_rows<1, WHOLE>(m == 0, wg, p0, p1, cm, bias, xm, ym, K, N, n0); break;
    }
    m += r;
  }
}

// the 16 outputs of group g for all M rows, each tile over all the inputs
template <typename Out>
static inline void linear_group(const bf16* wp, const float* bias, const float* x, Out* y, int M, int K, int N,
                                int g) {
  group_rows<true>(wp + (size_t)g * (K / 2) * 32, 0, K / 2, nullptr, bias, x, y, M, K, N, 16 * g);
}

// the same outputs with every tile over a slice of the inputs before the next slice
template <typename Out>
static inline void sliced_group(const bf16* wp, const float* bias, const float* x, Out* y, int M, int K, int N,
                                int g) {
  const bf16* wg = wp + (size_t)g * (K / 2) * 32;
  float carry[SLICE_ROWS * 16];
  for (int p0 = 0; p0 < K / 2; p0 += SLICE_PAIRS) {
    const int p1 = K / 2 - p0 < SLICE_PAIRS ? K / 2 : p0 + SLICE_PAIRS;
    group_rows<false>(wg, p0, p1, carry, bias, x, y, M, K, N, 16 * g);
  }
}

// linear_omp for fewer than WIDE_ROWS rows: every tile widens the weights it reads
template <typename Out>
static void narrow_linear_omp(const bf16* wp, const float* bias, const float* x, Out* y, int M, int K, int N) {
  if (M > 4 && M < SLICE_ROWS && K / 2 > SLICE_PAIRS) {
#pragma omp for schedule(static)
    for (int g = 0; g < N / 16; g++) sliced_group(wp, bias, x, y, M, K, N, g);
  } else {
#pragma omp for schedule(static)
    for (int g = 0; g < N / 16; g++) linear_group(wp, bias, x, y, M, K, N, g);
  }
}

static void widen_omp(const bf16* x, float* xf, size_t n) {
#pragma omp for schedule(static)
  for (size_t i = 0; i < n; i++) xf[i] = bf16_to_f32(x[i]);
}

// No tile state to ask for: this library needs nothing from the kernel.
extern "C" int ss_init(void) { return 0; }

// ---------------------------------------------------------------- linear, many rows
//
// A prompt chunk's M rows reuse every weight group M / 4 times, and the narrow tiles
// widen its bf16 pairs again in every one. From WIDE_ROWS rows on, a group is taken in
// near-equal slices of at most WIDE_PAIRS input pairs: a slice is widened once into fp32
// (per pair: the even inputs of the 16 outputs, then the odd ones; 36 KB at most) and
// every tile of rows runs over it, its accumulators kept in fp32 between the slices.
// The products and the order of the additions are the narrow tiles' (input 2p, then
// 2p + 1, into one fp32 lane per output), so every output is bit-identical to theirs.
// Measured on Zen 1 (docs/native.md): prompt chunks of 64-256 rows 7-10% faster; break-
// even near 28 rows; slices of 64 or 768 pairs, or 6-row tiles, gain less.
static const int WIDE_ROWS = 32;
// where the wide path starts: WIDE_ROWS, or never (INT_MAX). The choice changes no output
// (both paths compute every output alike), only the speed: on Zen 1 the wide path is 7-10%
// faster for prompt chunks, on Zen 3 the narrow tiles are 20-50% faster (docs/native.md).
// native.py times both at load and sets the faster (ss_set_wide_rows).
static int wide_rows = WIDE_ROWS;
extern "C" void ss_set_wide_rows(int rows) { wide_rows = rows > 0 ? rows : INT_MAX; }
extern "C" int ss_wide_rows(void) { return wide_rows == INT_MAX ? 0 : wide_rows; }
static const int WIDE_PAIRS = 288;
static const int WIDE_TILE = 4;

static void widen_pairs(const bf16* wg, float* wf, int pairs) {
  for (int p = 0; p < pairs; p++) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)p * 32));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)p * 32 + 16));
    float* d = wf + (size_t)p * 32;
    _mm256_storeu_ps(d, even_dims(w0));
    _mm256_storeu_ps(d + 8, even_dims(w1));
    _mm256_storeu_ps(d + 16, odd_dims(w0));
    _mm256_storeu_ps(d + 24, odd_dims(w1));
  }
}

// R rows (x at the slice's first input, row stride K) over `pairs` widened pairs; the
// accumulators start at zero (first slice) or from `part` [R][16], and end in `part` or,
// after the last slice, with the bias in y
template <int R, typename Out>
static inline void wide_tile(const float* wf, int pairs, const float* x, int K, float* part, bool first, bool last,
                             const float* bias, Out* y, int N, int n0) {
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(part + r * 16);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(part + r * 16 + 8);
  }
  for (int p = 0; p < pairs; p++) {
    const float* w = wf + (size_t)p * 32;
    const __m256 we0 = _mm256_loadu_ps(w), we1 = _mm256_loadu_ps(w + 8);
    for (int r = 0; r < R; r++) {
      const __m256 xe = _mm256_broadcast_ss(x + (size_t)r * K + 2 * p);
      acc[r][0] = _mm256_fmadd_ps(we0, xe, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(we1, xe, acc[r][1]);
    }
    const __m256 wo0 = _mm256_loadu_ps(w + 16), wo1 = _mm256_loadu_ps(w + 24);
    for (int r = 0; r < R; r++) {
      const __m256 xo = _mm256_broadcast_ss(x + (size_t)r * K + 2 * p + 1);
      acc[r][0] = _mm256_fmadd_ps(wo0, xo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(wo1, xo, acc[r][1]);
    }
  }
  if (!last) {
    for (int r = 0; r < R; r++) {
      _mm256_storeu_ps(part + r * 16, acc[r][0]);
      _mm256_storeu_ps(part + r * 16 + 8, acc[r][1]);
    }
    return;
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; r++) {
    store_out(y + (size_t)r * N + n0, _mm256_add_ps(acc[r][0], b0));
    store_out(y + (size_t)r * N + n0 + 8, _mm256_add_ps(acc[r][1], b1));
  }
}

template <typename Out>
NO_IPA static void wide_linear_omp(const bf16* wp, const float* bias, const float* x, Out* y, int M, int K, int N) {
  static thread_local std::vector<float> wbuf, pbuf;
  wbuf.resize((size_t)WIDE_PAIRS * 32);
  pbuf.resize((size_t)M * 16);
  float* wf = wbuf.data();
  float* part = pbuf.data();
  const int slices = (K / 2 + WIDE_PAIRS - 1) / WIDE_PAIRS, slice = (K / 2 + slices - 1) / slices;  // near-equal
#pragma omp for schedule(static)
  for (int g = 0; g < N / 16; g++) {
    const bf16* wg = wp + (size_t)g * (K / 2) * 32;
    for (int p0 = 0; p0 < K / 2; p0 += slice) {
      const int pairs = K / 2 - p0 < slice ? K / 2 - p0 : slice;
      const bool first = p0 == 0, last = p0 + pairs == K / 2;
      widen_pairs(wg + (size_t)p0 * 32, wf, pairs);
      for (int m = 0; m < M;) {
        const int r = M - m < WIDE_TILE ? M - m : WIDE_TILE;
        const float* xm = x + (size_t)m * K + 2 * p0;
        float* pm = part + (size_t)m * 16;
        Out* ym = y + (size_t)m * N;
        switch (r) {
          case 4: wide_tile<4>(wf, pairs, xm, K, pm, first, last, bias, ym, N, 16 * g); break;
          case 3: wide_tile<3>(wf, pairs, xm, K, pm, first, last, bias, ym, N, 16 * g); break;
          case 2: wide_tile<2>(wf, pairs, xm, K, pm, first, last, bias, ym, N, 16 * g); break;
          default: wide_tile<1>(wf, pairs, xm, K, pm, first, last, bias, ym, N, 16 * g); break;
        }
        m += r;
      }
    }
  }
}

// y[M, N] = x[M, K] @ W.T (+ bias) inside a parallel region, x fp32 (bf16 values);
// y is bf16, or fp32 holding the bf16-rounded values. N % 16 == 0, K % 2 == 0.
template <typename Out>
static void linear_omp(const bf16* wp, const float* bias, const float* x, Out* y, int M, int K, int N) {
  if (M >= wide_rows) wide_linear_omp(wp, bias, x, y, M, K, N);
  else narrow_linear_omp(wp, bias, x, y, M, K, N);
}

template <typename Out>
static void linear_call(const bf16* wp, const float* bias, const bf16* x, Out* y, int M, int K, int N) {
  static thread_local std::vector<float> xf;
  xf.resize((size_t)M * K);
  float* xp = xf.data();
#pragma omp parallel
  {
    widen_omp(x, xp, (size_t)M * K);
    linear_omp(wp, bias, xp, y, M, K, N);
  }
}

extern "C" void ss_linear(const bf16* wp, const float* bias, const bf16* x, bf16* y, int M, int K, int N) {
  linear_call(wp, bias, x, y, M, K, N);
}

extern "C" void ss_linear_f32(const bf16* wp, const float* bias, const bf16* x, float* y, int M, int K, int N) {
  linear_call(wp, bias, x, y, M, K, N);
}

// ---------------------------------------------------------------- screened greedy LM head
//
// Greedy decoding needs the argmax of each logits row, not the row. ss_screen reads an
// int8 copy of the LM head (half the bytes of the bf16 one, which a decode step streams
// from memory) and bounds every logit: with w = sw * qw + ew (per vocabulary row, int8
// qw) and x = sh * qx + ex (per input row, int16 qx), the bf16 kernel's logit v of row
// (r, o) satisfies |v - a| <= E, a = sw * sh * (qw . qx) (exact in int32), E = (||sw qw||
// ||ex|| + (||ew|| + gamma ||w||) ||x||) (1 + 2^-8) + |a| (2^-8 + 4e-7), all times 1.01
// (Cauchy-Schwarz on the quantization errors; gamma covers the fp32 accumulation, 2^-8
// the rounding to bf16, 4e-7 the scaling of a; 2^-120 the roundings of tiny values, with
// weights and inputs within 2^-40..2^40 in magnitude, else the full head runs). Outputs
// whose a + E reaches the largest
// a - E of their row are the candidates: every other logit lies strictly below the
// row's maximum. The caller computes the candidates' logits exactly (the bf16 kernel on
// their 16-output groups), so the argmax and its ties are the full head's.
//
// wq: [N/16][K/2][16][2] int8 (the bf16 layout); sw, cw (||sw qw||), dw (||ew|| + gamma
// ||w||): [N] fp32. wp: the bf16 head (vnni_pack). x: [M, K] bf16. hi: [M, N] and glo:
// [M, N/16] scratch; cand: [M, cap] candidate indices, ncand: [M]. y: [M, N] the bf16
// head's logits for every group holding a candidate of some row, -inf elsewhere.
// Returns how many groups it computed, or -1 when an input row is not finite or a row
// has more than `cap` candidates (y untouched: the caller runs the full head).

template <int R, bool STREAM>
static inline void screen_tile(const int8_t* wg, const int16_t* xq, int K, __m256i acc[][2]) {
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int p = 0; p < K / 2; p++) {
    if (STREAM && !(p & 1)) _mm_prefetch((const char*)(wg + (size_t)p * 32 + 2 * PFW), _MM_HINT_T0);
    const __m256i w = _mm256_loadu_si256((const __m256i*)(wg + (size_t)p * 32));
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));       // outputs 0-7, 2 inputs each
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));  // outputs 8-15
    for (int r = 0; r < R; r++) {
      int32_t pair;
      memcpy(&pair, xq + (size_t)r * K + 2 * p, 4);
      const __m256i xp = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, xp));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, xp));
    }
  }
}

// a, E -> hi = a + E (stored) and the group's largest a - E, for R rows of one group
template <int R>
static inline void screen_bounds(__m256i acc[][2], const float* sw, const float* cw, const float* dw,
                                 const float* sh, const float* neh, const float* nx, float* hi, float* glo, int N,
                                 int NG, int g) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 rel = _mm256_set1_ps(0.00390625f + 4e-7f), grow = _mm256_set1_ps(1.00390625f);
  const __m256 safety = _mm256_set1_ps(1.01f), tiny = _mm256_set1_ps(0x1p-120f);
  for (int r = 0; r < R; r++) {
    __m256 lo = _mm256_set1_ps(-INFINITY);
    for (int h = 0; h < 2; h++) {
      const int o = 16 * g + 8 * h;
      const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(sw + o), _mm256_set1_ps(sh[r]));
      const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), s);
      __m256 e = _mm256_fmadd_ps(_mm256_loadu_ps(cw + o), _mm256_set1_ps(neh[r]),
                                 _mm256_mul_ps(_mm256_loadu_ps(dw + o), _mm256_set1_ps(nx[r])));
      e = _mm256_fmadd_ps(_mm256_andnot_ps(sign, a), rel, _mm256_fmadd_ps(e, grow, tiny));
      e = _mm256_mul_ps(e, safety);
      _mm256_storeu_ps(hi + (size_t)r * N + o, _mm256_add_ps(a, e));
      lo = _mm256_max_ps(lo, _mm256_sub_ps(a, e));
    }
    const __m128 l4 = _mm_max_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
    const __m128 l2 = _mm_max_ps(l4, _mm_movehl_ps(l4, l4));
    glo[(size_t)r * NG + g] = _mm_cvtss_f32(_mm_max_ss(l2, _mm_shuffle_ps(l2, l2, 1)));
  }
}

template <int R>
static inline void screen_rows(bool first, const int8_t* wg, const int16_t* xq, const float* sw, const float* cw,
                               const float* dw, const float* sh, const float* neh, const float* nx, float* hi,
                               float* glo, int K, int N, int g) {
  __m256i acc[R][2];
  if (first) screen_tile<R, true>(wg, xq, K, acc);
  else screen_tile<R, false>(wg, xq, K, acc);
  screen_bounds<R>(acc, sw, cw, dw, sh, neh, nx, hi, glo, N, N / 16, g);
}

extern "C" int ss_screen(const int8_t* wq, const float* sw, const float* cw, const float* dw, const bf16* wp,
                         const bf16* x, int M, int K, int N, float* hi, float* glo, int32_t* cand, int32_t* ncand,
                         int cap, float* y) {
  // the int16 inputs: |qw . qx| <= 127 * qmax * K stays inside int32
  const double qmax = fmin(32767.0, floor(2147483647.0 / (127.0 * K)) - 1.0);
  std::vector<int16_t> xq((size_t)M * K);
  std::vector<float> sh(M), neh(M), nx(M);
  for (int r = 0; r < M; r++) {
    const bf16* xr = x + (size_t)r * K;
    double amax = 0.0, sx = 0.0;
    for (int k = 0; k < K; k++) {
      const double v = bf16_to_f32(xr[k]);
      amax = fmax(amax, fabs(v));
      sx += v * v;
    }
    // inf or NaN; or magnitudes where fp32 would underflow or overflow (the bound covers
    // roundings relative to the values, plus 2^-120 absolute; weights are checked at load)
    if (!(sx < INFINITY) || (amax > 0.0 && (amax < 0x1p-40 || amax > 0x1p40))) return -1;
    const float s = amax > 0.0 ? (float)(amax / qmax) : 1.0f;
    double se = 0.0;
    for (int k = 0; k < K; k++) {
      const double v = bf16_to_f32(xr[k]);
      const double q = fmin(qmax, fmax(-qmax, nearbyint(v / s)));
      xq[(size_t)r * K + k] = (int16_t)q;
      se += (v - (double)s * q) * (v - (double)s * q);
    }
    sh[r] = s;
    neh[r] = (float)(sqrt(se) * (1.0 + 1e-6));
    nx[r] = (float)(sqrt(sx) * (1.0 + 1e-6));
  }
  const int NG = N / 16;
  int status = 0;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int g = 0; g < NG; g++) {
      const int8_t* wg = wq + (size_t)g * (K / 2) * 32;
      int m = 0;
      for (; m + 4 <= M; m += 4)
        screen_rows<4>(m == 0, wg, xq.data() + (size_t)m * K, sw, cw, dw, &sh[m], &neh[m], &nx[m],
                       hi + (size_t)m * N, glo + (size_t)m * NG, K, N, g);
      switch (M - m) {
        case 3: screen_rows<3>(m == 0, wg, xq.data() + (size_t)m * K, sw, cw, dw, &sh[m], &neh[m], &nx[m],
                               hi + (size_t)m * N, glo + (size_t)m * NG, K, N, g); break;
        case 2: screen_rows<2>(m == 0, wg, xq.data() + (size_t)m * K, sw, cw, dw, &sh[m], &neh[m], &nx[m],
                               hi + (size_t)m * N, glo + (size_t)m * NG, K, N, g); break;
        case 1: screen_rows<1>(m == 0, wg, xq.data() + (size_t)m * K, sw, cw, dw, &sh[m], &neh[m], &nx[m],
                               hi + (size_t)m * N, glo + (size_t)m * NG, K, N, g); break;
        default: break;
      }
    }
#pragma omp for schedule(static)
    for (int r = 0; r < M; r++) {
      float bar = -INFINITY;
      for (int g = 0; g < NG; g++) bar = fmaxf(bar, glo[(size_t)r * NG + g]);
      const float* h = hi + (size_t)r * N;
      int n = 0;
      for (int o = 0; o < N; o++) {
        if (h[o] >= bar) {
          if (n < cap) cand[(size_t)r * cap + n] = o;
          n++;
        }
      }
      ncand[r] = n;
      if (n > cap) {
#pragma omp atomic write
        status = -1;
      }
    }
  }
  if (status != 0) return status;
  // the candidates' groups exactly, by the bf16 head's own tiles; -inf elsewhere
  std::vector<char> marked(NG, 0);
  for (int r = 0; r < M; r++)
    for (int i = 0; i < ncand[r]; i++) marked[cand[(size_t)r * cap + i] / 16] = 1;
  std::vector<float> xf((size_t)M * K);
  widen_omp(x, xf.data(), xf.size());  // outside a parallel region: on this thread
  for (size_t i = 0; i < (size_t)M * N; i++) y[i] = -INFINITY;
  int groups = 0;
  for (int g = 0; g < NG; g++) {
    if (!marked[g]) continue;
    groups++;
    linear_group(wp, nullptr, xf.data(), y, M, K, N, g);  // what ss_linear_f32 computes for the group
  }
  return groups;
}

// ---------------------------------------------------------------- elementwise

// exp: Cephes-style range reduction + degree-6 polynomial (about 1 ulp), as decode.cpp's
static inline __m256 exp256(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, c1, x);
  x = _mm256_fnmadd_ps(fx, c2, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// torch's rms_norm on bf16: everything in fp32, rounded once (H % 8 == 0); out is bf16, or
// fp32 holding the rounded values (the next matmul's input)
template <typename Out>
static void rmsnorm_row(const bf16* x, const bf16* w, Out* out, int H, float eps) {
  __m256 ss = _mm256_setzero_ps();
  for (int i = 0; i < H; i += 8) {
    const __m256 v = load8(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum8(ss) / (float)H + eps));
  for (int i = 0; i < H; i += 8) store_out(out + i, _mm256_mul_ps(_mm256_mul_ps(load8(x + i), r), load8(w + i)));
}

// y = rms_norm(x) * w over M rows, bf16 in and out, on the calling thread: a model's final
// norm over a few rows, where torch's op costs more in dispatch than in work
extern "C" void ss_rmsnorm(const bf16* x, const bf16* w, bf16* y, int M, int H, float eps) {
  for (int t = 0; t < M; t++) rmsnorm_row(x + (size_t)t * H, w, y + (size_t)t * H, H, eps);
}

// x += h (bf16, rounded once)
static void residual_row(bf16* x, const bf16* h, int H) {
  for (int i = 0; i < H; i += 8) store8(x + i, _mm256_add_ps(load8(x + i), load8(h + i)));
}

// act = silu(gate) * up, each rounded to bf16 as the separate torch ops do (fp32 out)
static void silu_mul_row(const bf16* gate, const bf16* up, float* act, int I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int i = 0; i < I; i += 8) {
    const __m256 g = load8(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(act + i, round8(_mm256_mul_ps(round8(silu), load8(up + i))));
  }
}

// rotary on one head (rotate-half, D % 16 == 0): fp32 math rounded to bf16, stored as
// fp32 (queries) or bf16 (keys)
static inline void rope_pair(const bf16* src, const float* c, const float* s, int i, int half, __m256& lo, __m256& hi) {
  const __m256 a = load8(src + i), b = load8(src + i + half);
  lo = _mm256_fmsub_ps(a, _mm256_loadu_ps(c + i), _mm256_mul_ps(b, _mm256_loadu_ps(s + i)));
  hi = _mm256_fmadd_ps(b, _mm256_loadu_ps(c + i + half), _mm256_mul_ps(a, _mm256_loadu_ps(s + i + half)));
}
static void rope_head(const bf16* src, const float* c, const float* s, float* dst, int D) {
  const int half = D / 2;
  for (int i = 0; i < half; i += 8) {
    __m256 lo, hi;
    rope_pair(src, c, s, i, half, lo, hi);
    _mm256_storeu_ps(dst + i, round8(lo));
    _mm256_storeu_ps(dst + i + half, round8(hi));
  }
}
static void rope_head_bf16(const bf16* src, const float* c, const float* s, bf16* dst, int D) {
  const int half = D / 2;
  for (int i = 0; i < half; i += 8) {
    __m256 lo, hi;
    rope_pair(src, c, s, i, half, lo, hi);
    store8(dst + i, lo);
    store8(dst + i + half, hi);
  }
}

// ---------------------------------------------------------------- attention
//
// A job is one row of one sequence and one K/V head, for the `group` query heads that
// share it. K and V are read as bf16 pairs: a 256-bit load of 16 head dims holds dims
// 2i and 2i+1 in lane i, which become fp32 by a shift (the even dim) and a mask (the odd
// one), so nothing is widened in memory. The query is split the same way (even and odd
// dims), once per job.
//
// Score q . k: per key, 8 fp32 lanes accumulate even and odd dims in a fixed order,
// then a fixed tree of pairwise adds, times the scale. Softmax in fp32 over the row's
// visible keys (max and sum in 8 lanes, then a fixed reduction). The output sums
// p_j v_j over the visible keys in order, in the even/odd layout, then multiplies by
// 1 / sum p_j. Every step depends only on the row's visible keys and is the same for
// every key, so a tree row equals the chain row of the same tokens bit for bit.

struct SeqView {
  const bf16 *kh, *vh;
  int64_t base;
  const int64_t* kidx;
  int cs, total;
  const uint8_t* mask;  // [rows, total] or null (causal)
  inline int64_t at(int j) const { return kidx ? kidx[j] : base + j; }
};

struct AttnScratch {
  std::vector<int64_t> keys;  // pool indices of the visible keys, in order
  std::vector<float> s;       // [group][visible rounded up to 8] scores, then probabilities
};

static const int PF = 32;  // keys ahead that K and V rows are prefetched
static inline void prefetch_row(const bf16* p, int D) {
  for (int d = 0; d < D; d += 32) _mm_prefetch((const char*)(p + d), _MM_HINT_T0);
}
static inline __m256i load_pairs(const bf16* p) { return _mm256_loadu_si256((const __m256i*)p); }

// scores of 4 keys for one head: qs holds the head's query as [D/16][even 8, odd 8]
template <int D>
static inline __m128 score4(const bf16* const* k, const float* qs) {
  __m256 a[4];
  for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_ps();
  for (int c = 0; c < D / 16; c++) {
    const __m256 qe = _mm256_load_ps(qs + 16 * c), qo = _mm256_load_ps(qs + 16 * c + 8);
    for (int i = 0; i < 4; i++) {
      const __m256i kp = load_pairs(k[i] + 16 * c);
      a[i] = _mm256_fmadd_ps(qe, even_dims(kp), a[i]);
      a[i] = _mm256_fmadd_ps(qo, odd_dims(kp), a[i]);
    }
  }
  // lane i: the 8 lanes of a[i] summed by a fixed tree
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// NO_IPA: specialized for its one caller's thread-local scratch, the function would look
// the thread-local up again (a call that spills registers) at each use inside its loops
template <int D>
NO_IPA static void attend_row(const SeqView& sv, const float* qf, float* ao, int t, int row, int g, int group, int Hq,
                       float scale, AttnScratch& w) {
  w.keys.resize((size_t)sv.total);
  w.s.resize((size_t)group * ((sv.total + 7) & ~7));
  // plain pointers from here on: the scratch may be thread-local, and every access to it
  // through the reference can cost a TLS lookup that spills the loop's registers
  int64_t* kx = w.keys.data();
  float* S = w.s.data();
  // visible keys: causal rows see 0..cs+row; tree rows the cached keys and their mask's
  int n = 0;
  if (sv.mask == nullptr) {
    for (int j = 0; j <= sv.cs + row; j++) kx[n++] = sv.at(j);
  } else {
    const uint8_t* mrow = sv.mask + (size_t)row * sv.total;
    for (int j = 0; j < sv.total; j++)
      if (j < sv.cs || mrow[j]) kx[n++] = sv.at(j);
  }
  const int n4 = (n + 3) & ~3, n8 = (n + 7) & ~7;
  // the group's queries, even and odd dims apart per 16
  alignas(32) float qs[16][256];
  const float* q0 = qf + ((size_t)t * Hq + (size_t)g * group) * D;
  for (int h = 0; h < group; h++)
    for (int c = 0; c < D / 16; c++)
      for (int i = 0; i < 8; i++) {
        qs[h][16 * c + i] = q0[(size_t)h * D + 16 * c + 2 * i];
        qs[h][16 * c + 8 + i] = q0[(size_t)h * D + 16 * c + 2 * i + 1];
      }
  const __m128 sc = _mm_set1_ps(scale);
  // blocks of 32 keys, each scored for every head while it is in L1
  for (int b0 = 0; b0 < n4; b0 += 32) {
    const int b1 = b0 + 32 < n4 ? b0 + 32 : n4;
    for (int h = 0; h < group; h++)
      for (int j = b0; j < b1; j += 4) {
        const bf16* k[4];
        for (int i = 0; i < 4; i++) k[i] = sv.kh + kx[j + i < n ? j + i : n - 1] * D;  // past n: a stand-in
        if (h == 0 && j + PF + 4 <= n)  // the next block's keys on their way from memory
          for (int i = 0; i < 4; i++) prefetch_row(sv.kh + kx[j + PF + i] * D, D);
        _mm_storeu_ps(S + (size_t)h * n8 + j, _mm_mul_ps(score4<D>(k, qs[h]), sc));
      }
  }
  float den[16];
  for (int h = 0; h < group; h++) {
    float* s = S + (size_t)h * n8;
    for (int j = n; j < n8; j++) s[j] = -INFINITY;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mv);
    float mx = lanes[0];
    for (int i = 1; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    mv = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < n8; j += 8) {
      __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      if (j + 8 > n) {  // the padding's lanes (exp clamps, so not 0 by themselves) set to 0
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        p = _mm256_and_ps(p, _mm256_castsi256_ps(live));
      }
      _mm256_storeu_ps(s + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    den[h] = hsum8(sum);
  }
  // P x V in blocks of 64 keys; per head and 64 dims, 8 accumulators (even, odd per 16)
  alignas(32) float acc[16][256];
  for (int h = 0; h < group; h++) memset(acc[h], 0, sizeof(acc[h]));
  for (int b0 = 0; b0 < n; b0 += 64) {
    const int b1 = b0 + 64 < n ? b0 + 64 : n;
    for (int h = 0; h < group; h++) {
      const float* p = S + (size_t)h * n8;
      for (int d0 = 0; d0 < D; d0 += 64) {
        const int nc = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
        float* o = acc[h] + d0;
        __m256 e[4], od[4];
        for (int c = 0; c < nc; c++) e[c] = _mm256_load_ps(o + 16 * c), od[c] = _mm256_load_ps(o + 16 * c + 8);
        for (int j = b0; j < b1; j++) {
          const __m256 pj = _mm256_broadcast_ss(p + j);
          const bf16* v = sv.vh + kx[j] * D + d0;
          if (h == 0 && d0 == 0 && j + PF < n) prefetch_row(sv.vh + kx[j + PF] * D, D);
          for (int c = 0; c < nc; c++) {
            const __m256i vp = load_pairs(v + 16 * c);
            e[c] = _mm256_fmadd_ps(pj, even_dims(vp), e[c]);
            od[c] = _mm256_fmadd_ps(pj, odd_dims(vp), od[c]);
          }
        }
        for (int c = 0; c < nc; c++) _mm256_store_ps(o + 16 * c, e[c]), _mm256_store_ps(o + 16 * c + 8, od[c]);
      }
    }
  }
  for (int h = 0; h < group; h++) {
    const __m256 iv = _mm256_set1_ps(1.0f / den[h]);
    alignas(32) float tmp[256];
    for (int c = 0; c < D / 16; c++)
      for (int i = 0; i < 8; i++) tmp[16 * c + 2 * i] = acc[h][16 * c + i], tmp[16 * c + 2 * i + 1] = acc[h][16 * c + 8 + i];
    float* out = ao + ((size_t)t * Hq + (size_t)g * group + h) * D;
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, round8(_mm256_mul_ps(_mm256_load_ps(tmp + d), iv)));
  }
}

// the kernel compiled for each head size the layer accepts (D % 32 == 0, D <= 256)
static void attend(int D, const SeqView& sv, const float* qf, float* ao, int t, int row, int g, int group, int Hq,
                   float scale, AttnScratch& w) {
  switch (D) {
    case 32: return attend_row<32>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 64: return attend_row<64>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 96: return attend_row<96>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 128: return attend_row<128>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 160: return attend_row<160>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 192: return attend_row<192>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    case 224: return attend_row<224>(sv, qf, ao, t, row, g, group, Hq, scale, w);
    default: return attend_row<256>(sv, qf, ao, t, row, g, group, Hq, scale, w);
  }
}

// ---------------------------------------------------------------- the layer

enum Weight { LN1, LN2, WQKV, BQKV, WO, WGU, WD, KCACHE, VCACHE, NUM_WEIGHTS };
enum Dim { HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, POOL, NUM_DIMS };

struct Job {
  int seq, row, head;
};

struct Scratch {
  std::vector<bf16> qkv, h, gu;
  std::vector<float> xn, q, ao, act;
};

// The same contract as decode.cpp's ss_layer: x [T, H] bf16 is updated in place.
// Sequence s owns rows qs[s]..qs[s+1]-1; its cache entries 0..cs[s] + rows - 1 sit at
// pool indices kidx[s][j] (an int64 array), or base[s] + j where kidx[s] is 0. masks[s]
// is 0 (causal) or a [rows, cs[s] + rows] bool mask. pos [T] are rotary positions, widx
// [T] the pool index each row's K/V goes to, cos/sin [max_len, D] fp32 tables.
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

  std::vector<Job> jobs;
  for (int s = 0; s < nseq; s++)
    for (int r = 0; r < (int)(qs[s + 1] - qs[s]); r++)
      for (int g = 0; g < Hkv; g++) jobs.push_back(Job{s, r, g});
  static thread_local Scratch sc;
  sc.xn.resize((size_t)T * H);
  sc.qkv.resize((size_t)T * NQKV);
  sc.ao.resize((size_t)T * Hq * D);
  sc.h.resize((size_t)T * H);
  sc.gu.resize((size_t)T * 2 * I);
  sc.act.resize((size_t)T * I);
  sc.q.resize((size_t)T * Hq * D);
  float *xn = sc.xn.data(), *ao = sc.ao.data(), *act = sc.act.data(), *qf = sc.q.data();
  bf16 *qkv = sc.qkv.data(), *hb = sc.h.data(), *gu = sc.gu.data();

#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rmsnorm_row(x + (size_t)t * H, ln1, xn + (size_t)t * H, H, eps);
    linear_omp(wqkv, bqkv, xn, qkv, T, H, NQKV);
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
#pragma omp for schedule(dynamic, 1)
    for (size_t b = 0; b < jobs.size(); b++) {
      static thread_local AttnScratch ws;
      const Job& jb = jobs[b];
      const int sq = jb.seq, rows = (int)(qs[sq + 1] - qs[sq]);
      const SeqView sv{kc + jb.head * P * D, vc + jb.head * P * D, base[sq], (const int64_t*)kidx[sq], (int)cs[sq],
                       (int)cs[sq] + rows, (const uint8_t*)masks[sq]};
      attend(D, sv, qf, ao, (int)qs[sq] + jb.row, jb.row, jb.head, group, Hq, scale, ws);
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
