"""The static description of one 2-D convolution, shared by the pass, the format and the schedules."""
from __future__ import annotations

from dataclasses import dataclass, asdict


@dataclass(frozen=True)
class ConvSpec:
    """A conv2d in NCHW / OIHW with every attribute resolved to plain ints.

    ``pad`` is (top, left, bottom, right), the order Relax and ONNX use.
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    KH: int
    KW: int
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        for name in ("N", "C", "H", "W", "K", "KH", "KW", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"ConvSpec.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.pad) < 0:
            raise ValueError(f"bad stride/dilation/pad in {self}")
        if self.C % self.groups or self.K % self.groups:
            raise ValueError(f"groups={self.groups} must divide C={self.C} and K={self.K}")
        if self.OH < 1 or self.OW < 1:
            raise ValueError(f"conv has an empty output ({self.OH}x{self.OW}): {self}")

    @property
    def Cg(self) -> int:
        """Input channels per group (the weight's second dimension)."""
        return self.C // self.groups

    @property
    def Hp(self) -> int:
        return self.H + self.pad[0] + self.pad[2]

    @property
    def Wp(self) -> int:
        return self.W + self.pad[1] + self.pad[3]

    @property
    def OH(self) -> int:
        return (self.Hp - self.dilation[0] * (self.KH - 1) - 1) // self.stride[0] + 1

    @property
    def OW(self) -> int:
        return (self.Wp - self.dilation[1] * (self.KW - 1) - 1) // self.stride[1] + 1

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.Cg, self.KH, self.KW)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.OH, self.OW)

    def dense_flops(self) -> int:
        return 2 * self.N * self.K * self.Cg * self.KH * self.KW * self.OH * self.OW

    def describe(self) -> str:
        s = f"{self.C}->{self.K} {self.KH}x{self.KW} on {self.H}x{self.W}"
        if self.stride != (1, 1):
            s += f" stride {self.stride[0]}x{self.stride[1]}"
        if any(self.pad):
            s += f" pad {list(self.pad)}"
        if self.dilation != (1, 1):
            s += f" dilation {self.dilation[0]}x{self.dilation[1]}"
        if self.groups != 1:
            s += f" groups {self.groups}"
        return s + f" N={self.N}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvSpec":
        """The inverse of ``to_dict`` after a JSON round trip (which turns the tuple fields into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
