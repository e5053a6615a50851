"""ONNX import: a Relax module whose weights are parameters, plus the dict of their values."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _load_onnx(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise ValueError(f"{path} does not parse as an ONNX model: {e}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValueError(f"invalid ONNX model: {str(e).splitlines()[0]}") from None
    return model


def _input_shapes(model, shape_dict):
    init = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        if shape_dict and inp.name in shape_dict:
            shapes[inp.name] = [int(d) for d in shape_dict[inp.name]]
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims):
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise ValueError(f"input {inp.name!r} has a dynamic or missing shape {shown}: "
                             f"give it in shape_dict, e.g. {{{inp.name!r}: [1, 3, 224, 224]}}")
        shapes[inp.name] = [d.dim_value for d in dims]
    if shape_dict:
        unknown = sorted(set(shape_dict) - set(shapes))
        if unknown:
            raise ValueError(f"shape_dict names {unknown} are not inputs of the model ({sorted(shapes)})")
    return shapes


def from_onnx(model_or_path, shape_dict: dict | None = None):
    """Import an ONNX model (ModelProto or path); returns (Relax IRModule, {param name: numpy array})."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx

    model = _load_onnx(model_or_path)
    init = {t.name for t in model.graph.initializer}
    if any(i.name in init for i in model.graph.input):  # old exporters list weights as inputs too
        import onnx

        model = onnx.ModelProto.FromString(model.SerializeToString())
        keep = [i for i in model.graph.input if i.name not in init]
        del model.graph.input[:]
        model.graph.input.extend(keep)
    shapes = _input_shapes(model, shape_dict)
    try:
        mod = relax_from_onnx(model, shape_dict=shapes, keep_params_in_input=True)
    except Exception as e:
        raise ValueError(f"TVM cannot import this ONNX model: {str(e).strip().splitlines()[-1]}") from None
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    names = [p.name for p in list(func.params)[n_in:]]
    values = detached.get("main", [])
    params = {n: np.asarray(v.numpy()) for n, v in zip(names, values)}
    return mod, params
