/* Paged attention on the CPU: the semantics of kernels/attention.py's
 * paged_attention_reference, read straight from the paged cache. Queries, output and all
 * arithmetic are float32; the cache is float32 or bfloat16 (kv_bf16), whose keys and values
 * are widened in registers as they are read, so a bf16 model reads half the bytes.
 *
 * The torch path gathers every sequence's blocks into a padded copy, then runs SDPA on it:
 * the cache is read from memory, written back as the copy and read again, and at decode the
 * step is bound by exactly that traffic. Here each (query row, kv head) pair walks its
 * sequence's block table and reads each key and value once.
 *
 * Work items are (row, kv head) pairs, shared among the OpenMP threads. This library links
 * the libgomp that torch has already loaded (same soname), so torch.set_num_threads sizes
 * both and their thread pools never compete for cores.
 *
 * Each item makes two passes: scores of the row's heads_per_group query heads against every
 * visible key (kept in a per-thread buffer), then an exact softmax and the weighted sum of
 * values. Prefill rows work the same way; without tiling a long prompt costs O(n^2) dot
 * products, yet this still beats the reference's masked SDPA at every length measured
 * (benchmarks/cpu_attention.py).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { OK = 0, ERR_ALLOC = 1, ERR_QUERIES = 2, ERR_SEQLENS = 3, ERR_BLOCK = 4 };

/* Eight floats; gcc lowers them to one AVX register, or two SSE ones. */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
/* bfloat16 is the top half of a float32: widening is a shift. */
static inline v8 load8_bf16(const uint16_t *p)
{
    u16x8 h;
    __builtin_memcpy(&h, p, sizeof h);
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    v8 f;
    __builtin_memcpy(&f, &w, sizeof f);
    return f;
}
/* Eight elements at element offset i of a cache, float32 or (BF16) bfloat16. */
static inline v8 load8_kv(const void *cache, int64_t i, const int BF16)
{
    return BF16 ? load8_bf16((const uint16_t *)cache + i) : load8((const float *)cache + i);
}
/* Asks for a block's rows of one head ahead of use: blocks lie anywhere in the cache, so the
 * hardware prefetcher cannot guess the next one. `at` and the stride count elements. */
static inline void prefetch_block(const void *cache, int64_t at, int64_t stride_slot, int32_t rows, int D,
                                  const int BF16)
{
    const int size = BF16 ? 2 : 4;
    const char *p = (const char *)cache + at * size;
    for (int32_t i = 0; i < rows; i++)
        for (int e = 0; e < D * size; e += 64) __builtin_prefetch(p + i * stride_slot * size + e);
}

static inline float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* One query row's G heads (one kv group) against the keys at positions lo..pos of a
 * sequence. G, D and BF16 are constants where this is inlined into a specialised case, so the
 * query and accumulator vectors stay in registers. k and v point at the group's head in
 * block 0, slot 0; offsets into them count elements. */
static inline __attribute__((always_inline)) void attend(
    const float *qh, int64_t q_stride_h, const void *k, const void *v,
    int64_t stride_block, int64_t stride_slot, const int32_t *table, int32_t block_size,
    int32_t lo, int32_t pos, float scale, float *scores, float *o, int64_t o_stride_h,
    const int G, const int D, const int BF16)
{
    const int32_t n = pos - lo + 1;
    v8 qv[G][D / 8], acc[G][D / 8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < D / 8; c++) {
            qv[g][c] = load8(qh + g * q_stride_h + 8 * c) * scale;
            acc[g][c] = (v8){0};
        }

    /* Scores, walking the block table a block at a time. */
    for (int32_t j = lo; j <= pos;) {
        const int32_t blk = j / block_size, last = (blk + 1) * block_size - 1 < pos ? (blk + 1) * block_size - 1 : pos;
        int64_t kr = table[blk] * stride_block + (j - blk * block_size) * stride_slot;
        if (last < pos)
            prefetch_block(k, table[blk + 1] * stride_block, stride_slot, block_size, D, BF16);
        else  /* the values' first block comes next */
            prefetch_block(v, table[lo / block_size] * stride_block, stride_slot, block_size, D, BF16);
        for (; j <= last; j++, kr += stride_slot)
            for (int g = 0; g < G; g++) {
                v8 a = qv[g][0] * load8_kv(k, kr, BF16);
                for (int c = 1; c < D / 8; c++) a += qv[g][c] * load8_kv(k, kr + 8 * c, BF16);
                scores[g * n + (j - lo)] = hsum8(a);
            }
    }
    /* Exact softmax over the row's keys (gcc vectorises these loops, expf included). */
    for (int g = 0; g < G; g++) {
        float *sg = scores + g * n, m = -FLT_MAX, sum = 0.f;  /* finite: built with -ffast-math */
        for (int32_t j = 0; j < n; j++) m = sg[j] > m ? sg[j] : m;
        for (int32_t j = 0; j < n; j++) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
        const float inv = 1.f / sum;
        for (int32_t j = 0; j < n; j++) sg[j] *= inv;
    }
    /* The weighted sum of values, a block of keys at a time. Up to 8 heads and CH column
     * chunks per pass, keys inner: the accumulators (a fixed-size array, so gcc keeps it in
     * registers) form enough independent FMA chains to hide their latency. */
    for (int32_t j = lo; j <= pos;) {
        const int32_t blk = j / block_size, last = (blk + 1) * block_size - 1 < pos ? (blk + 1) * block_size - 1 : pos;
        const int64_t vr = table[blk] * stride_block + (j - blk * block_size) * stride_slot;
        const float *w = scores + (j - lo);
        if (last < pos) prefetch_block(v, table[blk + 1] * stride_block, stride_slot, block_size, D, BF16);
        for (int g0 = 0; g0 < G; g0 += 8) {
            const int GB = G - g0 < 8 ? G - g0 : 8;
            const int CH = GB == 8 || (D / 8) % (8 / GB) ? 1 : 8 / GB;
            for (int c = 0; c < D / 8; c += CH) {
                v8 a[8][8];
                for (int g = 0; g < GB; g++)
                    for (int u = 0; u < CH; u++) a[g][u] = acc[g0 + g][c + u];
                for (int32_t i = 0; i <= last - j; i++) {
                    v8 x[8];
                    for (int u = 0; u < CH; u++) x[u] = load8_kv(v, vr + i * stride_slot + 8 * (c + u), BF16);
                    for (int g = 0; g < GB; g++)
                        for (int u = 0; u < CH; u++) a[g][u] += w[(g0 + g) * n + i] * x[u];
                }
                for (int g = 0; g < GB; g++)
                    for (int u = 0; u < CH; u++) acc[g0 + g][c + u] = a[g][u];
            }
        }
        j = last + 1;
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < D / 8; c++) store8(o + g * o_stride_h + 8 * c, acc[g][c]);
}

/* The common shapes, fully specialised; any other (G, D) with D % 8 == 0 takes the generic
 * instance. */
#define SPECIALISED(X) X(1, 64) X(2, 64) X(3, 64) X(4, 64) X(5, 64) X(6, 64) X(7, 64) X(8, 64) \
                       X(1, 128) X(2, 128) X(3, 128) X(4, 128) X(5, 128) X(6, 128) X(7, 128) X(8, 128)
#define ATTEND_ARGS qh, q_stride_h, k, v, stride_block, stride_slot, table, block_size, lo, pos, scale, scores, o, out_stride_h
#define CASE(GG, DD) case GG * 1024 + DD: \
    if (kv_bf16) attend(ATTEND_ARGS, GG, DD, 1); else attend(ATTEND_ARGS, GG, DD, 0); break;

int tpserve_paged_attention(
    const float *q, int64_t q_stride_t, int64_t q_stride_g, int64_t q_stride_h,
    const void *k_cache, const void *v_cache, int32_t kv_bf16,
    int64_t kv_stride_block, int64_t kv_stride_slot, int64_t kv_stride_head,
    float *out, int64_t out_stride_t, int64_t out_stride_h,
    const int32_t *cu_seqlens_q, const int32_t *context_lens,
    const int32_t *block_tables, int64_t table_stride, int64_t table_width,
    int32_t num_rows, int32_t num_blocks, int32_t num_seqs, int32_t num_kv_heads, int32_t heads_per_group, int32_t head_dim,
    int32_t block_size, float scale, int32_t window_left)
{
    const int32_t t = num_rows, G = heads_per_group, D = head_dim;
    const int64_t stride_block = kv_stride_block, stride_slot = kv_stride_slot;
    if (cu_seqlens_q[0] != 0 || cu_seqlens_q[num_seqs] > t) return ERR_SEQLENS;  /* rows past it: padding */
    for (int32_t s = 0; s < num_seqs; s++)
        if (cu_seqlens_q[s + 1] < cu_seqlens_q[s]) return ERR_SEQLENS;
    int32_t *row_seq = malloc(sizeof(int32_t) * (t > 0 ? t : 1));
    if (!row_seq) return ERR_ALLOC;
    for (int32_t r = 0; r < t; r++) row_seq[r] = -1;
    int32_t max_keys = 1;
    for (int32_t s = 0; s < num_seqs; s++) {
        const int32_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s], ctx = context_lens[s];
        if (q_len > ctx) { free(row_seq); return ERR_QUERIES; }
        const int32_t keys = window_left >= 0 && (int64_t)window_left + 1 < ctx ? window_left + 1 : ctx;
        if (keys > max_keys) max_keys = keys;
        for (int32_t r = cu_seqlens_q[s]; r < cu_seqlens_q[s + 1]; r++)
            row_seq[r] = s;
    }

    int err = OK;
    const int64_t items = (int64_t)t * num_kv_heads;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * G * max_keys);  /* [G][keys] */
        if (!scores) {
#pragma omp atomic write
            err = ERR_ALLOC;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < items; it++) {
            const int32_t r = (int32_t)(it / num_kv_heads), h = (int32_t)(it % num_kv_heads);
            const int32_t s = row_seq[r];
            if (s < 0 || !scores) continue;
            const int32_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
            const int32_t pos = context_lens[s] - q_len + (r - cu_seqlens_q[s]);
            const int32_t lo = window_left >= 0 && pos - window_left > 0 ? pos - window_left : 0;
            const int32_t *table = block_tables + (int64_t)s * table_stride;
            int bad = 0;
            bad |= pos / block_size >= table_width;  /* a context longer than its table */
            for (int32_t blk = lo / block_size; blk <= pos / block_size && !bad; blk++)
                bad |= table[blk] < 0 || table[blk] >= num_blocks;
            if (bad) {
#pragma omp atomic write
                err = ERR_BLOCK;
                continue;
            }
            const float *qh = q + (int64_t)r * q_stride_t + (int64_t)h * q_stride_g;
            const int size = kv_bf16 ? 2 : 4;
            const void *k = (const char *)k_cache + (int64_t)h * kv_stride_head * size;
            const void *v = (const char *)v_cache + (int64_t)h * kv_stride_head * size;
            float *o = out + (int64_t)r * out_stride_t + (int64_t)h * G * out_stride_h;
            switch (G * 1024 + D) {
                SPECIALISED(CASE)
                default:
                    if (kv_bf16) attend(ATTEND_ARGS, G, D, 1); else attend(ATTEND_ARGS, G, D, 0);
            }
        }
        free(scores);
    }
    free(row_seq);
    return err;
}
