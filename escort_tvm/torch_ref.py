"""PyTorch reference for zoo models: torchvision's own network with the zoo's weights, loaded by name.

Only for models made by ``escort_tvm.zoo`` (their ONNX metadata names the architecture, and their
initializers carry torchvision state_dict keys); fp32 with TF32 off, so cuDNN computes in full fp32.
Imports torch lazily; raises TorchUnavailable (with the reason) where it cannot be used.
"""
from __future__ import annotations

import time

import numpy as np


class TorchUnavailable(Exception):
    pass


def zoo_meta(model) -> dict:
    """The zoo arguments recorded in an ONNX model's metadata ({} for other models)."""
    pre = "escort_tvm.zoo."
    return {p.key[len(pre):]: p.value for p in model.metadata_props if p.key.startswith(pre)}


def import_torch():
    try:
        import torch
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising at import
        raise TorchUnavailable(f"torch/torchvision not importable ({type(e).__name__}: {e})") from None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def torchvision_model(name: str, weights: dict, num_classes: int = 1000, device: str = "cpu"):
    """torchvision's ``name`` (alexnet, vgg16, resnet50, googlenet) in eval mode with ``weights`` loaded by
    state_dict key; every key must match in name and shape (``num_batches_tracked`` buffers excepted)."""
    torch = import_torch()
    import torchvision.models as tvm_models

    kw = dict(weights=None, num_classes=num_classes)
    if name == "googlenet":
        kw.update(aux_logits=False, transform_input=False, init_weights=False)
    if name not in ("alexnet", "vgg16", "resnet50", "googlenet"):
        raise TorchUnavailable(f"no torchvision counterpart for {name!r}")
    net = getattr(tvm_models, name)(**kw)
    sd = net.state_dict()
    missing = sorted(k for k in set(sd) - set(weights) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(weights) - set(sd))
    if missing or unexpected:
        raise ValueError(f"weights do not match torchvision's {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in weights.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)}, torchvision's {name} has {tuple(sd[k].shape)}")
        sd[k] = torch.from_numpy(np.array(v, dtype=np.float32))  # a copy: ONNX arrays are read-only
    net.load_state_dict(sd)
    return net.eval().to(device)


class TorchRunner:
    """Runs and times a torch module on one device (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, net, device: str):
        self.torch = import_torch()
        self.net, self.device = net, device
        self.label = "cuDNN fp32 (torchvision)" if device.startswith("cuda") else "CPU fp32 (torchvision)"

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            return self.net(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def time(self, x: np.ndarray, number: int = 3, repeat: int = 10, warmup: int = 3) -> list[float]:
        """Per-run milliseconds, ``repeat`` measurements of ``number`` runs each, after ``warmup`` runs."""
        torch = self.torch
        xt = torch.from_numpy(x).to(self.device)
        cuda = self.device.startswith("cuda")
        out = []
        with torch.inference_mode():
            for _ in range(warmup):
                self.net(xt)
            if cuda:
                torch.cuda.synchronize()
            for _ in range(repeat):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(number):
                        self.net(xt)
                    b.record()
                    b.synchronize()
                    out.append(a.elapsed_time(b) / number)
                else:
                    t0 = time.perf_counter()
                    for _ in range(number):
                        self.net(xt)
                    out.append((time.perf_counter() - t0) * 1e3 / number)
        return out


def torch_for_onnx(model, device: str = "cpu") -> TorchRunner:
    """A TorchRunner for a zoo-made ONNX model (same architecture and weights)."""
    from onnx import numpy_helper

    meta = zoo_meta(model)
    if not meta:
        raise TorchUnavailable("not a zoo model (no torchvision counterpart known for an arbitrary ONNX graph)")
    if meta.get("grouped") == "True":
        raise TorchUnavailable("the two-tower AlexNet has no torchvision counterpart")
    torch = import_torch()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TorchUnavailable("torch sees no CUDA device")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if not t.name.startswith("avgpool.")}
    net = torchvision_model(meta["model"], weights, int(meta.get("num_classes", 1000)), device)
    return TorchRunner(net, device)
