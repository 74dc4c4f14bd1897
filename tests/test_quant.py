"""Quantization math on small matrices: exact packing, the byte count, the RTN bound, GPTQ against a literal Alg. 1."""
import pytest
import torch

from compress.quant import (QuantizedWeight, QuantSpec, dequantize, gptq, pack, packed_length, quant_params,
                            quantize, rtn, storage_bytes, unpack)

ALL_BITS = (8, 4, 3, 2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n: int, N: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Inputs X (n x N) with a decaying spectrum and correlated features; rows in ``dead`` are zero."""
    g = _gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = mix @ torch.randn(n, N, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=g,
                                                                                   dtype=torch.float64)
    X[list(dead)] = 0.0
    return X


# ---------------------------------------------------------------------------------------------------- packing

def _expected_bytes(n: int, bits: int) -> int:
    return {8: n, 4: (n + 1) // 2, 2: (n + 3) // 4, 3: 3 * ((n + 7) // 8)}[bits]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(3, 1), (3, 7), (4, 9), (2, 13), (5, 17), (2, 3, 11), (1, 64)])
def test_pack_round_trip_exact(bits, shape):
    q = torch.randint(0, 1 << bits, shape, generator=_gen(sum(shape) + bits), dtype=torch.int64).to(torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (*shape[:-1], _expected_bytes(shape[-1], bits)) == (*shape[:-1], packed_length(shape[-1], bits))
    back = unpack(p, bits, shape[-1])
    assert back.dtype == torch.uint8 and torch.equal(back, q)


def test_pack_bit_layout():
    """Low bits first: a reader outside lrc can rely on the documented layout."""
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4, 1]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 7, 5], dtype=torch.uint8), 3).tolist() == [1, 0, 0xE0, 5, 0, 0]
    assert pack(torch.tensor([0, 7, 0, 5], dtype=torch.uint8), 3).tolist() == [7 << 3, 5 << 1, 0]
    assert pack(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]


def test_pack_rejects_out_of_range_codes_and_bad_lengths():
    with pytest.raises(ValueError, match="codes"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="packed"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 9)


# ------------------------------------------------------------------------------------------------------ specs

def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=True)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=-2)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(bits=4, symmetric="yes")
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantSpec(bits=4, scale_dtype="int8")
    assert QuantSpec(bits=4, group_size=-1).group_size is None
    assert QuantSpec(bits=4).group_size == 128 and not QuantSpec(bits=4).symmetric


def test_gptq_rejects_a_mismatched_gram():
    with pytest.raises(ValueError, match="Gram"):
        gptq(torch.randn(4, 8), torch.eye(7), QuantSpec(4))


# ---------------------------------------------------------------------------------------------------- storage

@pytest.mark.parametrize("m,n,spec", [
    (16, 48, QuantSpec(4, 16)),
    (7, 45, QuantSpec(3, 16)),
    (5, 33, QuantSpec(2, None, symmetric=True)),
    (9, 130, QuantSpec(8, 128)),                      # shorter last group
    (3, 20, QuantSpec(4, 128)),                       # one group shorter than group_size
    (6, 70, QuantSpec(3, 8, scale_dtype="bfloat16")),  # 9 groups: zeros packed 3-bit need 6 bytes
    (4, 40, QuantSpec(4, 16, symmetric=True, scale_dtype="float32")),
])
def test_storage_bytes_equals_packed_tensors(m, n, spec):
    W = torch.randn(m, n, generator=_gen(m * n), dtype=torch.float64)
    qw = rtn(W, spec)
    tensors = qw.to_packed()
    assert set(tensors) == ({"qweight", "scales"} if spec.symmetric else {"qweight", "scales", "qzeros"})
    assert tensors["scales"].dtype == spec.torch_scale_dtype
    actual = sum(t.numel() * t.element_size() for t in tensors.values())
    assert actual == storage_bytes(m, n, spec) == qw.storage_bytes()
    back = QuantizedWeight.from_packed(tensors, spec, (m, n))
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale)  # scales are already representable in the stored dtype
    assert torch.equal(back.dequantize(torch.float64), qw.dequantize(torch.float64))


def test_storage_bytes_by_hand():
    # 4096 x 4096, 4 bits, group 128, asymmetric: codes 4096*2048, fp16 scales 4096*32*2, 4-bit zeros 4096*16
    assert storage_bytes(4096, 4096, QuantSpec(4)) == 4096 * 2048 + 4096 * 32 * 2 + 4096 * 16
    assert storage_bytes(4096, 4096, QuantSpec(4, symmetric=True)) == 4096 * 2048 + 4096 * 32 * 2
    # 11008 inputs, 3 bits: 86 groups; codes 3*1376 bytes, scales 86*2, zeros 3*ceil(86/8) = 33 bytes, per row
    assert storage_bytes(10, 11008, QuantSpec(3)) == 10 * (4128 + 172 + 33)
    assert storage_bytes(10, 11008, QuantSpec(3), scale_bytes=4) == 10 * (4128 + 344 + 33)
    assert storage_bytes(2, 100, QuantSpec(8, None, scale_dtype="float32")) == 2 * (100 + 4 + 1)


# -------------------------------------------------------------------------------------------------------- RTN

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_rtn_error_within_half_a_step(bits, symmetric, scale_dtype):
    spec = QuantSpec(bits, 16, symmetric=symmetric, scale_dtype=scale_dtype)
    W = 0.05 * torch.randn(20, 70, generator=_gen(bits), dtype=torch.float64) + 0.01  # 70 = 4*16 + 6
    W[:3] = W[:3].abs() + 0.02  # rows of one sign: the range is widened to contain 0
    W[3:6] = -W[3:6].abs() - 0.02
    qw = rtn(W, spec)
    assert qw.codes.shape == W.shape and qw.scale.shape == qw.zero.shape == (20, 5)
    assert int(qw.codes.max()) <= spec.maxq
    s = qw.scale.double().repeat_interleave(16, dim=1)[:, :70]
    err = (W - qw.dequantize(torch.float64)).abs()
    inside = (qw.codes > 0) & (qw.codes < spec.maxq)
    assert inside.float().mean() > 0.5
    assert (err[inside] <= s[inside] / 2 * (1 + 1e-12)).all()
    # the range holds every element up to the rounding of the scale to its stored dtype
    u = torch.finfo(spec.torch_scale_dtype).eps / 2
    assert (err <= s * (0.5 + spec.maxq * u / (1 - u)) * (1 + 1e-12)).all()
    if scale_dtype == "float32":
        assert (err <= s / 2 * (1 + 1e-4)).all()
    # the scale is the (stored-dtype) size of one step of the group's range widened to contain 0
    last = W[:, 64:]
    if symmetric:
        want = 2 * last.abs().amax(1) / spec.maxq
    else:
        want = (last.amax(1).clamp_min(0) - last.amin(1).clamp_max(0)) / spec.maxq
    assert torch.equal(qw.scale[:, 4], want.to(spec.torch_scale_dtype).float())
    if symmetric:
        assert (qw.zero == 1 << (bits - 1)).all()
    assert torch.equal(quantize(W, qw.scale, qw.zero, spec), qw.codes)
    assert torch.equal(dequantize(qw.codes, qw.scale, qw.zero, spec), qw.dequantize())


@pytest.mark.parametrize("bits", ALL_BITS)
def test_rtn_exact_on_the_grid(bits):
    """A weight already on an asymmetric grid whose codes span [0, maxq] in every group comes back exactly."""
    spec = QuantSpec(bits, 16)
    m, n, groups = 6, 40, 3
    g = _gen(10 + bits)
    scale = (torch.rand(m, groups, generator=g, dtype=torch.float64) * 0.01 + 1e-3).to(torch.float16).double()
    zero = torch.randint(0, spec.maxq + 1, (m, groups), generator=g).double()
    codes = torch.randint(0, spec.maxq + 1, (m, n), generator=g)
    codes[:, 0::16], codes[:, 1::16] = 0, spec.maxq
    codes = codes.to(torch.uint8)
    W = dequantize(codes, scale, zero, spec, torch.float64)
    qw = rtn(W, spec)
    assert torch.equal(qw.scale.double(), scale) and torch.equal(qw.zero.double(), zero)
    assert torch.equal(qw.codes, codes)
    assert torch.equal(qw.dequantize(torch.float64), W)


def test_rtn_error_falls_with_bits():
    W = torch.randn(64, 256, generator=_gen(3), dtype=torch.float64)
    errs = [float((W - rtn(W, QuantSpec(b)).dequantize(torch.float64)).pow(2).mean()) for b in (8, 4, 3, 2)]
    assert errs[0] < errs[1] < errs[2] < errs[3]
    assert errs[1] < errs[2] / 3  # roughly 4x per bit


def test_groups_follow_the_documented_layout():
    W = torch.randn(5, 40, generator=_gen(4), dtype=torch.float64)
    assert quant_params(W, QuantSpec(4, 16))[0].shape == (5, 3)
    assert quant_params(W, QuantSpec(4, None))[0].shape == (5, 1)
    assert quant_params(W, QuantSpec(4, 128))[0].shape == (5, 1)
    # a group is a run of consecutive columns: changing a column of group 1 changes only group 1's parameters
    W2 = W.clone()
    W2[:, 20] = 10.0
    s1, s2 = quant_params(W, QuantSpec(4, 16))[0], quant_params(W2, QuantSpec(4, 16))[0]
    assert torch.equal(s1[:, [0, 2]], s2[:, [0, 2]]) and (s2[:, 1] > s1[:, 1]).all()
    # an all-zero group still has a positive scale and comes back as zeros
    W3 = W.clone()
    W3[:, :16] = 0.0
    qw = rtn(W3, QuantSpec(4, 16))
    assert (qw.scale > 0).all() and (qw.dequantize()[:, :16] == 0).all()


# ------------------------------------------------------------------------------------------------------- GPTQ

def _reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool):
    """GPTQ Alg. 1 in its most literal form: no blocks, no lazy updates, every later column updated at once."""
    W, H = W.double().clone(), H.double().clone()
    m, n = W.shape
    for j in range(n):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    g = spec.group_size or n
    row_spec = QuantSpec(spec.bits, None, spec.symmetric, spec.scale_dtype)

    def params(cols):
        s, z = quant_params(cols, row_spec)
        return s[:, 0].double(), z[:, 0].double()

    order = list(range(n))
    if act_order:  # static groups from the original weights, in the original column order
        static = [params(W[:, k:k + g]) for k in range(0, n, g)]
        order = sorted(range(n), key=lambda j: -float(H[j, j]))
    P = torch.tensor(order)
    W, H = W[:, P], H[P][:, P]
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros(m, n, dtype=torch.uint8)
    scales, zeros = {}, {}
    for j in range(n):
        orig = order[j]
        if act_order:
            s, z = static[orig // g]
        elif j % g == 0:
            s, z = params(W[:, j:j + g])
            scales[j // g], zeros[j // g] = s, z
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, spec.maxq)
        codes[:, orig] = q.to(torch.uint8)
        e = (W[:, j] - s * (q - z)) / U[j, j]
        W[:, j + 1:] -= e[:, None] * U[j, j + 1:][None, :]
    if act_order:
        scales = {k: s for k, (s, _) in enumerate(static)}
        zeros = {k: z for k, (_, z) in enumerate(static)}
    groups = sorted(scales)
    return codes, torch.stack([scales[k] for k in groups], 1), torch.stack([zeros[k] for k in groups], 1)


@pytest.mark.parametrize("act_order,block_size,spec,dead,damp", [
    (False, 128, QuantSpec(4, 16), (), 0.01),
    (False, 20, QuantSpec(4, 16), (5,), 0.01),       # groups start inside blocks and cross block ends
    (False, 7, QuantSpec(3, 16, symmetric=True), (), 0.01),
    (False, 16, QuantSpec(4, 20), (47,), 0.01),      # shorter last group
    (False, 20, QuantSpec(2, None), (), 0.01),       # one group per row, spanning every block
    (True, 128, QuantSpec(4, 16), (), 0.01),
    (True, 20, QuantSpec(3, 16), (5, 30), 0.01),
    (True, 7, QuantSpec(8, 16, symmetric=True), (), 0.01),
    (False, 20, QuantSpec(4, 16), (3, 40), 0.0),     # undamped: only the dead-input fix keeps H invertible
    (True, 20, QuantSpec(4, 16), (3, 40), 0.0),
])
def test_gptq_equals_literal_algorithm(act_order, block_size, spec, dead, damp):
    W = torch.randn(16, 48, generator=_gen(7), dtype=torch.float64)
    X = _correlated(48, 200, seed=8, dead=dead)
    H = X @ X.T
    qw = gptq(W, H, spec, damp=damp, block_size=block_size, act_order=act_order)
    codes, scale, zero = _reference_gptq(W, H, spec, damp, act_order)
    assert torch.equal(qw.codes, codes)
    assert torch.equal(qw.scale.double(), scale) and torch.equal(qw.zero.double(), zero)
    # the feedback moved codes away from plain rounding (otherwise this test could not see it)
    assert not torch.equal(qw.codes, rtn(W, spec).codes)
    for j in dead:
        assert (qw.dequantize()[:, j] == 0).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, bits):
    spec = QuantSpec(bits, 32)
    W = torch.randn(32, 64, generator=_gen(11), dtype=torch.float64)
    X = _correlated(64, 512, seed=12)
    H = X @ X.T

    def out_err(qw):
        return float(((W - qw.dequantize(torch.float64)) @ X).norm())

    e_rtn, e_gptq = out_err(rtn(W, spec)), out_err(gptq(W, H, spec, act_order=act_order))
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, 16, symmetric=True), QuantSpec(2, None)])
def test_gptq_with_identity_gram_is_rtn(spec, act_order):
    """H = I (damp 0): the Cholesky factor of H⁻¹ is I, no error is fed forward, and the codes are RTN's."""
    W = torch.randn(12, 40, generator=_gen(13), dtype=torch.float64)
    qw, ref = gptq(W, torch.eye(40), spec, damp=0.0, block_size=16, act_order=act_order), rtn(W, spec)
    assert torch.equal(qw.codes, ref.codes)
    assert torch.equal(qw.scale, ref.scale) and torch.equal(qw.zero, ref.zero)
