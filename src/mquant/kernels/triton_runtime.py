"""Loading the Triton kernels (_triton_jit.py) and where they run: shared by triton_prologue.py
and triton_gpu.py.  triton is optional: nothing here imports it until a kernel is first needed,
and without it `device_types()` is empty, so the backend reports itself unavailable."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

import torch

from mquant.errors import ConfigError, InputError

_JIT = "mquant.kernels._triton_jit"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "on", "yes")


# ---- loading ---------------------------------------------------------------------------------
def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None: treated as absent
        return False


def interpreting() -> bool:
    """Whether the kernels run (or, not yet loaded, would run) under Triton's CPU interpreter."""
    mod = sys.modules.get(_JIT)
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def load_kernels(interpret: Optional[bool] = None) -> ModuleType:
    """The kernel module, built in interpreter mode or not (default: as TRITON_INTERPRET says).
    Triton fixes the mode when a kernel is decorated, so a mode change re-imports the module;
    tests call `load_kernels(True)` to run the kernels on CPU tensors wherever triton was first
    used.  It leaves TRITON_INTERPRET set for the process (select_backend still never picks
    triton for CPU tensors on its own)."""
    mod = sys.modules.get(_JIT)
    if mod is not None and (interpret is None or mod.INTERPRETED == interpret):
        return mod
    mod = None if interpret and _triton_compiled_mode() else mod
    if not triton_installed():
        raise ConfigError("the triton backend needs triton; pip install triton==3.9.0 (or pick a CPU backend)")
    if interpret is not None:  # stays set: the interpreter also reads it while kernels run
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        if interpret and _triton_compiled_mode():
            _forget_triton()
    # lazy: triton is an optional dependency and picks compiled vs interpreted mode at import
    return importlib.reload(mod) if mod is not None else importlib.import_module(_JIT)


def _triton_compiled_mode() -> bool:
    """Whether triton was already imported in compiled mode: its own jit helpers (tl.sum, tl.cdiv)
    were then decorated as GPU functions, which the interpreter cannot call."""
    lang = sys.modules.get("triton.language.standard")
    return lang is not None and type(lang.sum).__name__ == "JITFunction"


def _forget_triton() -> None:
    """Drop triton's modules so the next import rebuilds them in interpreter mode (CPU tests after
    something else, e.g. transformers, imported triton; objects already created keep the old copy)."""
    for name in [n for n in sys.modules if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C")
                 or n == _JIT]:
        del sys.modules[name]


def device_types() -> tuple[str, ...]:
    """Tensor device types the kernels take here: CUDA when compiled, CPU when interpreted."""
    if not triton_installed():
        return ()
    if interpreting():
        return ("cpu",)
    return ("cuda",) if torch.cuda.is_available() else ()


def device_check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.device != w.device:
        raise InputError(f"activation is on {x.device} but the prepared weight on {w.device}; move the model or input to one device")
    if x.device.type not in device_types():
        raise ConfigError(f"triton kernels run on {device_types() or 'no'} tensors here, not {x.device.type}; "
                          "use a CUDA device, or TRITON_INTERPRET=1 (load_kernels(True)) for CPU tests")


def jit() -> ModuleType:
    return load_kernels()


def vec(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).to(torch.float32).contiguous()


def float_input(x: torch.Tensor, k_in: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k_in:
        raise InputError(f"activation of shape {tuple(x.shape)} does not match the weight's {k_in} input features")
    x = x if x.dtype in FLOATS else x.float()
    return x if x.is_contiguous() else x.contiguous()



def f32(v: float) -> float:
    """v rounded to the float32 a kernel receives (what torch's float32 scale tensors hold)."""
    return ctypes.c_float(v).value
