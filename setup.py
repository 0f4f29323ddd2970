"""Build hook for the native integer kernels; all other metadata lives in pyproject.toml.

`mquant.kernels._qgemm` is plain C (csrc/*.c) loaded with ctypes: no Python or torch headers are
needed, so it builds in a clean environment at `pip install` time.  The extension is optional: if
no C compiler is present the install still succeeds, and mquant.kernels then builds the library on
first use (system compiler, cached) or falls back to the pure-PyTorch kernels.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/mquant/kernels/csrc"
SOURCES = [f"{CSRC}/{name}" for name in ("qgemm_api.c", "qgemm_hadamard.c", "qgemm_scalar.c", "qgemm_avx512.c", "qgemm_avx2.c")]
# Keep in sync with mquant/kernels/_native.py (CFLAGS): -ffp-contract=off keeps the float epilogue
# bit-identical across ISA levels and the PyTorch fallback.
CFLAGS = ["-O3", "-std=c11", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]


class BuildExtOpenMP(build_ext):
    """Compile with OpenMP where the compiler has it (2-thread split), without it elsewhere."""

    def build_extension(self, ext):
        base_compile, base_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        if self.compiler.compiler_type == "unix":
            ext.extra_compile_args = base_compile + ["-fopenmp"]
            ext.extra_link_args = base_link + ["-fopenmp"]
            try:
                return super().build_extension(ext)
            except Exception:  # e.g. Apple clang without libomp: build single-threaded instead
                ext.extra_compile_args, ext.extra_link_args = base_compile, base_link
        return super().build_extension(ext)


setup(
    ext_modules=[
        Extension("mquant.kernels._qgemm", sources=SOURCES, depends=[f"{CSRC}/qgemm.h"],
                  extra_compile_args=CFLAGS, libraries=["m"], optional=True)
    ],
    cmdclass={"build_ext": BuildExtOpenMP},
)
