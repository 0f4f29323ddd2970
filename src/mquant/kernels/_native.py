"""Loads the C kernels (csrc/) with ctypes.

Where the library comes from, in order:
1. ``mquant/kernels/_qgemm*.so`` built by ``setup.py`` at ``pip install`` time (plain C, no torch
   headers needed, so it builds in a clean CI environment);
2. otherwise a one-time build with the system C compiler into a cache directory
   (``$MQUANT_CACHE_DIR`` or ``~/.cache/mquant``), keyed by a hash of the sources and flags;
3. otherwise nothing: `lib()` returns None and callers select the pure-PyTorch backends.
``MQUANT_NATIVE=0`` disables the native library (tests use it to prove the fallback selection).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch  # loads torch's libgomp first, so the library's OpenMP calls share that runtime

ABI_VERSION = 3
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512_vnni"}
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("qgemm_api.c", "qgemm_hadamard.c", "qgemm_scalar.c", "qgemm_avx512.c", "qgemm_avx2.c")
# -ffp-contract=off: the float epilogue must round the same at every ISA level and in the torch
# fallback (an FMA would skip one rounding).
CFLAGS = ["-O3", "-std=c11", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]
OPENMP_FLAGS = ["-fopenmp"]

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    dll.mq_abi_version.restype = _I32
    dll.mq_isa.restype = _I32
    dll.mq_has_openmp.restype = _I32
    dll.mq_quantize.restype = _I32
    dll.mq_quantize.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I32]
    dll.mq_linear_argv.restype = _I32
    dll.mq_linear_argv.argtypes = [_P]
    dll.mq_linear_ex_argv.restype = _I32
    dll.mq_linear_ex_argv.argtypes = [_P]
    dll.mq_hadamard_rows.restype = _I32
    dll.mq_hadamard_rows.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _I32]
    return dll


def _try_load(path: Path) -> ctypes.CDLL | None:
    try:
        dll = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):
        return None
    return dll if dll.mq_abi_version() == ABI_VERSION else None


def _cache_dir() -> Path:
    root = os.environ.get("MQUANT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mquant")
    return Path(root) / "kernels"


def _compile(compiler: str, out: Path, openmp: bool) -> bool:
    srcs = [str(CSRC / s) for s in SOURCES]
    cmd = [compiler, *CFLAGS, *(OPENMP_FLAGS if openmp else []), "-shared", *srcs, "-o", str(out), "-lm"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _jit_build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or not all((CSRC / s).exists() for s in SOURCES):
        return None
    digest = hashlib.sha256(" ".join([compiler, *CFLAGS]).encode())
    for name in (*SOURCES, "qgemm.h"):
        digest.update((CSRC / name).read_bytes())
    target = _cache_dir() / f"libmqgemm-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        if not (_compile(compiler, built, True) or _compile(compiler, built, False)):
            return None
        os.replace(built, target)  # atomic: concurrent first uses never see a half-written file
    return target


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be built or is disabled."""
    if os.environ.get("MQUANT_NATIVE", "1") == "0":
        return None
    for path in sorted(Path(__file__).parent.glob("_qgemm*.so")):
        dll = _try_load(path)
        if dll is not None:
            return dll
    built = _jit_build()
    return _try_load(built) if built is not None else None


def isa() -> int:
    """Best ISA level of the loaded library on this CPU (-1 when there is no library)."""
    dll = lib()
    return -1 if dll is None else int(dll.mq_isa())


def scale_pointer(scale: float | torch.Tensor | None) -> tuple[object, int | None, int]:
    """(keep-alive object, pointer, row stride) for a per-tensor float, a float32 [M] tensor, or
    None (dynamic)."""
    if scale is None:
        return None, None, 0
    if isinstance(scale, float):
        box = ctypes.c_float(scale)
        return box, ctypes.addressof(box), 0
    return scale, scale.data_ptr(), 1


def num_threads() -> int:
    return max(1, torch.get_num_threads())
