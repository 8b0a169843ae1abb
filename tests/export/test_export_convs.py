"""The exact convolution rewrite (folded convolutions, fused batch norms, explicit pads), and
the decoder benchmark that times it (benchmarks.decoder_latency), which must see both exports
equal eager PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flowae.export.convs import (
    FoldedConv2d,
    FoldedConvReluPool,
    choose_fold,
    fold_convolutions,
)
from flowae.models import VARIANTS, build_model


@pytest.mark.parametrize(("in_ch", "out_ch", "kernel", "padding", "size", "fold"), [
    (16, 6, 13, 12, 46, (2, 2)),  # the base decoder's third layer
    (6, 3, 19, 18, 82, (4, 4)),  # the base decoder's last layer
    (6, 3, 5, 4, 96, (1, 4)),
    (3, 6, 5, 0, 100, (3, 2)),  # no padding
])
def test_folded_conv_equals_conv(seeded, in_ch, out_ch, kernel, padding, size, fold):
    conv = nn.Conv2d(in_ch, out_ch, kernel, 1, padding).eval()
    x = torch.randn(3, in_ch, size, size)
    expected = conv(x)
    assert expected.shape[-2] % fold[0] == 0 and expected.shape[-1] % fold[1] == 0
    got = FoldedConv2d(conv, fold)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("fold", "window"), [
    ((2, 2), (2, 2)), ((1, 2), (2, 2)), ((2, 1), (2, 2)), ((1, 3), (1, 3)), ((2, 2), (4, 2)),
])
def test_folded_conv_relu_pool_equals_the_three_layers(seeded, fold, window):
    conv = nn.Conv2d(3, 6, 5).eval()
    x = torch.randn(2, 3, 100, 100)  # conv output 96 x 96: every window here divides it
    expected = nn.MaxPool2d(window)(torch.relu(conv(x)))
    got = FoldedConvReluPool(conv, fold, window)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_fold_rejects_strided_conv():
    with pytest.raises(ValueError, match="stride 1"):
        FoldedConv2d(nn.Conv2d(3, 3, 3, stride=2), (2, 2))


@pytest.mark.parametrize(("out_ch", "kernel", "size", "fold"), [
    (16, 13, 34, (2, 1)),  # a second block of 16 channels reuses every input load
    (6, 13, 58, (2, 2)),
    (6, 13, 70, (5, 1)),
    (3, 19, 100, (4, 4)),  # 48 channels: three full blocks
    (64, 3, 8, (1, 1)),  # the classifier: already four blocks
    (5, 3, 97, (1, 1)),  # a prime size cannot be folded
])
def test_choose_fold(out_ch, kernel, size, fold):
    assert choose_fold(out_ch, (kernel, kernel), (size, size)) == fold


@pytest.mark.parametrize(("variant", "part"), [
    ("base", "decoder"), ("bn", "decoder"), ("upsample", "decoder"), ("bn", "encoder"),
])
def test_folded_module_matches(seeded, variant, part):
    model = build_model(VARIANTS[variant])
    for module in model.modules():  # non-trivial batch-norm statistics to fuse
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()
    module = getattr(model, part)
    shape = model.latent_shape() if part == "decoder" else (3, 100, 100)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rewritten = fold_convolutions(module, shape)
    assert any(isinstance(m, FoldedConv2d) for m in rewritten.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rewritten.modules())
    if part == "encoder":  # both conv + ReLU + 2x2 pool blocks fold into their pools
        assert [type(m) for m in rewritten] == [FoldedConvReluPool, FoldedConvReluPool]
    x = torch.rand(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), nn.Sequential.forward(module, x), atol=1e-5,
                                   rtol=0)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original was modified"


def test_fold_needs_eval_mode():
    model = build_model(VARIANTS["bn"]).train()
    with pytest.raises(ValueError, match="eval-mode"):
        fold_convolutions(model.decoder, model.latent_shape())


def test_explicit_pads_go_in_front_of_full_convolutions_only():
    """A convolution padded wider than "same" gets a Pad node; a "same" one keeps its own
    padding. Both graphs compute the same outputs in onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from flowae.export.onnx_export import with_explicit_pads

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["same"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("Conv", ["same", "w2"], ["y"], pads=[2, 2, 2, 2])]  # full
    graph = helper.make_graph(
        nodes, "pads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    rewritten = with_explicit_pads(proto)
    onnx.checker.check_model(rewritten, full_check=True)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Pad", "Conv"]
    pads = {n.output[0]: list(next(a.ints for a in n.attribute if a.name == "pads"))
            for n in rewritten.graph.node if n.op_type == "Conv"}
    assert pads == {"same": [1, 1, 1, 1], "y": [0, 0, 0, 0]}
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
               .run(None, {"x": x})[0] for m in (proto, rewritten)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_decoder_benchmark_runs_and_sees_equal_outputs():
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "benchmarks.decoder_latency", "--variant",
                           "upsample", "--threads", "1", "--rounds", "1"], cwd=repo,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1
    diffs = [float(v) for v in rows[0].rstrip(" |").split("|")[-1].split(",")]
    assert len(diffs) == 2 and max(diffs) <= 1e-4  # both exports equal eager
