"""Quantize a Qwen2-VL checkpoint in a child process whose private memory is capped by the kernel.

`start(mode, ...)` runs `python -m mquant.testing.capped`: the child reads the checkpoint's config,
builds the calibration samples, then caps RLIMIT_DATA (heap, anonymous and
private writable mappings — every torch CPU allocation) at `budget` bytes above its own baseline and

* "in-memory": loads the whole float model and runs `api.quantize`;
* "offloaded": runs `api.quantize_offloaded` on the model opened offloaded before the cap;
* "write": writes the seeded random checkpoint of the config (`testing.shapes`, 4 MB shards);

and writes a JSON result: ok / the error, and for offloaded runs SHA-256s of the logits on a fixed
batch and of every QuantLinear's codes and scales, to compare with an unconstrained run
(`digest_layers`, `digest_logits`). glibc's malloc is pinned to mmap every allocation >= 128 KiB
and return freed memory at once, so the accounting follows live tensors, not allocator history.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from mquant.api import quantize, quantize_offloaded
from mquant.calib.offload import load_offloaded, uncached_dequant
from mquant.config import recipe_for
from mquant.core.swap import quant_linears
from mquant.testing.shapes import meta_model, mrope_layout, write_random_checkpoint
from mquant.testing.tiny.qwen2_vl import build_mrope_batch

ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1",
       "MKL_DISABLE_FAST_MM": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def samples_and_batch(model: nn.Module, config) -> tuple[list[dict], dict]:
    """Two one-image calibration samples and a two-row evaluation batch (one row text only)."""
    layout = mrope_layout(config)
    samples = [build_mrope_batch(model, layout, 1, i, False, False) for i in range(2)]
    return samples, build_mrope_batch(model, layout, 2, 50, True, False)


def digest_layers(model: nn.Module) -> dict[str, str]:
    def digest(m) -> str:
        parts = [t for t in (m.qweight, m.w_scale, m.act_scale, m.bias, m.rms_w0) if t is not None]
        return hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts)).hexdigest()

    return {name: digest(m) for name, m in quant_linears(model).items()}


def digest_logits(model: nn.Module, batch: dict) -> str:
    with torch.no_grad(), uncached_dequant(model):
        return hashlib.sha256(model(**batch).logits.numpy().tobytes()).hexdigest()


def vmdata() -> int:
    """This process's private data bytes (VmData: what RLIMIT_DATA counts)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))


def cap_private_memory(budget: int) -> int:
    """Cap RLIMIT_DATA at `budget` bytes above what this process holds now; returns that baseline."""
    base = vmdata()
    resource.setrlimit(resource.RLIMIT_DATA, (base + budget, base + budget))
    return base


def _run(mode: str, model_dir: Path, work: Path, budget: int, method: str, scheme: str) -> dict:
    # lazy: transformers' model/auto classes take seconds to import (the cap is set after imports)
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(model_dir)
    samples, batch = samples_and_batch(meta_model(config, torch.float32), config)
    recipe = recipe_for(method, scheme)
    # Opening offloaded maps nothing for good (the later reads are plain reads): done before the cap.
    model = load_offloaded(model_dir, offload_folder=work / "off", attn_implementation="eager") if mode == "offloaded" else None
    base = cap_private_memory(budget)
    result: dict = {}
    try:
        if mode == "in-memory":
            full = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
            quantize(full, recipe, samples)
        elif mode == "write":
            write_random_checkpoint(config, work / "written", dtype=torch.float32, shard_bytes=4 << 20)
        else:
            _, session = quantize_offloaded(model, recipe, samples)
            result.update(logits=digest_logits(model, batch), layers=digest_layers(model), loaded_bytes=session.loaded_bytes)
        result["ok"] = True
    except (MemoryError, RuntimeError) as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    result["peak_bytes"] = vmdata() - base  # at the end: what the finished run still holds
    return result


def start(mode: str, model_dir: Path, work: Path, budget: int, method: str, scheme: str) -> subprocess.Popen:
    """The child for one `mode`; its result lands in work/result.json (see `read_result`)."""
    work.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "mquant.testing.capped", mode, str(model_dir), str(work), str(budget), method, scheme]
    return subprocess.Popen(args, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_result(proc: subprocess.Popen, work: Path, timeout: float = 300) -> dict:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"capped child failed:\n{err.decode()[-2000:]}")
    return json.loads((work / "result.json").read_text())


if __name__ == "__main__":
    mode, model_dir, work, budget, method, scheme = sys.argv[1:7]
    out = _run(mode, Path(model_dir), Path(work), int(budget), method, scheme)
    (Path(work) / "result.json").write_text(json.dumps(out))


OUT_OF_MEMORY = ("allocate memory", "Cannot allocate memory", "can't start new thread")


def assert_only_streaming_fits(in_memory: dict, offloaded: dict, reference: nn.Module, batch: dict) -> None:
    """The budget bites: the fully loaded run failed for memory, the offloaded one succeeded with the
    unconstrained reference's quantized layers and logits, bit for bit."""
    assert not in_memory["ok"], "the budget does not bite: quantizing the fully loaded model fit in it"
    assert any(s in in_memory["error"] for s in OUT_OF_MEMORY), in_memory
    assert offloaded["ok"], offloaded.get("error")
    assert offloaded["layers"] == digest_layers(reference)
    assert offloaded["logits"] == digest_logits(reference, batch)
