"""escort-tvm: pruned CNN convolutions compiled by TVM into sparse direct convolutions.

``load`` needs only TVM's runtime; ``build`` and ``from_onnx`` need the full compiler, so they are
imported on first use and this package stays importable with ``TVM_USE_RUNTIME_LIB=1``.
"""
from .compute import Epilogue, conv2d_reference
from .conv_spec import ConvSpec
from .report import ConvReport
from .prune import prune
from .runtime import Model, load
from .sparse_format import SparseConvWeight

__version__ = "0.1.0"


def build(mod, params=None, target=None, *, min_sparsity=0.7, tuning_log=None, kernel="auto",
          specialized_budget=None, jobs=None, split_matmuls=True):
    from .compiler import build as _build

    return _build(mod, params, target, min_sparsity=min_sparsity, tuning_log=tuning_log, kernel=kernel,
                  specialized_budget=specialized_budget, jobs=jobs, split_matmuls=split_matmuls)


build.__doc__ = """Compile a Relax module; every conv2d whose weight is a constant with sparsity >= min_sparsity
goes to a sparse direct-convolution kernel, all others stay dense. ``kernel``: "auto" (a tuning log's
fastest, else the cost rule in relay_passes.kernel_choice), or force "sparse" (CSR), "specialized"
(weights compiled into the code, falling back to CSR where it cannot) or "dense". Returns a CompiledModel
(call it with numpy inputs, read ``.report``, ``.export_library(path)``). ``target``: None (cuda if a
GPU is visible, else llvm), "llvm", "cuda", a dict or a tvm.target.Target. ``specialized_budget``: nonzeros
the build may compile into specialised kernels (None: relay_passes.kernel_choice.DEFAULT_SPECIALIZED_BUDGET);
past it a conv takes the CSR kernel and the report says so. ``jobs``: specialised kernels compiled side by
side, each in its own nvcc call (None: one per core); the report gives each kernel's compile seconds.
``split_matmuls``: on CUDA, split the reduction of small-batch dense layers (matmul) across thread blocks
(relay_passes.split_k; TVM's default schedule leaves most of the GPU idle there); the report lists them."""


def from_onnx(model_or_path, shape_dict=None):
    """Import an ONNX model; returns (Relax IRModule, {param name: numpy array})."""
    from .frontend import from_onnx as _from_onnx

    return _from_onnx(model_or_path, shape_dict)


__all__ = ["build", "from_onnx", "load", "prune", "Model", "ConvReport", "ConvSpec", "SparseConvWeight", "Epilogue",
           "conv2d_reference"]
