"""Resumable calibration: each finished block's quantized state on disk, reloaded after a crash.

Layout of a checkpoint directory:
  manifest.json                 format, version, the run's key, finished block ids in order
  <part>-<index>.safetensors    one finished block: its whole state (QuantLinear codes — int8,
                                4-bit codes unpacked —, w_scale, act_scale, bias, rms_w0, and the
                                float norms a pre-quantization hook such as SmoothQuant edited),
                                with the layers' settings and report records as JSON metadata
Only safetensors and JSON are read back: nothing is unpickled.

Why inputs are not saved: the next block's inputs are recomputed on resume by running the restored
(quantized) blocks forward, once each — a forward pass is cheap next to calibration (statistics,
Hessians, GPTQ), while the activations of a 72B model's calibration set are gigabytes per block.
The recomputation is the same computation the uninterrupted run did, so the result is identical.

The key hashes the recipe, the calibration samples and a fingerprint of the float model; a
directory written for another key is refused rather than mixed into this run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mquant.calib.report import LayerRecord
from mquant.core.qlinear import QuantLinear
from mquant.errors import CheckpointError, ResourceError

FORMAT = "mquant-calibration-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SAMPLE = 256  # values per tensor in the model fingerprint


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor, sample: bool) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    flat = t.detach().reshape(-1)
    if sample and flat.numel() > _SAMPLE:
        flat = flat[:: flat.numel() // _SAMPLE]
    h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def run_key(recipe: Any, samples: Sequence[dict], model: nn.Module) -> str:
    """Hash of what determines the calibration result. Samples are hashed in full (they are small);
    model tensors by name, shape and a strided sample of their values (hashing every weight of a
    72B model would take minutes)."""
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    for i, sample in enumerate(samples):
        for key in sorted(sample):
            value = sample[key]
            if isinstance(value, torch.Tensor):
                _update_tensor(h, f"sample{i}.{key}", value, sample=False)
            else:
                h.update(f"sample{i}.{key}={value!r}".encode())
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":  # offloaded (calib/offload.py): identity by name and shape only
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        else:
            _update_tensor(h, name, tensor, sample=True)
    return h.hexdigest()


def open_checkpoint(directory: str | Path | None, recipe: Any, samples: Sequence[dict], model: nn.Module) -> "CalibrationCheckpoint | None":
    """The checkpoint for this run in `directory` (None: no checkpointing). Call it on the float
    model, before any transform, so the key identifies the run's inputs."""
    return None if directory is None else CalibrationCheckpoint(directory, run_key(recipe, samples, model))


def _owned_modules(block: Any) -> list[tuple[str, nn.Module]]:
    """The block module plus spec-referenced modules outside it (e.g. a norm before a projector)
    that calibration may edit."""
    inside = {id(m) for m in block.module.modules()}
    owned: list[tuple[str, nn.Module]] = [("block.", block.module)]
    refs = [n.module for n in (*getattr(block, "norms", ()), *getattr(block, "post_norms", ()))]
    refs += [n.module for n in [getattr(block, "norm", None)] if n is not None]
    refs += [ref.module for ref in block.linears()]
    for module in refs:
        if id(module) not in inside:
            inside.update(id(m) for m in module.modules())
            owned.append((f"extra{len(owned)}.", module))
    return owned


class CalibrationCheckpoint:
    """Save/restore finished blocks of one calibration run in `directory`."""

    def __init__(self, directory: str | Path, key: str) -> None:
        self.directory = Path(directory)
        self.key = key
        self.finished: list[str] = []
        manifest = self.directory / MANIFEST
        if manifest.exists():
            data = _read_json(manifest)
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
                raise CheckpointError(f"{manifest} is not a version-{VERSION} calibration checkpoint; delete {self.directory} or pick another checkpoint_dir")
            if data.get("key") != key:
                raise CheckpointError(f"{self.directory} holds a checkpoint of another model, recipe or calibration set; "
                                      "delete it or pick another checkpoint_dir")
            finished = data.get("finished")
            if not isinstance(finished, list) or not all(isinstance(b, str) for b in finished):
                raise CheckpointError(f"{manifest} is damaged; delete {self.directory} to start over")
            self.finished = finished
        else:
            self._guard(lambda: self.directory.mkdir(parents=True, exist_ok=True))

    def has(self, block_id: str) -> bool:
        return block_id in self.finished

    def save_block(self, block_id: str, block: Any, records: list[LayerRecord]) -> None:
        """Write the block file, then the manifest (both by atomic rename): a crash at any point
        leaves either the previous or the new consistent state."""
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {}
        for prefix, module in _owned_modules(block):
            for key, value in module.state_dict().items():
                tensors[prefix + key] = value.detach().contiguous().clone()
            for name, sub in module.named_modules():
                if isinstance(sub, QuantLinear) and sub.quantized:
                    layers[prefix + name] = sub.quant_settings()
        metadata = {"layers": json.dumps(layers), "records": json.dumps([asdict(r) for r in records])}
        path = self.directory / f"{block_id}.safetensors"
        self._guard(lambda: _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)))
        self.finished.append(block_id)
        manifest = {"format": FORMAT, "version": VERSION, "key": self.key, "finished": self.finished}
        self._guard(lambda: _atomic_write(self.directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1))))

    def load_block(self, block_id: str, block: Any) -> list[LayerRecord]:
        """Put a finished block's quantized state back; returns its report records."""
        path = self.directory / f"{block_id}.safetensors"
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            layers = json.loads(metadata["layers"])
            records = [LayerRecord(**r) for r in json.loads(metadata["records"])]
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is missing or damaged ({exc}); delete {self.directory} to start over") from exc
        for prefix, module in _owned_modules(block):
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self._restore(module, prefix, own, layers, path)
        return records

    @staticmethod
    def _restore(module: nn.Module, prefix: str, state: dict[str, torch.Tensor], layers: dict[str, Any], path: Path) -> None:
        for name, sub in module.named_modules():
            info = layers.get(prefix + name)
            if info is None or not isinstance(sub, QuantLinear):
                continue
            sub.restore_quantized(info, lambda leaf, name=name: state.get(f"{name}.{leaf}"))
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit this model's block; delete the checkpoint directory to start over") from exc

    def _guard(self, action) -> None:
        try:
            action()
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise ResourceError(f"disk full while writing the calibration checkpoint in {self.directory}; free space or pick another checkpoint_dir") from exc
            raise CheckpointError(f"cannot write the calibration checkpoint in {self.directory} ({exc.strerror}); pick a writable checkpoint_dir") from exc


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete its directory to start over") from exc
