/* Y = X W^T + b on the CPU, float32, for decode-sized batches: a register-tiled GEMM.
 *
 * MKL runs the matmuls of a decode step (8-96 tokens against weights of a few hundred to 50k
 * rows) at 125-150 GFLOP/s on this project's 2-core AVX2 machine, ~75% of its own large-GEMM
 * rate, and returns W X^T, which then needs a transpose. This kernel reaches 140-175 GFLOP/s
 * there and writes Y in place: X is packed once into panels of 16 tokens ([K][16], zero past
 * the last token), and each 6-row block of W is multiplied with every panel, its 6 x 16 tile
 * of Y held in 12 AVX accumulators (enough independent FMA chains to hide their latency) while
 * the block's rows stay in L1. Blocks are shared among the OpenMP threads (the libgomp torch
 * loaded; see paged_attention_cpu.c). With many more tokens, MKL's cache blocking wins again;
 * the caller picks (kernels/cpu_linear.py).
 */
#include <stdint.h>
#include <stdlib.h>

typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }

enum { MR = 6, NR = 16, KB = 64 };  /* rows of W, tokens: one register tile; features per partial sum */

int tpserve_linear_f32(const float *x, int64_t T, int64_t K, int64_t ldx,
                       const float *w, int64_t N, int64_t ldw, const float *bias,
                       float *y, int64_t ldy)
{
    const int64_t P = (T + NR - 1) / NR;
    const size_t bytes = (sizeof(float) * P * K * NR + 63) / 64 * 64;
    float *panels = aligned_alloc(64, bytes ? bytes : 64);
    if (!panels) return 1;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++)
            for (int64_t k = 0; k < K; k++)
                for (int j = 0; j < NR; j++) {
                    const int64_t t = p * NR + j;
                    panels[(p * K + k) * NR + j] = t < T ? x[t * ldx + k] : 0.f;
                }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += MR) {
            const float *rows[MR];
            for (int r = 0; r < MR; r++) rows[r] = w + (n0 + r < N ? n0 + r : N - 1) * ldw;  /* past N: a repeat, not stored */
            for (int64_t p = 0; p < P; p++) {
                const float *panel = panels + p * K * NR;
                /* Sums over KB features at a time, added into the total: a rounding error
                 * that grows with KB + K / KB, not with K (MKL's blocking gives the same). */
                v8 total[MR][2];
                for (int r = 0; r < MR; r++) total[r][0] = total[r][1] = (v8){0};
                for (int64_t k0 = 0; k0 < K; k0 += KB) {
                    const int64_t k1 = k0 + KB < K ? k0 + KB : K;
                    v8 acc[MR][2];
                    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (v8){0};
                    for (int64_t k = k0; k < k1; k++) {
                        const v8 x0 = load8(panel + k * NR), x1 = load8(panel + k * NR + 8);
                        for (int r = 0; r < MR; r++) {
                            const float s = rows[r][k];
                            const v8 b = {s, s, s, s, s, s, s, s};
                            acc[r][0] += b * x0;
                            acc[r][1] += b * x1;
                        }
                    }
                    for (int r = 0; r < MR; r++) {
                        total[r][0] += acc[r][0];
                        total[r][1] += acc[r][1];
                    }
                }
                v8 (*acc)[2] = total;
                for (int r = 0; r < MR && n0 + r < N; r++) {
                    const float b = bias ? bias[n0 + r] : 0.f;
                    for (int j = 0; j < NR && p * NR + j < T; j++)
                        y[(p * NR + j) * ldy + n0 + r] = acc[r][j / 8][j % 8] + b;
                }
            }
        }
    }
    free(panels);
    return 0;
}
