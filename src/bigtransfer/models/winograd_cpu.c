/* Winograd F(4x4, 3x3) transforms for 3x3 / stride 1 / pad 1 convolutions of channels_last fp32 tensors on
 * CPUs (see winograd_cpu.py; Lavin & Gray 2015, points 0, +-1, +-2 and infinity).
 *
 * The image is cut into 4x4 output tiles, each read as a 6x6 input tile (zero outside the image). Tile t's
 * input becomes V[xi][t][:] = (B^T d B)[xi] for the 36 positions xi, one row of C channels each; 36 matrix
 * products V[xi] @ U[xi] (torch's, with U = G g G^T, the transformed kernel) give M, and A^T M A gives the
 * 4x4 outputs. Every step runs along the channels, CB of them at a time (one AVX-512 register), which the
 * compiler vectorises; channels must be a multiple of CB. */
#include <stdint.h>

#define CB 16

/* o = B^T d along one axis: six rows of CB channels in, six out. */
static inline void input_rows(const float d[6][CB], float o[6][CB]) {
  for (int k = 0; k < CB; k++) {
    const float d0 = d[0][k], d1 = d[1][k], d2 = d[2][k], d3 = d[3][k], d4 = d[4][k], d5 = d[5][k];
    o[0][k] = 4.f * d0 - 5.f * d2 + d4;
    o[1][k] = -4.f * (d1 + d2) + d3 + d4;
    o[2][k] = 4.f * (d1 - d2) - d3 + d4;
    o[3][k] = 2.f * (d3 - d1) + d4 - d2;
    o[4][k] = 2.f * (d1 - d3) + d4 - d2;
    o[5][k] = 4.f * d1 - 5.f * d3 + d5;
  }
}

/* o = A^T m along one axis: six rows in, four out. */
static inline void output_rows(const float m[6][CB], float o[4][CB]) {
  for (int k = 0; k < CB; k++) {
    const float s12 = m[1][k] + m[2][k], d12 = m[1][k] - m[2][k];
    const float s34 = m[3][k] + m[4][k], d34 = m[3][k] - m[4][k];
    o[0][k] = m[0][k] + s12 + s34;
    o[1][k] = d12 + 2.f * d34;
    o[2][k] = s12 + 4.f * s34;
    o[3][k] = d12 + 8.f * d34 + m[5][k];
  }
}

/* x: (n, h, w, c) -> v: (36, T, c), T = n * ceil(h/4) * ceil(w/4) tiles in (sample, row, column) order. */
void bit_winograd_input(const float *restrict x, float *restrict v, int64_t n, int64_t h, int64_t w, int64_t c,
                        int threads) {
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, T = n * th * tw;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    const int64_t b = t / (th * tw), y0 = 4 * (t / tw % th) - 1, x0 = 4 * (t % tw) - 1;
    for (int64_t c0 = 0; c0 < c; c0 += CB) {
      float d[6][6][CB], rows[6][6][CB], column[6][CB], out[6][CB];
      for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++) {
          const int64_t y = y0 + i, xc = x0 + j;
          if (y >= 0 && y < h && xc >= 0 && xc < w) {
            const float *p = x + ((b * h + y) * w + xc) * c + c0;
            for (int k = 0; k < CB; k++) d[i][j][k] = p[k];
          } else {
            for (int k = 0; k < CB; k++) d[i][j][k] = 0.f;
          }
        }
      for (int i = 0; i < 6; i++) input_rows(d[i], rows[i]);
      for (int j = 0; j < 6; j++) {
        for (int i = 0; i < 6; i++)
          for (int k = 0; k < CB; k++) column[i][k] = rows[i][j][k];
        input_rows(column, out);
        for (int i = 0; i < 6; i++) {
          float *q = v + ((int64_t)(i * 6 + j) * T + t) * c + c0;
          for (int k = 0; k < CB; k++) q[k] = out[i][k];
        }
      }
    }
  }
}

/* m: (36, T, k) -> y: (n, h, w, k), the parts of the 4x4 tiles inside the image. */
void bit_winograd_output(const float *restrict m, float *restrict y, int64_t n, int64_t h, int64_t w, int64_t k,
                         int threads) {
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, T = n * th * tw;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    const int64_t b = t / (th * tw), y0 = 4 * (t / tw % th), x0 = 4 * (t % tw);
    for (int64_t k0 = 0; k0 < k; k0 += CB) {
      float row[6][CB], rows[6][4][CB], column[6][CB], out[4][CB];
      for (int i = 0; i < 6; i++) {
        for (int j = 0; j < 6; j++) {
          const float *q = m + ((int64_t)(i * 6 + j) * T + t) * k + k0;
          for (int kk = 0; kk < CB; kk++) row[j][kk] = q[kk];
        }
        output_rows(row, rows[i]);
      }
      for (int j = 0; j < 4 && x0 + j < w; j++) {
        for (int i = 0; i < 6; i++)
          for (int kk = 0; kk < CB; kk++) column[i][kk] = rows[i][j][kk];
        output_rows(column, out);
        for (int i = 0; i < 4 && y0 + i < h; i++) {
          float *p = y + ((b * h + y0 + i) * w + x0 + j) * k + k0;
          for (int kk = 0; kk < CB; kk++) p[kk] = out[i][kk];
        }
      }
    }
  }
}
