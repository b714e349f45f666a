"""Building and loading the native CPU kernels (C, in kernels/csrc).

The C sources are compiled on first use with the system C compiler, for this machine's CPU
(-march=native), into the user's cache, and loaded with ctypes: no torch headers, so a build
takes a few seconds, and no build step at install. The library's file name is a hash of the
sources, the flags, the compiler's version and the CPU's feature flags, so a changed source or a
different machine sharing the cache never loads a stale or foreign build. Several worker
processes may build at once; each builds in its own temporary folder and renames the library
into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from tpserve.kernels.cpu_info import cache_root, cpu_flags

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("paged_attention_cpu.c", "rope_store_kv_cpu.c", "transpose_cpu.c", "linear_cpu.c")
# Compiling with -ffast-math lets gcc vectorize the reductions and call glibc's vector expf.
# Linking is a separate step without it: gcc links crtfastmath.o into anything linked with
# -ffast-math, and loading that turns on flush-to-zero for the whole process (Python's own
# float("5e-324") then reads 0.0). -fopenmp links libgomp, the same soname torch loads, so
# both share one thread pool; libmvec's vector expf lives in libm.
_COMPILE = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
_LINK = ("-shared", "-fopenmp", "-lm")


class NativeKernelsUnavailable(RuntimeError):
    pass


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NativeKernelsUnavailable("no C compiler found (set CC, or install gcc)")
    return cc


def library() -> ctypes.CDLL:
    """The compiled kernels, built on the first call of a process; NativeKernelsUnavailable
    (with the compiler's or the system's message) where they cannot be built or loaded. A
    failure is found out once per process, not retried on every call."""
    why_not = available()
    if why_not is not None:
        raise NativeKernelsUnavailable(why_not)
    return _build_and_load()


@functools.cache
def available() -> str | None:
    """None where the native kernels load; otherwise why not (found out once per process)."""
    try:
        _build_and_load()
    except NativeKernelsUnavailable as e:
        return str(e)
    except OSError as e:  # an unwritable cache folder, a full disk, an unloadable file
        return f"{type(e).__name__}: {e}"
    return None


@functools.cache
def _build_and_load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise NativeKernelsUnavailable(f"native kernels are built for Linux only, not {platform.system()}")
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeKernelsUnavailable(f"{cc} --version failed: {e}") from e
    sources = [_CSRC / name for name in _SOURCES]
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in sources), " ".join(_COMPILE + _LINK).encode(), version.encode(), " ".join(sorted(cpu_flags())).encode()):
        digest.update(part)
    target = cache_root() / "kernels" / f"tpserve_cpu_{digest.hexdigest()[:16]}.so"
    if target.exists():
        try:
            return _declare(ctypes.CDLL(str(target)))
        except OSError:  # a truncated or foreign file under our name: build it again
            target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [str(Path(tmp) / f"{p.stem}.o") for p in sources]
        for src, obj in zip(sources, objects):
            _run([cc, *_COMPILE, "-o", obj, str(src)])
        _run([cc, "-o", f"{tmp}/lib.so", *objects, *_LINK])
        os.replace(f"{tmp}/lib.so", target)
    return _declare(ctypes.CDLL(str(target)))


def _run(command: list[str]) -> None:
    build = subprocess.run(command, capture_output=True, text=True)
    if build.returncode != 0:
        raise NativeKernelsUnavailable(f"building the CPU kernels failed: {' '.join(command)}\n{build.stderr.strip()}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32, i64, f32, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn = lib.tpserve_paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ptr, i64, i64, i64,  # query, its row, kv-group and head strides
        ptr, ptr, i32, i64, i64, i64,  # k_cache, v_cache, bf16 (else f32), their block, slot and head strides
        ptr, i64, i64,  # out, its row and head strides
        ptr, ptr, ptr, i64, i64,  # cu_seqlens_q, context_lens, block_tables, its row stride and width
        i32, i32, i32,  # num_rows (query rows), num_blocks (of the cache), num_seqs
        i32, i32, i32, i32,  # num_kv_heads, heads_per_group, head_dim, block_size
        f32, i32,  # softmax scale, window_left (-1: none)
    ]
    fn = lib.tpserve_rope_store_kv
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ptr, i64, i64, i64,  # qkv, its token, group and head strides
        ptr, ptr, ptr, i64, i64,  # positions, cos, sin, their row stride, their rows
        i32, i32,  # rot_half (0: no rotation), interleaved
        ptr, ptr, i32, i64, i64,  # k_cache, v_cache, bf16 (else f32), their slot and head strides
        ptr, i64,  # slot_mapping, slots in the cache
        i32, i32, i32, i32,  # num_tokens, num_groups, heads_per_group, head_dim
    ]
    fn = lib.tpserve_transpose_f32
    fn.restype = None
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64]  # src, rows, cols, its row stride, dst, its row stride
    fn = lib.tpserve_linear_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64]  # x, T, K, ldx, w, N, ldw, bias, y, ldy
    return lib
