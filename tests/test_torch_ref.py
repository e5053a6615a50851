"""The zoo against torchvision itself (skipped where torch/torchvision are not installed).

Loads the zoo's weights into ``torchvision.models.<name>()`` by state_dict key and compares with
onnxruntime on the zoo's ONNX: the architectures and the names must both match for this to pass.
"""
from __future__ import annotations

import pytest

from escort_tvm import zoo
from _helpers import assert_close, ort_reference, randn

pytest.importorskip("torchvision")


@pytest.mark.parametrize("name,size", [("alexnet", 64), ("vgg16", 32), ("resnet50", 64), ("googlenet", 37),
                                       ("resnet50", 224), ("googlenet", 224), ("alexnet", 224)])
def test_zoo_equals_torchvision_with_same_weights(name, size, rng):
    from escort_tvm.torch_ref import torch_for_onnx

    model = zoo.build(name, batch=2, image_size=size, sparsity=0.9, seed=3)
    x = randn(rng, (2, 3, size, size))
    ref = ort_reference(model, {"input": x})
    y = torch_for_onnx(model, "cpu").run(x)
    assert_close(y, ref)
    assert_close(y - y.mean(0), ref - ref.mean(0))


def test_wrong_names_are_refused():
    from escort_tvm.torch_ref import torchvision_model

    w = zoo.weights("resnet50", num_classes=10)
    w["fc.weight_typo"] = w.pop("fc.weight")
    with pytest.raises(ValueError, match=r"missing \['fc.weight'\], unexpected \['fc.weight_typo'\]"):
        torchvision_model("resnet50", w, num_classes=10)
    w = zoo.weights("resnet50", num_classes=10)
    with pytest.raises(ValueError, match="fc.weight: shape"):
        torchvision_model("resnet50", w, num_classes=7)
