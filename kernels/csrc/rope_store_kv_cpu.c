/* RoPE and the KV-cache store on the CPU, in one pass over the fused QKV tensor: the
 * semantics of kernels/rope.py's rope_reference followed by kernels/kv_cache.py's
 * store_kv_reference, done in place as the Triton backend does them. qkv is float32; the
 * cache is float32 or bfloat16 (kv_bf16: rounded to nearest even, as torch converts).
 *
 * qkv is [t, g, heads_per_group + 2, d] (per group: its query heads, its key head, its value
 * head). Each token's query and key heads are rotated in place by the angles of its position;
 * dims past 2 * rot_half pass through. Then its key and value heads are copied to the cache at
 * its slot (-1: not stored). Tokens are shared among the OpenMP threads (the libgomp torch
 * loaded; see paged_attention_cpu.c).
 */
#include <stdint.h>
#include <string.h>

enum { OK = 0, ERR_POSITION = 1, ERR_SLOT = 2 };

static inline uint16_t bf16_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* a NaN stays one */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

int tpserve_rope_store_kv(
    float *qkv, int64_t stride_t, int64_t stride_g, int64_t stride_h,
    const int64_t *positions, const float *cos_cache, const float *sin_cache, int64_t stride_p,
    int64_t num_positions, int32_t rot_half, int32_t interleaved,
    void *k_cache, void *v_cache, int32_t kv_bf16, int64_t cache_stride_slot, int64_t cache_stride_head,
    const int64_t *slot_mapping, int64_t num_slots,
    int32_t num_tokens, int32_t num_groups, int32_t heads_per_group, int32_t head_dim)
{
    int err = OK;
#pragma omp parallel for schedule(static)
    for (int32_t i = 0; i < num_tokens; i++) {
        const int64_t pos = positions[i], slot = slot_mapping[i];
        if (rot_half > 0 && (pos < 0 || pos >= num_positions)) {
#pragma omp atomic write
            err = ERR_POSITION;
            continue;
        }
        if (slot >= num_slots) {
#pragma omp atomic write
            err = ERR_SLOT;
            continue;
        }
        const float *cos = cos_cache + pos * stride_p, *sin = sin_cache + pos * stride_p;
        for (int32_t grp = 0; grp < num_groups; grp++) {
            float *group = qkv + i * stride_t + grp * stride_g;
            /* the group's query heads and its key head */
            for (int32_t h = 0; h <= heads_per_group && rot_half > 0; h++) {
                float *x = group + h * stride_h;
                if (interleaved) {
                    for (int32_t j = 0; j < rot_half; j++) {
                        const float x1 = x[2 * j], x2 = x[2 * j + 1];
                        x[2 * j] = x1 * cos[j] - x2 * sin[j];
                        x[2 * j + 1] = x2 * cos[j] + x1 * sin[j];
                    }
                } else {
                    for (int32_t j = 0; j < rot_half; j++) {
                        const float x1 = x[j], x2 = x[j + rot_half];
                        x[j] = x1 * cos[j] - x2 * sin[j];
                        x[j + rot_half] = x2 * cos[j] + x1 * sin[j];
                    }
                }
            }
            if (slot < 0) continue;
            const float *k = group + heads_per_group * stride_h, *v = k + stride_h;
            const int64_t at = slot * cache_stride_slot + grp * cache_stride_head;
            if (kv_bf16) {
                uint16_t *kc = (uint16_t *)k_cache + at, *vc = (uint16_t *)v_cache + at;
                for (int32_t e = 0; e < head_dim; e++) {
                    kc[e] = bf16_from_f32(k[e]);
                    vc[e] = bf16_from_f32(v[e]);
                }
            } else {
                float *kc = (float *)k_cache + at, *vc = (float *)v_cache + at;
                for (int32_t e = 0; e < head_dim; e++) {
                    kc[e] = k[e];
                    vc[e] = v[e];
                }
            }
        }
    }
    return err;
}
