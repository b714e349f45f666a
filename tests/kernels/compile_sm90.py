"""Compile every kernel for an H100 (sm_90) without a GPU, with the launchers' GPU block sizes.

Run by test_compile_for_gpu.py in a process of its own (the kernels must not be interpreted);
Triton's wheel ships ptxas, so this catches what the interpreter cannot: `tl.dot` shape rules,
type errors in compiled control flow, tiles that overflow shared memory. Prints one JSON line
per kernel: {"kernel", "shared"}.
"""

from __future__ import annotations

import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpserve.kernels import attention as A
from tpserve.kernels import kv_cache as K
from tpserve.kernels import rope as R

CUDA = torch.device("cuda")  # only read by the config functions; nothing touches a device


def compile_one(fn, types: dict[str, str], constants: dict, num_warps: int = 4, num_stages: int = 2) -> None:
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    src = ASTSource(fn, signature, constexprs=constants)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    print(json.dumps({"kernel": fn.__name__, "constants": str(constants), "shared": kernel.metadata.shared}), flush=True)


def main() -> None:
    dt, d, hpg = "*bf16", 128, 5  # an odd group size, so row padding is compiled too
    i32 = "i32"
    compile_one(R._rope_kernel, dict(qkv_ptr=dt, stride_t=i32, stride_g=i32, stride_h=i32, pos_ptr="*i64", cos_ptr="*fp32",
                                     sin_ptr="*fp32", stride_p=i32, num_tokens=i32, num_rot_heads=i32),
                dict(ROT_HEADS_PER_GROUP=hpg + 1, HALF_R=32, INTERLEAVED=True, BLOCK_T=4, BLOCK_H=16, BLOCK_R=32))
    compile_one(K._store_kv_kernel, dict(key_ptr=dt, value_ptr=dt, stride_kt=i32, stride_kg=i32, stride_vt=i32, stride_vg=i32,
                                         k_cache_ptr=dt, v_cache_ptr=dt, stride_cs=i32, stride_cg=i32, slot_ptr="*i64",
                                         num_tokens=i32),
                dict(G=8, D=d, BLOCK_T=4, BLOCK_G=8, BLOCK_D=d))
    q_and_kv = dict(q_ptr=dt, stride_qt=i32, stride_qg=i32, stride_qh=i32, k_ptr=dt, v_ptr=dt, stride_kt=i32, stride_kg=i32,
                    stride_vt=i32, stride_vg=i32, cu_seqlens_ptr="*i32", context_lens_ptr="*i32", block_tables_ptr="*i32",
                    stride_bt=i32, o_ptr=dt, stride_ot=i32, stride_oh=i32, qk_scale="fp32", window_left=i32)
    # Paged in bf16; the no-cache path in fp32, whose tiles take twice the shared memory.
    for dtype, ptr, paged in ((torch.bfloat16, dt, True), (torch.float32, "*fp32", False)):
        cfg = A._prefill_config(CUDA, d, hpg, dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        types = dict(q_and_kv, num_seqs=i32, q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=ptr)
        compile_one(A._prefill_kernel, types,
                    dict(HEADS_PER_GROUP=hpg, HEAD_DIM=d, PAGE=16, PAGED=paged, USE_WINDOW=True, **cfg), warps, stages)
    cfg = A._decode_config(CUDA, d, hpg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    compile_one(A._decode_kernel, dict(q_and_kv, part_o_ptr="*fp32", part_lse_ptr="*fp32", num_heads=i32),
                dict(NUM_SPLITS=8, HEADS_PER_GROUP=hpg, HEAD_DIM=d, PAGE=16, USE_WINDOW=True, **cfg), warps, stages)
    compile_one(A._merge_splits_kernel, dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", o_ptr=dt, stride_ot=i32,
                                             stride_oh=i32, cu_seqlens_ptr="*i32"),
                dict(NUM_SPLITS=8, HEAD_DIM=d, BLOCK_S=8, BLOCK_D=d))


if __name__ == "__main__":
    main()
