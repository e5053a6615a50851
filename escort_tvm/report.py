"""The per-conv build report: what each conv2d became and why."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict


@dataclass
class ConvReport:
    index: int  # position among the model's conv2d ops, in graph order
    name: str  # the weight's parameter name where the model has one, else conv2d_<index>
    input_shape: tuple | None = None
    weight_shape: tuple | None = None
    output_shape: tuple | None = None
    attrs: dict = field(default_factory=dict)  # stride, pad, dilation, groups
    # of the weight the kernel runs: with a BatchNormalization folded in, the folded weight (per-channel
    # scaling keeps every zero; it can only underflow a tiny weight to zero, which ``notes`` then says)
    sparsity: float | None = None
    nnz: int | None = None
    kernel: str = "dense"  # "sparse" (CSR kernel), "specialized" (weights in the code) or "dense"
    reason: str = ""  # why dense, in plain words; empty for sparse
    # what the sparse kernel took over, in its order: "bn" (BatchNormalization folded into weight and
    # bias), "bias", "residual" (an add of a tensor of the output's shape), "relu"; empty for dense
    fused: list = field(default_factory=list)
    schedule: str = ""  # rule name and knobs, for sparse
    function: str = ""  # the kernel's function in the built module (convs with identical kernels share one)
    compile_s: float | None = None  # a specialised kernel's own build (lowering + nvcc), in seconds
    notes: list = field(default_factory=list)  # anything else worth knowing, in plain words

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        sp = "-" if self.sparsity is None else f"{self.sparsity:.3f}"
        what = self.kernel + (f" ({' + '.join(self.fused)})" if self.fused else "")
        tail = self.reason if self.kernel == "dense" else self.schedule
        if self.compile_s is not None:
            tail += f" (built in {self.compile_s:.1f} s)"
        line = (f"{self.index:3d} {self.name:24.24s} in={_shape(self.input_shape):18s} "
                f"w={_shape(self.weight_shape):16s} sparsity={sp:5s} {what:22s} {tail}")
        return "; ".join([line] + list(self.notes))


def _shape(s) -> str:
    return "x".join(map(str, s)) if s else "?"


def format_report(entries) -> str:
    counts = {k: sum(e.kernel == k for e in entries) for k in ("sparse", "specialized", "dense")}
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "specialized")
    head = f"{len(entries)} conv2d: {kinds}"
    return "\n".join([head] + [e.line() for e in entries])
