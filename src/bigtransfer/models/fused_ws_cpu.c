/* Weight Standardization of fp32 kernels on CPUs, forward and backward (see fused_ws_cpu.py).
 *
 * A kernel is `rows` output channels, each a row of cin x k weights (k = kh * kw taps) stored either as
 * (cin, k), torch's default layout, or as (k, cin), channels_last. One thread takes a row at a time and makes
 * every pass over it while it sits in cache: its sum, its centred sum of squares, then its output, written
 * channels_last (what oneDNN convolves channels_last activations with), so no transposing copy follows. A row
 * held in the other layout goes through a scratch row, transposed there in cache. Sums run in double, in
 * LANES independent accumulators (which the compiler vectorises without reassociating). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 16

/* The sum of (p[j] - p_shift) * (q[j] - q_shift) over n elements. */
static double centred_dot(const float *restrict p, const float *restrict q, int64_t n, double p_shift,
                          double q_shift) {
  double acc[LANES] = {0}, s = 0.0;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; l++) acc[l] += ((double)p[j + l] - p_shift) * ((double)q[j + l] - q_shift);
  for (; j < n; j++) s += ((double)p[j] - p_shift) * ((double)q[j] - q_shift);
  for (int l = 0; l < LANES; l++) s += acc[l];
  return s;
}

/* The sum of p[j] over n elements. */
static double sum(const float *restrict p, int64_t n) {
  double acc[LANES] = {0}, s = 0.0;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; l++) acc[l] += p[j + l];
  for (; j < n; j++) s += p[j];
  for (int l = 0; l < LANES; l++) s += acc[l];
  return s;
}

/* to = from transposed: from is a (a, b) row, to the (b, a) one. In blocks of LANES along a, so that each
 * block's reads and writes stay within a few cache lines. */
static void transpose(const float *restrict from, float *restrict to, int64_t a, int64_t b) {
  int64_t i0 = 0;
  for (; i0 + LANES <= a; i0 += LANES)
    for (int64_t j = 0; j < b; j++)
      for (int l = 0; l < LANES; l++) to[j * a + i0 + l] = from[(i0 + l) * b + j];
  for (int64_t j = 0; j < b; j++)
    for (int64_t i = i0; i < a; i++) to[j * a + i] = from[i * b + j];
}

typedef struct {
  const float *w, *g;
  float *out; /* the forward's standardised kernel (channels_last), the backward's weight gradient (w's layout) */
  double *mean, *rstd;
  int64_t cin, k;
  int w_channels_last, g_channels_last;
  double eps;
} Args;

/* One row: statistics from w's layout, the output channels_last (through scratch where w is not). */
static void forward_row(const Args *a, int64_t r, float *restrict scratch) {
  const int64_t n = a->cin * a->k;
  const float *restrict p = a->w + r * n;
  float *restrict q = a->out + r * n;
  const double m = sum(p, n) / n;
  const double s = 1.0 / sqrt(centred_dot(p, p, n, m, m) / n + a->eps);
  a->mean[r] = m;
  a->rstd[r] = s;
  const float mf = (float)m, sf = (float)s;
  const int direct = a->w_channels_last || a->k == 1;
  float *restrict out = direct ? q : scratch;
  for (int64_t j = 0; j < n; j++) out[j] = (p[j] - mf) * sf;
  if (!direct) transpose(scratch, q, a->cin, a->k);
}

/* With what = (w - mean) * rstd and g the gradient of the standardised row:
 * dw = rstd * (g - mean(g) - what * mean(g * what)), in w's layout; g in the other goes through scratch. */
static void backward_row(const Args *a, int64_t r, float *restrict scratch) {
  const int64_t n = a->cin * a->k;
  const float *restrict p = a->w + r * n, *restrict d = a->g + r * n;
  float *restrict q = a->out + r * n;
  if (a->w_channels_last != a->g_channels_last && a->k > 1) {
    if (a->g_channels_last)
      transpose(d, scratch, a->k, a->cin);
    else
      transpose(d, scratch, a->cin, a->k);
    d = scratch;
  }
  const double m = a->mean[r], s = a->rstd[r];
  const double sum_g = sum(d, n), sum_gw = centred_dot(p, d, n, m, 0.0);
  /* dw = s * g - s * mean(g) - (w - m) * s^2 * mean(g * (w - m)) */
  const float b = (float)(s * sum_g / n), c = (float)(s * s * s * sum_gw / n), sf = (float)s, mf = (float)m;
  for (int64_t j = 0; j < n; j++) q[j] = sf * d[j] - b - c * (p[j] - mf);
}

/* Runs task(args, r, scratch) for every row r on `threads` OpenMP threads, each with a scratch row. Built with
 * -fopenmp, this library runs in torch's own OpenMP pool (see fused_norm_cpu.c). Nonzero if memory ran out. */
static int run(const Args *args, int64_t rows, void (*task)(const Args *, int64_t, float *), int threads) {
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float *scratch = malloc(args->cin * args->k * sizeof(float));
    failed = scratch == NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
      if (scratch != NULL) task(args, r, scratch);
    free(scratch);
  }
  return failed;
}

int bit_standardize_forward(const float *w, float *y, double *mean, double *rstd, int64_t rows, int64_t cin,
                            int64_t k, int w_channels_last, double eps, int threads) {
  const Args args = {w, NULL, y, mean, rstd, cin, k, w_channels_last, 1, eps};
  return run(&args, rows, forward_row, threads);
}

int bit_standardize_backward(const float *w, const float *g, float *dw, const double *mean, const double *rstd,
                             int64_t rows, int64_t cin, int64_t k, int w_channels_last, int g_channels_last,
                             int threads) {
  const Args args = {w, g, dw, (double *)mean, (double *)rstd, cin, k, w_channels_last, g_channels_last, 0.0};
  return run(&args, rows, backward_row, threads);
}
