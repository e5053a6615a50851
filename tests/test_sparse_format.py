"""SparseConvWeight: CSR per output channel, absolute input channels, stretched offsets."""
from __future__ import annotations

import numpy as np
import pytest

from escort_tvm import ConvSpec, SparseConvWeight
from _helpers import pruned

SHAPES = [
    ((8, 4, 3, 3), 1),
    ((6, 2, 5, 3), 3),  # grouped: K=6, C=6, Cg=2
    ((8, 1, 3, 3), 8),  # depthwise
    ((5, 7, 1, 1), 1),
    ((4, 3, 11, 11), 1),
]


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_round_trip_and_csr_invariants(rng, shape, groups, sparsity):
    w = pruned(rng, shape, sparsity)
    sw = SparseConvWeight.from_dense(w, groups)
    back = sw.to_dense()
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, w)

    K = shape[0]
    assert sw.shape == shape and sw.groups == groups and sw.K == K
    assert sw.row_ptr.dtype == np.int32 and sw.row_ptr.shape == (K + 1,)
    for a in (sw.channel, sw.kh, sw.kw):
        assert a.dtype == np.int32 and a.shape == (sw.nnz,)
    assert sw.values.dtype == np.float32
    assert sw.row_ptr[0] == 0 and sw.row_ptr[-1] == sw.nnz == np.count_nonzero(w)
    assert np.all(np.diff(sw.row_ptr) >= 0), "row_ptr must be monotone"
    np.testing.assert_array_equal(sw.row_lengths(), [np.count_nonzero(w[k]) for k in range(K)])
    assert np.all(sw.values != 0)
    assert sw.sparsity == pytest.approx(1 - np.count_nonzero(w) / w.size)
    # every stored nonzero sits where the dense tensor has it
    Kg, Cg = K // groups, shape[1]
    for k in range(K):
        for j in range(sw.row_ptr[k], sw.row_ptr[k + 1]):
            c_abs = sw.channel[j]
            assert c_abs // Cg == k // Kg, "channel must lie in the output channel's group"
            assert w[k, c_abs - (k // Kg) * Cg, sw.kh[j], sw.kw[j]] == sw.values[j]


def test_groups_give_absolute_input_channels():
    # K=4, C=4, groups=2 -> Cg=2; output channels 2,3 belong to group 1 and read input channels 2,3.
    w = np.zeros((4, 2, 1, 1), np.float32)
    w[0, 1, 0, 0] = 1.0  # group 0, local channel 1 -> absolute 1
    w[2, 0, 0, 0] = 2.0  # group 1, local channel 0 -> absolute 2
    w[3, 1, 0, 0] = 3.0  # group 1, local channel 1 -> absolute 3
    sw = SparseConvWeight.from_dense(w, groups=2)
    np.testing.assert_array_equal(sw.channel, [1, 2, 3])
    np.testing.assert_array_equal(sw.row_ptr, [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(sw.values, [1.0, 2.0, 3.0])
    # depthwise: output channel k reads input channel k
    dw = np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1, 1)
    np.testing.assert_array_equal(SparseConvWeight.from_dense(dw, groups=6).channel, np.arange(6))


@pytest.mark.parametrize("hp,wp,dilation", [(10, 12, (1, 1)), (7, 9, (2, 3)), (33, 41, (1, 2))])
def test_stretched_offsets_formula(rng, hp, wp, dilation):
    w = pruned(rng, (6, 2, 3, 3), 0.6)
    sw = SparseConvWeight.from_dense(w, groups=3)
    off = sw.stretched_offsets(hp, wp, dilation)
    assert off.dtype == np.int32 and off.shape == (sw.nnz,)
    dh, dw = dilation
    expect = [(int(c) * hp + int(kh) * dh) * wp + int(kw) * dw for c, kh, kw in zip(sw.channel, sw.kh, sw.kw)]
    np.testing.assert_array_equal(off, expect)


def test_stretched_offsets_read_the_right_input_element(rng):
    """Following an offset from output pixel (oh, ow) lands on x_pad[c, oh*sh + kh*dh, ow*sw + kw*dw]."""
    spec = ConvSpec(N=1, C=4, H=9, W=8, K=4, KH=3, KW=2, stride=(2, 1), pad=(1, 0, 1, 2), dilation=(2, 1),
                    groups=2)
    w = pruned(rng, spec.weight_shape, 0.5)
    sw = SparseConvWeight.from_dense(w, spec.groups)
    hp, wp = spec.Hp, spec.Wp
    xpad = rng.standard_normal((spec.C, hp, wp))
    flat = xpad.reshape(-1)
    off = sw.stretched_offsets(hp, wp, spec.dilation)
    (sh, sww), (dh, dw) = spec.stride, spec.dilation
    for oh in (0, spec.OH - 1):
        for ow in (0, spec.OW - 1):
            for j in range(sw.nnz):
                got = flat[off[j] + oh * sh * wp + ow * sww]
                want = xpad[sw.channel[j], oh * sh + sw.kh[j] * dh, ow * sww + sw.kw[j] * dw]
                assert got == want


def test_empty_rows(rng):
    w = pruned(rng, (6, 3, 3, 3), 0.5)
    w[[0, 3, 5]] = 0.0  # first, middle and last output channel have no nonzeros
    sw = SparseConvWeight.from_dense(w)
    lengths = sw.row_lengths()
    assert list(lengths[[0, 3, 5]]) == [0, 0, 0]
    assert np.all(lengths[[1, 2, 4]] > 0)
    np.testing.assert_array_equal(sw.to_dense(), w)


def test_all_zero_weight():
    w = np.zeros((4, 2, 3, 3), np.float32)
    sw = SparseConvWeight.from_dense(w)
    assert sw.nnz == 0 and sw.sparsity == 1.0
    np.testing.assert_array_equal(sw.row_ptr, np.zeros(5))
    assert sw.stretched_offsets(5, 5).shape == (0,)
    np.testing.assert_array_equal(sw.to_dense(), w)


def test_negative_zero_counts_as_zero():
    w = np.zeros((2, 1, 2, 2), np.float32)
    w[0, 0, 0, 0] = -0.0
    w[1, 0, 1, 1] = 1.5
    sw = SparseConvWeight.from_dense(w)
    assert sw.nnz == 1


@pytest.mark.parametrize("bad", [np.zeros((4, 3, 3), np.float32), np.zeros((2, 4, 3, 3, 1), np.float32),
                                 np.zeros(9, np.float32)])
def test_rejects_non_4d(bad):
    with pytest.raises(ValueError, match="4-D"):
        SparseConvWeight.from_dense(bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_rejects_non_float32(dtype):
    with pytest.raises(TypeError, match="float32"):
        SparseConvWeight.from_dense(np.ones((2, 2, 3, 3), dtype))


def test_rejects_groups_not_dividing_k():
    with pytest.raises(ValueError, match="groups"):
        SparseConvWeight.from_dense(np.ones((6, 2, 3, 3), np.float32), groups=4)


def test_offset_overflow_raises():
    w = np.zeros((1, 1, 1, 1), np.float32)
    w[0, 0, 0, 0] = 1.0
    sw = SparseConvWeight.from_dense(np.ones((1, 2, 1, 1), np.float32))
    # channel 1 at a 50000 x 50000 pitch is past int32
    with pytest.raises(OverflowError):
        sw.stretched_offsets(50000, 50000)
    assert SparseConvWeight.from_dense(w).stretched_offsets(50000, 50000)[0] == 0


# ---------------------------------------------------------------- ConvSpec
def test_conv_spec_shapes():
    s = ConvSpec(N=2, C=6, H=17, W=15, K=9, KH=5, KW=3, stride=(2, 3), pad=(1, 2, 3, 0), dilation=(2, 1), groups=3)
    assert s.Cg == 2 and s.Hp == 21 and s.Wp == 17
    assert s.OH == (21 - 2 * 4 - 1) // 2 + 1 and s.OW == (17 - 2 - 1) // 3 + 1
    assert s.weight_shape == (9, 2, 5, 3) and s.input_shape == (2, 6, 17, 15)
    assert s.output_shape == (2, 9, s.OH, s.OW)
    assert s.dense_flops() == 2 * 2 * 9 * 2 * 5 * 3 * s.OH * s.OW


@pytest.mark.parametrize("kw,match", [
    (dict(C=0), "C"), (dict(groups=4), "groups"), (dict(stride=(0, 1)), "stride"),
    (dict(pad=(-1, 0, 0, 0)), "pad"), (dict(H=2, KH=5), "empty output"),
])
def test_conv_spec_rejects(kw, match):
    base = dict(N=1, C=6, H=8, W=8, K=6, KH=3, KW=3)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        ConvSpec(**base)


def test_conv_spec_survives_a_json_round_trip():
    import json

    spec = ConvSpec(N=2, C=6, H=9, W=7, K=4, KH=3, KW=1, stride=(2, 1), pad=(1, 0, 2, 0), dilation=(2, 1), groups=2)
    back = ConvSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and isinstance(back.pad, tuple) and back.OH == spec.OH
