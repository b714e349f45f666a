/* A float32 matrix transpose on the CPU, into a contiguous destination.
 *
 * On the CPU, tpserve's linear layers compute (W X^T) for decode-sized batches, the GEMM
 * orientation MKL runs fastest there, and transpose the result back to [tokens, features].
 * torch's own copy does that transpose single-threaded at ~3-5 GB/s; at SmolLM2's output layer
 * ([49152, 64] every decode step) it took ~10 ms of a ~190 ms step. This one moves 8x8 tiles
 * through AVX registers on all threads (the libgomp torch loaded; see paged_attention_cpu.c).
 */
#include <stdint.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

/* One 8x8 tile: three rounds of shuffles (the classic unpack / shuffle / permute ladder). */
static inline void tr8(const float *s, int64_t ss, float *d, int64_t ds)
{
    v8 r0 = load8(s), r1 = load8(s + ss), r2 = load8(s + 2*ss), r3 = load8(s + 3*ss),
       r4 = load8(s + 4*ss), r5 = load8(s + 5*ss), r6 = load8(s + 6*ss), r7 = load8(s + 7*ss);
    v8 t0 = __builtin_shuffle(r0, r1, (i8){0, 8, 1, 9, 4, 12, 5, 13});
    v8 t1 = __builtin_shuffle(r0, r1, (i8){2, 10, 3, 11, 6, 14, 7, 15});
    v8 t2 = __builtin_shuffle(r2, r3, (i8){0, 8, 1, 9, 4, 12, 5, 13});
    v8 t3 = __builtin_shuffle(r2, r3, (i8){2, 10, 3, 11, 6, 14, 7, 15});
    v8 t4 = __builtin_shuffle(r4, r5, (i8){0, 8, 1, 9, 4, 12, 5, 13});
    v8 t5 = __builtin_shuffle(r4, r5, (i8){2, 10, 3, 11, 6, 14, 7, 15});
    v8 t6 = __builtin_shuffle(r6, r7, (i8){0, 8, 1, 9, 4, 12, 5, 13});
    v8 t7 = __builtin_shuffle(r6, r7, (i8){2, 10, 3, 11, 6, 14, 7, 15});
    v8 u0 = __builtin_shuffle(t0, t2, (i8){0, 1, 8, 9, 4, 5, 12, 13});
    v8 u1 = __builtin_shuffle(t0, t2, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    v8 u2 = __builtin_shuffle(t1, t3, (i8){0, 1, 8, 9, 4, 5, 12, 13});
    v8 u3 = __builtin_shuffle(t1, t3, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    v8 u4 = __builtin_shuffle(t4, t6, (i8){0, 1, 8, 9, 4, 5, 12, 13});
    v8 u5 = __builtin_shuffle(t4, t6, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    v8 u6 = __builtin_shuffle(t5, t7, (i8){0, 1, 8, 9, 4, 5, 12, 13});
    v8 u7 = __builtin_shuffle(t5, t7, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    store8(d,        __builtin_shuffle(u0, u4, (i8){0, 1, 2, 3, 8, 9, 10, 11}));
    store8(d + ds,   __builtin_shuffle(u1, u5, (i8){0, 1, 2, 3, 8, 9, 10, 11}));
    store8(d + 2*ds, __builtin_shuffle(u2, u6, (i8){0, 1, 2, 3, 8, 9, 10, 11}));
    store8(d + 3*ds, __builtin_shuffle(u3, u7, (i8){0, 1, 2, 3, 8, 9, 10, 11}));
    store8(d + 4*ds, __builtin_shuffle(u0, u4, (i8){4, 5, 6, 7, 12, 13, 14, 15}));
    store8(d + 5*ds, __builtin_shuffle(u1, u5, (i8){4, 5, 6, 7, 12, 13, 14, 15}));
    store8(d + 6*ds, __builtin_shuffle(u2, u6, (i8){4, 5, 6, 7, 12, 13, 14, 15}));
    store8(d + 7*ds, __builtin_shuffle(u3, u7, (i8){4, 5, 6, 7, 12, 13, 14, 15}));
}

/* dst[c * ds + r] = src[r * ss + c]: tiles of 8 rows shared among the threads. */
void tpserve_transpose_f32(const float *src, int64_t rows, int64_t cols, int64_t ss, float *dst, int64_t ds)
{
    const int64_t R8 = rows / 8 * 8, C8 = cols / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R8; r += 8) {
        for (int64_t c = 0; c < C8; c += 8) tr8(src + r * ss + c, ss, dst + c * ds + r, ds);
        for (int64_t c = C8; c < cols; c++)
            for (int64_t i = r; i < r + 8; i++) dst[c * ds + i] = src[i * ss + c];
    }
    for (int64_t i = R8; i < rows; i++)
        for (int64_t c = 0; c < cols; c++) dst[c * ds + i] = src[i * ss + c];
}
