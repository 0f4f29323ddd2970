"""Build every Triton kernel variant the backend launches for Hopper (sm_90a) on a machine without a
GPU, and read its registers, stack (spills) and shared memory from the cubin.

Why: the CPU interpreter runs the kernels' arithmetic but not the GPU compiler, so it cannot see a
kernel that fails to build for sm_90, spills registers or loses cp.async pipelining.  Triton
compiles ahead of time with no driver; cuobjdump (shipped in the triton wheel) reads the cubin.
Integer arguments and pointers are marked 16-divisible, as Triton specializes them at launch for
the shapes we run (every Qwen2-VL dimension is a multiple of 16).

    python benchmarks/gpu/compile_check.py [--json PATH]   # exit 1 if a variant fails or spills
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: must hold before triton is imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mquant.kernels import _triton_jit as J  # noqa: E402
from mquant.kernels.triton_gpu import TILE_TABLE  # noqa: E402
from mquant.kernels.triton_prologue import ABSMAX_BLOCK, HADAMARD_TILES, QUANTIZE_TILES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DIV16 = {"K", "N", "n", "C", "stride_x"}
MAX_STACK = 256  # bytes of spill tolerated (a few registers); more means a tile config to shrink
SMEM_LIMIT = 227 * 1024


def _types(x: str, w: str, out: str) -> dict[str, str]:
    return {"x_ptr": x, "w_ptr": w, "ws_ptr": "*fp32", "s_ptr": "*fp32", "s0": "fp32", "s1": "fp32",
            "bias_ptr": "*fp32", "ra_ptr": "*fp32", "rb_ptr": "*fp32", "y_ptr": out, "hc_ptr": "*fp32",
            "out_ptr": "*i8", "x0_ptr": "*fp32", "inv_sqrt_n": "fp32", "q_ptr": "*i8"}


def build(fn, types: dict[str, str], consts: dict, warps: int, stages: int) -> dict:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (sig[n].startswith("*") or n in DIV16)}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                              options={"num_warps": warps, "num_stages": stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {"kernel": fn.fn.__name__, "x": types["x_ptr"][1:], "consts": {k: v for k, v in consts.items() if k.isupper()}, "warps": warps,
            "stages": stages, "regs": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1)),
            "smem": compiled.metadata.shared, "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none",
            "cp_async": "cp.async" in ptx, "seconds": round(time.perf_counter() - start, 2)}


def variants():
    gemm = dict(X_CODES=False, SCALE_PTR=False, ZERO_COL0=False, HAS_BIAS=True, HAS_RANK1=True, GROUP_M=8)
    for (bits, per_group), tiles in TILE_TABLE.items():
        for regime, t in zip(("decode", "mid", "prefill"), tiles):
            dtypes = ("*fp16", "*fp32") if regime == "prefill" and not per_group else ("*fp16",)
            for x in dtypes:
                consts = dict(gemm, W4=bits == 4, PER_GROUP=per_group, BM=t.bm, BN=t.bn, BK=t.bk)
                yield build, (J.qgemm_kernel, _types(x, "*u8" if bits == 4 else "*i8", x), consts, t.warps, t.stages)
        t = tiles[2]
        if not per_group:  # int8 codes from the Hadamard kernel
            consts = dict(gemm, X_CODES=True, W4=bits == 4, PER_GROUP=False, BM=t.bm, BN=t.bn, BK=t.bk)
            yield build, (J.qgemm_kernel, _types("*i8", "*u8" if bits == 4 else "*i8", "*fp16"), consts, t.warps, t.stages)
    h = HADAMARD_TILES
    for x, half in (("*fp16", True), ("*fp32", False)):
        consts = dict(QUANT=True, SCALE_PTR=False, RMS=True, X_HALF=half, BP1=64, LOG_BP1=6, BC=h["BC"], BKC=h["BKC"], PREC="tf32x3")
        yield build, (J.hadamard_kernel, _types(x, "*i8", x), consts, h["warps"], h["stages"])
    yield build, (J.absmax_scale_kernel, _types("*fp16", "*i8", "*fp16"), dict(ZERO_COL0=True, BLOCK=ABSMAX_BLOCK), 4, 1)
    bm, bk = QUANTIZE_TILES
    yield build, (J.quantize_kernel, _types("*fp16", "*i8", "*fp16"), dict(SCALE_PTR=True, ZERO_COL0=False, BM=bm, BK=bk), 4, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows, failed = [], 0
    for fn, fargs in variants():
        try:
            row = fn(*fargs)
            row["ok"] = 0 <= row["stack"] <= MAX_STACK and row["smem"] <= SMEM_LIMIT and row["mma"] != "none" if \
                row["kernel"] in ("qgemm_kernel", "hadamard_kernel") else row["stack"] == 0
        except Exception as exc:  # a compile error is a result here, reported with its variant
            row = {"kernel": fargs[0].fn.__name__, "consts": fargs[2], "ok": False, "error": repr(exc)[:300]}
        failed += not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90a", "triton": triton.__version__, "rows": rows}, f, indent=1)
    print(f"{len(rows) - failed}/{len(rows)} variants build for sm_90a within {MAX_STACK} bytes of spill", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
