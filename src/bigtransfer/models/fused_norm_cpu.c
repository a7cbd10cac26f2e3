/* GroupNorm + ReLU for channels_last fp32 tensors on CPUs, forward and backward (see fused_norm_cpu.py).
 *
 * One task per sample: its statistics, then its output, so that the second read of the sample comes from
 * cache. Whole rows of C channels are read (tiling channels measured slower: strided reads defeat the
 * prefetchers). Sums run in float over blocks of rows, then in double; they are shifted by the sample's first
 * pixel, so a large mean does not cancel the variance away. The forward leaves each sample's per-channel scale and
 * shift: the backward takes the ReLU's mask from them and x (no output read), and bit_group_norm_relu_apply writes
 * the output again, the same bits, for convolutions that recompute it rather than keep it. The forward's output
 * goes to memory with non-temporal stores where AVX-512 is there: by the time the next op reads it, the rest of the
 * batch has mostly passed through the cache, and plain stores first read every line they overwrite. Measured on
 * an AMD EPYC (Zen 4) by benchmarks/bench_norm_cpu.py --stores-ab, which builds this file again with
 * -DSTREAM_MIN_BYTES=4194304 (streaming only outputs of 4 MB or more) and with -DBIT_PLAIN_STORES to compare: see
 * benchmarks/RESULTS.md. */
#if defined(__AVX512F__) && !defined(BIT_PLAIN_STORES)
#define STREAM_STORES
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROW_BLOCK 64
#ifdef __FP_FAST_FMAF /* hardware FMA (x86 with FMA, ARMv8): the pre-activation x * scale + shift rounded once, as
                         the AVX-512 path rounds it, written out so that no compiler choice of where to contract
                         can make the forward's output, its recomputation and the backward's ReLU mask differ */
#define AFFINE(x, s, t) fmaf(x, s, t)
#else
#define AFFINE(x, s, t) ((x) * (s) + (t))
#endif
#ifndef STREAM_MIN_BYTES /* outputs smaller than this are written plainly: 0, all streamed (see the A/B) */
#define STREAM_MIN_BYTES 0
#endif

typedef struct {
  const float *x, *dy, *gamma, *beta;
  float *out, *mean, *rstd, *scale, *shift, *dgamma, *dbeta; /* scale, shift: per sample and channel */
  int64_t n, c, hw, groups;
  double eps;
} Args;

/* Per channel of sample x (hw rows of c floats): sums of (x - shift) and of w * (x - shift), where
 * w = (x - shift) for the forward and w = dy where y > 0 (the gradient through the ReLU) for the backward, y > 0
 * being AFFINE(x, scale, shift) > 0: the backward needs neither y nor a copy of it. */
static void channel_sums(const Args *a, const float *restrict x, const float *restrict scale,
                         const float *restrict affine_shift, const float *restrict dy, double *restrict sum,
                         double *restrict sum_w, float *restrict block, float *restrict block_w) {
  const int64_t C = a->c, HW = a->hw;
  const float *restrict shift = x;
  for (int64_t c = 0; c < C; c++) sum[c] = sum_w[c] = 0.0;
  for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {
    const int64_t r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;
    for (int64_t c = 0; c < C; c++) block[c] = block_w[c] = 0.f;
    for (int64_t r = r0; r < r1; r++) {
      const float *restrict p = x + r * C;
      if (dy == NULL) {
        for (int64_t c = 0; c < C; c++) {
          const float d = p[c] - shift[c];
          block[c] += d;
          block_w[c] += d * d;
        }
      } else {
        const float *restrict g = dy + r * C;
        for (int64_t c = 0; c < C; c++) {
          const float gm = AFFINE(p[c], scale[c], affine_shift[c]) > 0.f ? g[c] : 0.f;
          block[c] += gm;
          block_w[c] += gm * (p[c] - shift[c]);
        }
      }
    }
    for (int64_t c = 0; c < C; c++) {
      sum[c] += block[c];
      sum_w[c] += block_w[c];
    }
  }
}

/* relu(AFFINE(x, scale, shift)) for sample n's rows, into a->out: the forward's output, and the same bits again
 * when a convolution's backward recomputes it (bit_group_norm_relu_apply) instead of keeping it. */
static void apply_sample(const Args *a, int64_t n, void *scratch) {
  (void)scratch;
  const int64_t C = a->c, HW = a->hw;
  const float *restrict x = a->x + n * HW * C, *restrict scale = a->scale + n * C, *restrict shift = a->shift + n * C;
  float *restrict out = a->out + n * HW * C;
#ifdef STREAM_STORES
  const int stream = a->n * HW * C * (int64_t)sizeof(float) >= STREAM_MIN_BYTES;
#endif
  for (int64_t r = 0; r < HW; r++) {
    const float *restrict p = x + r * C;
    float *restrict q = out + r * C;
    int64_t c = 0;
#ifdef STREAM_STORES
    if (stream && ((uintptr_t)q & 63) == 0)
      for (; c + 16 <= C; c += 16) {
        const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(p + c), _mm512_loadu_ps(scale + c),
                                         _mm512_loadu_ps(shift + c));
        _mm512_stream_ps(q + c, _mm512_max_ps(_mm512_setzero_ps(), v)); /* a NaN v: max returns it */
      }
#endif
    for (; c < C; c++) {
      const float v = AFFINE(p[c], scale[c], shift[c]);
      q[c] = v < 0.f ? 0.f : v; /* a NaN stays NaN, as torch's ReLU keeps it: a diverged run must show */
    }
  }
#ifdef STREAM_STORES
  if (stream) _mm_sfence(); /* this thread's streamed lines are in memory before the op returns */
#endif
}

static void forward_sample(const Args *a, int64_t n, void *scratch) {
  const int64_t C = a->c, HW = a->hw, G = a->groups, cg = C / G;
  const float *restrict x = a->x + n * HW * C;
  double *sum = scratch, *sum_sq = sum + C;
  float *restrict scale = a->scale + n * C, *restrict shift = a->shift + n * C;
  channel_sums(a, x, NULL, NULL, NULL, sum, sum_sq, (float *)(sum_sq + C), (float *)(sum_sq + C) + C);
  for (int64_t g = 0; g < G; g++) {
    double mean = 0.0, m2 = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) mean += x[c] + sum[c] / HW;
    mean /= cg;
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {  /* Chan et al.: channel moments into the group's */
      const double dev = x[c] + sum[c] / HW - mean;
      m2 += sum_sq[c] - sum[c] * sum[c] / HW + HW * dev * dev;
    }
    const double rstd = 1.0 / sqrt(m2 / (HW * cg) + a->eps);
    a->mean[n * G + g] = (float)mean;
    a->rstd[n * G + g] = (float)rstd;
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      scale[c] = (float)(a->gamma[c] * rstd);
      shift[c] = (float)(a->beta[c] - mean * a->gamma[c] * rstd);
    }
  }
  apply_sample(a, n, scratch);
}

/* With xhat = (x - mean) * rstd and g = dy * relu'(y) * gamma:
 * dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = A_c * dy * relu'(y) + B_g * x + C_g per channel c of
 * group g, relu'(y) being AFFINE(x, scale, shift) > 0; this sample's shares of d gamma (sums of dy * relu' * xhat)
 * and d beta (sums of dy * relu') go to row n of dgamma / dbeta. */
static void backward_sample(const Args *a, int64_t n, void *scratch) {
  const int64_t C = a->c, HW = a->hw, G = a->groups, cg = C / G;
  const float *restrict x = a->x + n * HW * C, *restrict dy = a->dy + n * HW * C;
  const float *restrict scale = a->scale + n * C, *restrict shift = a->shift + n * C;
  float *restrict dx = a->out + n * HW * C;
  double *sum_dy = scratch, *sum_dy_x = sum_dy + C;
  float *restrict coef_dy = (float *)(sum_dy_x + C), *restrict coef_x = coef_dy + C, *restrict coef = coef_x + C;
  channel_sums(a, x, scale, shift, dy, sum_dy, sum_dy_x, coef_dy, coef_x);
  for (int64_t g = 0; g < G; g++) {
    const double mean = a->mean[n * G + g], rstd = a->rstd[n * G + g];
    double mean_g = 0.0, mean_g_xhat = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      const double dy_xhat = rstd * (sum_dy_x[c] - (mean - x[c]) * sum_dy[c]);  /* x[c]: the shift */
      a->dgamma[n * C + c] = (float)dy_xhat;
      a->dbeta[n * C + c] = (float)sum_dy[c];
      mean_g += a->gamma[c] * sum_dy[c];
      mean_g_xhat += a->gamma[c] * dy_xhat;
    }
    mean_g /= HW * cg;
    mean_g_xhat /= HW * cg;
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      coef_dy[c] = (float)(rstd * a->gamma[c]);
      coef_x[c] = (float)(-rstd * rstd * mean_g_xhat);
      coef[c] = (float)(rstd * (rstd * mean * mean_g_xhat - mean_g));
    }
  }
  for (int64_t r = 0; r < HW; r++) {
    const float *restrict p = x + r * C, *restrict g = dy + r * C;
    float *restrict o = dx + r * C;
    for (int64_t c = 0; c < C; c++)
      o[c] = coef_dy[c] * (AFFINE(p[c], scale[c], shift[c]) > 0.f ? g[c] : 0.f) + coef_x[c] * p[c] + coef[c];
  }
}

/* Runs task(args, n) for every sample n on `threads` OpenMP threads. Built with -fopenmp, this library
 * binds to the libgomp that torch has already loaded (same soname), so the tasks run in torch's own thread
 * pool: a second pool would fight torch's threads, which spin for a while after each of its ops (measured:
 * with per-call pthreads the fused model was no faster than torch's ops). Nonzero if memory ran out. */
static int run(const Args *args, void (*task)(const Args *, int64_t, void *), int threads) {
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    void *scratch = malloc(args->c * (2 * sizeof(double) + 3 * sizeof(float)));
    failed = scratch == NULL;
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < args->n; n++)
      if (scratch != NULL) task(args, n, scratch);
    free(scratch);
  }
  return failed;
}

/* Writes out, mean and rstd (per sample and group), scale and shift (per sample and channel: what the backward
 * and bit_group_norm_relu_apply take). */
int bit_group_norm_relu_forward(const float *x, const float *gamma, const float *beta, float *out, float *mean,
                                float *rstd, float *scale, float *shift, int64_t n, int64_t c, int64_t hw,
                                int64_t groups, double eps, int threads) {
  const Args args = {x, NULL, gamma, beta, out, mean, rstd, scale, shift, NULL, NULL, n, c, hw, groups, eps};
  return run(&args, forward_sample, threads);
}

int bit_group_norm_relu_apply(const float *x, const float *scale, const float *shift, float *out, int64_t n,
                              int64_t c, int64_t hw, int threads) {
  const Args args = {x, NULL, NULL, NULL, out, NULL, NULL, (float *)scale, (float *)shift, NULL, NULL,
                     n, c, hw, 1, 0.0};
  return run(&args, apply_sample, threads);
}

int bit_group_norm_relu_backward(const float *x, const float *dy, const float *gamma, const float *mean,
                                 const float *rstd, const float *scale, const float *shift, float *dx, float *dgamma,
                                 float *dbeta, int64_t n, int64_t c, int64_t hw, int64_t groups, int threads) {
  const Args args = {x, dy, gamma, NULL, dx, (float *)mean, (float *)rstd, (float *)scale, (float *)shift, dgamma,
                     dbeta, n, c, hw, groups, 0.0};
  return run(&args, backward_sample, threads);
}
