"""The Escort paper's networks as seeded ONNX models, no downloads: AlexNet, VGG-16, ResNet-50, GoogLeNet.

Architectures follow torchvision's definitions (which follow the papers):

- ``alexnet``: torchvision's single-tower AlexNet (64-192-384-256-256 channels); ``grouped=True`` gives
  the original two-tower form of Krizhevsky et al. 2012 instead (96-256-384-384-256 channels, conv2/4/5
  with groups=2, LRN after the first two convs; no torchvision counterpart).
- ``vgg16``: configuration D without BatchNorm.
- ``resnet50``: v1.5 (stride on the 3x3 conv), inference BatchNormalization nodes after every conv.
- ``googlenet``: Inception v1 as torchvision builds it: conv + BatchNorm(eps 1e-3) + ReLU units, the
  "5x5" branch with a 3x3 conv, ceil-mode max pools, no auxiliary heads, transform_input=False.

Every parameter initializer carries its torchvision ``state_dict`` key (``features.0.weight``,
``layer1.0.bn1.running_mean``, ...), so the same weights load into ``torchvision.models.<name>()`` by name;
``weights()`` regenerates them with numpy alone (no onnx, no TVM) for a machine that has only PyTorch.
Dropout is an identity at inference and is left out.

Weights: He-normal convs and linears, small random biases, BatchNorm statistics random but sane
(running_var > 0; the last BatchNorm of each ResNet residual branch has gamma 0.1-0.4, so that sixteen
residual additions keep the activations in range). With ``sparsity`` the convs are pruned by
``escort_tvm.prune`` (first conv dense), then each pruned conv is rescaled so its weights keep the
dense tensor's energy (what fine-tuning restores; without it activations shrink ~0.44x per 90%-pruned
layer and a deep net outputs its biases).

Smaller inputs than 224 work (CI uses 32-64). torchvision's AdaptiveAvgPool2d((6, 6)) / ((7, 7)) before
AlexNet's / VGG's classifier is the identity at 224 and is then left out; at other sizes it is written as
two MatMuls with constant averaging matrices (rows ``floor(i*H/6) .. ceil((i+1)*H/6)``, as PyTorch bins),
initializers named ``avgpool.rows`` / ``avgpool.cols`` (not parameters: no state_dict key). ResNet-50's
and GoogLeNet's (1, 1) pools are GlobalAveragePool. The classifier weights have torchvision's shapes at
every input size.
"""
from __future__ import annotations

import math

import numpy as np

from .prune import ConvSite, prune_weights

OPSET = 17


class _Net:
    """Records ONNX nodes as plain tuples and parameters as numpy arrays, tracking tensor shapes."""

    def __init__(self, name: str, batch: int, image_size: int, seed: int):
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.name, self.batch, self.image_size = name, batch, image_size
        self.rng = np.random.default_rng(seed)
        self.nodes: list[tuple] = []  # (op_type, inputs, outputs, attrs)
        self.params: dict[str, np.ndarray] = {}  # torchvision state_dict key -> array, in creation order
        self.consts: dict[str, np.ndarray] = {}  # non-parameter constants
        self.convs: list[ConvSite] = []
        self.shapes: dict[str, tuple] = {"input": (batch, 3, image_size, image_size)}
        self._n = 0

    def _out(self, hint: str, shape) -> str:
        self._n += 1
        name = f"{hint}:{self._n}"
        if any(d < 1 for d in shape):
            raise ValueError(f"image_size {self.image_size} is too small for {self.name}: "
                             f"{hint} would have shape {tuple(shape)}")
        self.shapes[name] = tuple(int(d) for d in shape)
        return name

    def _normal(self, shape, std) -> np.ndarray:
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(std)
        return w

    def conv(self, x, prefix, cout, k, stride=1, pad=0, groups=1, bias=True) -> str:
        n, cin, h, w = self.shapes[x]
        fan_in = cin // groups * k * k
        self.params[f"{prefix}.weight"] = self._normal((cout, cin // groups, k, k), math.sqrt(2.0 / fan_in))
        ins = [x, f"{prefix}.weight"]
        if bias:
            self.params[f"{prefix}.bias"] = self._normal((cout,), 0.05)
            ins.append(f"{prefix}.bias")
        self.convs.append(ConvSite(prefix, f"{prefix}.weight", groups))
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        y = self._out(prefix, (n, cout, oh, ow))
        self.nodes.append(("Conv", ins, [y], dict(kernel_shape=[k, k], strides=[stride, stride],
                                                  pads=[pad] * 4, group=groups, dilations=[1, 1])))
        return y

    def bn(self, x, prefix, eps=1e-5, gamma=(0.5, 1.0)) -> str:
        c = self.shapes[x][1]
        p = {"weight": self.rng.uniform(*gamma, c), "bias": self.rng.normal(0.0, 0.1, c),
             "running_mean": self.rng.normal(0.0, 0.1, c), "running_var": self.rng.uniform(0.5, 1.5, c)}
        for k, v in p.items():
            self.params[f"{prefix}.{k}"] = v.astype(np.float32)
        y = self._out(prefix, self.shapes[x])
        self.nodes.append(("BatchNormalization", [x] + [f"{prefix}.{k}" for k in p], [y], dict(epsilon=eps)))
        return y

    def relu(self, x) -> str:
        y = self._out("relu", self.shapes[x])
        self.nodes.append(("Relu", [x], [y], {}))
        return y

    def lrn(self, x, size=5, alpha=1e-4, beta=0.75, bias=2.0) -> str:
        y = self._out("lrn", self.shapes[x])
        self.nodes.append(("LRN", [x], [y], dict(size=size, alpha=alpha, beta=beta, bias=bias)))
        return y

    def maxpool(self, x, k, stride, pad=0, ceil=False) -> str:
        n, c, h, w = self.shapes[x]

        def out(i):  # PyTorch's rule; in ceil mode the last window must start inside the (left-padded) input
            o = (i + 2 * pad - k + (stride - 1 if ceil else 0)) // stride + 1
            if ceil and (o - 1) * stride >= i + pad:
                o -= 1
            return o

        y = self._out("maxpool", (n, c, out(h), out(w)))
        self.nodes.append(("MaxPool", [x], [y], dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                                                     ceil_mode=int(ceil))))
        return y

    def adaptive_avgpool(self, x, size) -> str:
        """torchvision's AdaptiveAvgPool2d((size, size)); the identity when the input already has that size."""
        n, c, h, w = self.shapes[x]
        if (h, w) == (size, size):
            return x
        self.consts["avgpool.rows"] = _pool_matrix(h, size)  # (size, h)
        self.consts["avgpool.cols"] = _pool_matrix(w, size).T.copy()  # (w, size)
        t = self._out("avgpool", (n, c, h, size))
        self.nodes.append(("MatMul", [x, "avgpool.cols"], [t], {}))
        y = self._out("avgpool", (n, c, size, size))
        self.nodes.append(("MatMul", ["avgpool.rows", t], [y], {}))
        return y

    def global_avgpool(self, x) -> str:
        n, c, _, _ = self.shapes[x]
        y = self._out("avgpool", (n, c, 1, 1))
        self.nodes.append(("GlobalAveragePool", [x], [y], {}))
        return y

    def flatten(self, x) -> str:
        s = self.shapes[x]
        y = self._out("flatten", (s[0], int(np.prod(s[1:]))))
        self.nodes.append(("Flatten", [x], [y], dict(axis=1)))
        return y

    def linear(self, x, prefix, out, gain=2.0) -> str:
        n, fan_in = self.shapes[x]
        self.params[f"{prefix}.weight"] = self._normal((out, fan_in), math.sqrt(gain / fan_in))
        self.params[f"{prefix}.bias"] = self._normal((out,), 0.05)
        y = self._out(prefix, (n, out))
        self.nodes.append(("Gemm", [x, f"{prefix}.weight", f"{prefix}.bias"], [y], dict(transB=1)))
        return y

    def add(self, a, b) -> str:
        y = self._out("add", self.shapes[a])
        self.nodes.append(("Add", [a, b], [y], {}))
        return y

    def concat(self, xs) -> str:
        s = list(self.shapes[xs[0]])
        s[1] = sum(self.shapes[x][1] for x in xs)
        y = self._out("concat", s)
        self.nodes.append(("Concat", list(xs), [y], dict(axis=1)))
        return y

    # ------------------------------------------------------------------ finishing
    def prune(self, sparsity) -> None:
        if sparsity is None:
            return
        dense = self.params
        self.params, report = prune_weights(self.convs, dense, sparsity)
        for e in report.entries:
            if e.pruned:  # keep the layer's gain (see the module docstring)
                w, w0 = self.params[e.weight], dense[e.weight]
                energy = float(np.sum(w.astype(np.float64) ** 2))
                if energy > 0:
                    scale = math.sqrt(float(np.sum(w0.astype(np.float64) ** 2)) / energy)
                    self.params[e.weight] = (w * np.float32(scale)).astype(np.float32)

    def to_onnx(self, output: str, meta: dict):
        from onnx import TensorProto, helper, numpy_helper

        rename = {output: "logits"}
        nodes = [helper.make_node(op, ins, [rename.get(o, o) for o in outs], name=f"{op}_{i}", **attrs)
                 for i, (op, ins, outs, attrs) in enumerate(self.nodes)]
        inits = [numpy_helper.from_array(v, k) for k, v in {**self.params, **self.consts}.items()]
        graph = helper.make_graph(
            nodes, self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shapes["input"]))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(self.shapes[output]))],
            initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="escort_tvm.zoo")
        model.ir_version = 8
        for k, v in meta.items():
            model.metadata_props.add(key=f"escort_tvm.zoo.{k}", value=str(v))
        return model  # (onnx.checker runs in the tests; it costs seconds on VGG-16's 550 MB)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of PyTorch's adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


# ---------------------------------------------------------------------------- architectures
def _alexnet(net: _Net, num_classes: int, grouped: bool) -> str:
    x = "input"
    if grouped:  # Krizhevsky et al. 2012, two towers; torchvision-style indices of the layer sequence
        x = net.maxpool(net.lrn(net.relu(net.conv(x, "features.0", 96, 11, 4, 2))), 3, 2)
        x = net.maxpool(net.lrn(net.relu(net.conv(x, "features.4", 256, 5, 1, 2, groups=2))), 3, 2)
        x = net.relu(net.conv(x, "features.8", 384, 3, 1, 1))
        x = net.relu(net.conv(x, "features.10", 384, 3, 1, 1, groups=2))
        x = net.relu(net.conv(x, "features.12", 256, 3, 1, 1, groups=2))
        x = net.maxpool(x, 3, 2)
    else:  # torchvision.models.alexnet
        x = net.maxpool(net.relu(net.conv(x, "features.0", 64, 11, 4, 2)), 3, 2)
        x = net.maxpool(net.relu(net.conv(x, "features.3", 192, 5, 1, 2)), 3, 2)
        x = net.relu(net.conv(x, "features.6", 384, 3, 1, 1))
        x = net.relu(net.conv(x, "features.8", 256, 3, 1, 1))
        x = net.relu(net.conv(x, "features.10", 256, 3, 1, 1))
        x = net.maxpool(x, 3, 2)
    x = net.flatten(net.adaptive_avgpool(x, 6))
    x = net.relu(net.linear(x, "classifier.1", 4096))
    x = net.relu(net.linear(x, "classifier.4", 4096))
    return net.linear(x, "classifier.6", num_classes, gain=1.0)


def _vgg16(net: _Net, num_classes: int) -> str:
    x, i = "input", 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            x, i = net.maxpool(x, 2, 2), i + 1
        else:
            x, i = net.relu(net.conv(x, f"features.{i}", v, 3, 1, 1)), i + 2
    x = net.flatten(net.adaptive_avgpool(x, 7))
    x = net.relu(net.linear(x, "classifier.0", 4096))
    x = net.relu(net.linear(x, "classifier.3", 4096))
    return net.linear(x, "classifier.6", num_classes, gain=1.0)


def _resnet50(net: _Net, num_classes: int) -> str:
    x = net.relu(net.bn(net.conv("input", "conv1", 64, 7, 2, 3, bias=False), "bn1"))
    x = net.maxpool(x, 3, 2, 1)
    cin = 64
    for li, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
        for b in range(blocks):
            p, s = f"layer{li}.{b}", stride if b == 0 else 1
            y = net.relu(net.bn(net.conv(x, f"{p}.conv1", planes, 1, bias=False), f"{p}.bn1"))
            y = net.relu(net.bn(net.conv(y, f"{p}.conv2", planes, 3, s, 1, bias=False), f"{p}.bn2"))
            # the last BN of a residual branch starts small, so 16 additions keep the activations in range
            y = net.bn(net.conv(y, f"{p}.conv3", planes * 4, 1, bias=False), f"{p}.bn3", gamma=(0.1, 0.4))
            if b == 0 and (s != 1 or cin != planes * 4):
                x = net.bn(net.conv(x, f"{p}.downsample.0", planes * 4, 1, s, bias=False), f"{p}.downsample.1")
            x, cin = net.relu(net.add(y, x)), planes * 4
    x = net.flatten(net.global_avgpool(x))
    return net.linear(x, "fc", num_classes, gain=1.0)


def _basic(net: _Net, x, prefix, cout, k, stride=1, pad=0) -> str:
    """torchvision's BasicConv2d: conv (no bias) + BatchNorm(eps=0.001) + ReLU."""
    return net.relu(net.bn(net.conv(x, f"{prefix}.conv", cout, k, stride, pad, bias=False), f"{prefix}.bn", 1e-3))


def _inception(net: _Net, x, p, c1, c3r, c3, c5r, c5, pp) -> str:
    b1 = _basic(net, x, f"{p}.branch1", c1, 1)
    b2 = _basic(net, _basic(net, x, f"{p}.branch2.0", c3r, 1), f"{p}.branch2.1", c3, 3, 1, 1)
    b3 = _basic(net, _basic(net, x, f"{p}.branch3.0", c5r, 1), f"{p}.branch3.1", c5, 3, 1, 1)  # 3x3, as torchvision
    b4 = _basic(net, net.maxpool(x, 3, 1, 1, ceil=True), f"{p}.branch4.1", pp, 1)
    return net.concat([b1, b2, b3, b4])


def _googlenet(net: _Net, num_classes: int) -> str:
    x = _basic(net, "input", "conv1", 64, 7, 2, 3)
    x = net.maxpool(x, 3, 2, ceil=True)
    x = _basic(net, x, "conv2", 64, 1)
    x = _basic(net, x, "conv3", 192, 3, 1, 1)
    x = net.maxpool(x, 3, 2, ceil=True)
    x = _inception(net, x, "inception3a", 64, 96, 128, 16, 32, 32)
    x = _inception(net, x, "inception3b", 128, 128, 192, 32, 96, 64)
    x = net.maxpool(x, 3, 2, ceil=True)
    for name, cfg in (("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
                      ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
                      ("4e", (256, 160, 320, 32, 128, 128))):
        x = _inception(net, x, f"inception{name}", *cfg)
    x = net.maxpool(x, 2, 2, ceil=True)
    x = _inception(net, x, "inception5a", 256, 160, 320, 32, 128, 128)
    x = _inception(net, x, "inception5b", 384, 192, 384, 48, 128, 128)
    x = net.flatten(net.global_avgpool(x))
    return net.linear(x, "fc", num_classes, gain=1.0)


_ARCH = {"alexnet": _alexnet, "vgg16": _vgg16, "resnet50": _resnet50, "googlenet": _googlenet}
NAMES = tuple(_ARCH)


def _make(name, batch, image_size, sparsity, seed, num_classes, grouped=False) -> tuple[_Net, str]:
    if name not in _ARCH:
        raise ValueError(f"unknown zoo model {name!r}: choose one of {', '.join(NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if grouped and name != "alexnet":
        raise ValueError("grouped=True (two-tower form) exists only for alexnet")
    net = _Net(name + ("_grouped" if grouped else ""), batch, image_size, seed)
    out = _ARCH[name](net, num_classes, grouped) if name == "alexnet" else _ARCH[name](net, num_classes)
    net.prune(sparsity)
    return net, out


def build(name: str, batch: int = 1, image_size: int = 224, sparsity: float | None = None, seed: int = 0,
          num_classes: int = 1000, *, grouped: bool = False):
    """The zoo model ``name`` as an onnx.ModelProto with input "input" (N, 3, S, S) and output "logits"."""
    net, out = _make(name, batch, image_size, sparsity, seed, num_classes, grouped)
    meta = dict(model=name, batch=batch, image_size=image_size, sparsity=sparsity, seed=seed,
                num_classes=num_classes, grouped=grouped)
    return net.to_onnx(out, meta)


def weights(name: str, sparsity: float | None = None, seed: int = 0, num_classes: int = 1000, *,
            grouped: bool = False) -> dict[str, np.ndarray]:
    """The model's parameters by torchvision state_dict key, exactly as ``build`` makes them (numpy only;
    they do not depend on batch or image size). ``num_batches_tracked`` buffers are not included."""
    net, _ = _make(name, 1, 224, sparsity, seed, num_classes, grouped)
    return dict(net.params)


def alexnet(batch: int = 1, image_size: int = 224, sparsity: float | None = None, seed: int = 0,
            num_classes: int = 1000, *, grouped: bool = False):
    """AlexNet as torchvision defines it; ``grouped=True``: the original two-tower form (groups=2)."""
    return build("alexnet", batch, image_size, sparsity, seed, num_classes, grouped=grouped)


def vgg16(batch: int = 1, image_size: int = 224, sparsity: float | None = None, seed: int = 0,
          num_classes: int = 1000):
    """VGG-16 (configuration D, no BatchNorm) as torchvision defines it."""
    return build("vgg16", batch, image_size, sparsity, seed, num_classes)


def resnet50(batch: int = 1, image_size: int = 224, sparsity: float | None = None, seed: int = 0,
             num_classes: int = 1000):
    """ResNet-50 v1.5 with inference BatchNormalization, as torchvision defines it."""
    return build("resnet50", batch, image_size, sparsity, seed, num_classes)


def googlenet(batch: int = 1, image_size: int = 224, sparsity: float | None = None, seed: int = 0,
              num_classes: int = 1000):
    """GoogLeNet (Inception v1) as torchvision defines it (BatchNorm, no aux heads, transform_input=False)."""
    return build("googlenet", batch, image_size, sparsity, seed, num_classes)
