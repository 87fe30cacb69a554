"""L-Mul (methods/lmul.py): the emulated products against two independent scalar references of the paper's
definition (its equation in float64 with the adder's carry, and its PTX integer adder on float32 bit patterns),
exactness where the definition is exact, the error bound, signs/zeros/specials, fp32 accumulation of the dot
products, the attention wiring, a tiny model under the method, and the config errors."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from conftest import compose, loaded_tiny

from bench import models
from bench.errors import ConfigError
from bench.methods.lmul import LMul, LMulLinear, lmul_attention, lmul_matmul
from bench.quant.floating import round_mantissa
from bench.runner import build

WIDTHS = (1, 2, 3, 4, 5, 7)


def paper_l(m: int) -> int:
    return m if m <= 3 else (3 if m == 4 else 4)


def lmul_formula(x: float, y: float, m: int) -> float:
    """The paper's L-Mul in float64 from frexp: (1 + xm + ym + 2^-l) 2^(xe + ye), the mantissa sum carrying into
    the exponent once it reaches 2 (what the paper's integer adder does); zero if either operand is zero."""
    if x == 0 or y == 0:
        return 0.0
    fx, ex = math.frexp(abs(x))  # |x| = fx 2^ex, fx in [0.5, 1): 1 + xm = 2 fx, xe = ex - 1
    fy, ey = math.frexp(abs(y))
    s = (2 * fx - 1) + (2 * fy - 1) + 2.0 ** -paper_l(m)
    value = (1 + s) * 2.0 ** (ex + ey - 2) if s < 1 else (1 + (s - 1)) * 2.0 ** (ex + ey - 1)
    return math.copysign(value, x) * math.copysign(1.0, y)


def lmul_ptx(x: float, y: float, m: int) -> float:
    """The paper's fp32 PTX listing with the offset of width m: add the sign-stripped bit patterns as integers,
    subtract 0x3F800000 - 2^(23 - l), OR in the XOR of the signs (zero operands excluded by the callers)."""
    bx, by = (struct.unpack("<I", struct.pack("<f", v))[0] for v in (x, y))
    r = (bx & 0x7FFFFFFF) + (by & 0x7FFFFFFF) - (0x3F800000 - (1 << (23 - paper_l(m))))
    return struct.unpack("<f", struct.pack("<I", r | ((bx ^ by) & 0x80000000)))[0]


def products(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """All L-Mul products a_i * b_j: a dot product of length 1, so no accumulation is involved."""
    return lmul_matmul(a[:, None], b[None, :], m)


def random_operands(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.pow(2.0, torch.randint(-20, 20, (n,), generator=g).float())


@pytest.mark.parametrize("m", WIDTHS)
def test_every_product_equals_the_papers_formula_and_its_integer_adder_bit_for_bit(m):
    a, b = round_mantissa(random_operands(60, m), m), round_mantissa(random_operands(70, 100 + m), m)
    got = products(a, b, m)
    formula = torch.tensor([[lmul_formula(float(x), float(y), m) for y in b] for x in a], dtype=torch.float64)
    adder = torch.tensor([[lmul_ptx(float(x), float(y), m) for y in b] for x in a], dtype=torch.float32)
    assert torch.equal(got.double(), formula)
    assert torch.equal(got, adder)
    assert not torch.equal(got, a[:, None] * b[None, :])  # it is not the exact product


def test_operands_are_rounded_to_nearest_even_at_the_mantissa_width():
    # 1 + 1/16 is halfway between 1 and 1 + 1/8 at 3 bits: ties to the even code (1); 1 + 3/16: to 1 + 1/4
    x = torch.tensor([1.0625, 1.1875, 1.0626, 1.99, -1.0625])
    assert round_mantissa(x, 3).tolist() == [1.0, 1.25, 1.125, 2.0, -1.0]
    wide = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 50
    assert torch.equal(round_mantissa(wide, 7), wide.to(torch.bfloat16).float())  # bf16's own RNE cast
    # the products use the rounded operands: an unrounded operand gives the product of its rounded value
    assert torch.equal(products(x, x, 3), products(round_mantissa(x, 3), round_mantissa(x, 3), 3))


@pytest.mark.parametrize("m", (3, 4, 7))
def test_exact_where_the_formula_is_exact_and_powers_of_two_scale_exactly(m):
    c = 2.0 ** -paper_l(m)
    no_carry = [(2.0 ** -k, c * 2.0**k) for k in range(1, paper_l(m))]  # xm ym = 2^-l
    carry = [(1 - 2.0 ** -k, 1 - 2 * c * 2.0**k) for k in range(1, paper_l(m))]  # (1 - xm)(1 - ym) = 2^(1-l)
    on_grid = lambda v: 0 <= v < 1 and v * 2**m == int(v * 2**m)  # noqa: E731
    pairs = [(p, q) for p, q in no_carry if on_grid(p) and on_grid(q) and p + q + c < 1]
    pairs += [(p, q) for p, q in carry if on_grid(p) and on_grid(q) and p + q + c >= 1]
    assert len(pairs) >= 2 and any(p + q + c >= 1 for p, q in pairs)
    g = torch.Generator().manual_seed(m)
    for xm, ym in pairs:
        scale_x, scale_y = (torch.pow(2.0, torch.randint(-30, 30, (8,), generator=g).float()) for _ in range(2))
        signs = torch.where(torch.rand(8, generator=g) < 0.5, -1.0, 1.0)
        x, y = (1 + xm) * scale_x * signs, (1 + ym) * scale_y
        assert torch.equal(products(x, y, m), x[:, None] * y[None, :]), (xm, ym)
    # scaling an operand by 2^k scales the product by exactly 2^k; a power of two is NOT exact (the offset)
    a, b = round_mantissa(random_operands(40, 7), m), round_mantissa(random_operands(40, 8), m)
    assert torch.equal(products(a * 2.0**5, b * 2.0**-9, m), products(a, b, m) * 2.0**-4)
    ones = torch.tensor([1.0, -4.0])
    unit = torch.pow(2.0, torch.floor(torch.log2(b.abs())))  # 2^ye
    b = b[b.abs() / unit - 1 + c < 1]  # no carry: L-Mul(+-2^k, y) = +-2^k (y + sign(y) 2^-l 2^ye)
    offset = torch.sign(b) * c * torch.pow(2.0, torch.floor(torch.log2(b.abs())))
    assert b.numel() > 20 and torch.equal(products(ones, b, m), ones[:, None] * (b + offset))


@pytest.mark.parametrize("m", WIDTHS)
def test_relative_error_stays_within_the_bound_and_reaches_it(m):
    c = 2.0 ** -paper_l(m)
    t = (1 - c) / 2
    lo, hi = (c - t * t) / (1 + t) ** 2, c
    a, b = round_mantissa(random_operands(400, 3 * m), m), round_mantissa(random_operands(400, 3 * m + 1), m)
    err = products(a, b, m).double() / (a.double()[:, None] * b.double()[None, :]) - 1
    assert lo - 1e-12 <= float(err.min()) and float(err.max()) <= hi + 1e-12
    assert float(err.max()) == pytest.approx(hi)  # both mantissas zero: the whole offset is error
    if m >= 3:  # a grid fine enough to come near the branches' meeting point
        assert float(err.min()) <= 0.8 * lo


def test_signs_zeros_subnormals_and_non_finite_operands():
    m = 3
    x = torch.tensor([1.5, -1.5, 0.0, -0.0, 1e-40, 2.5])
    y = torch.tensor([3.0, -3.0, 0.0])
    p = products(x, y, m)
    assert p[0, 0] > 0 and p[0, 1] < 0 and p[1, 0] < 0 and p[1, 1] > 0  # sign = xor of signs
    assert torch.equal(p[0, 0].abs(), p[1, 1].abs())
    assert (p[2:5] == 0).all() and (p[:, 2] == 0).all()  # zeros and a float32 subnormal (flushed) give 0
    special = lmul_matmul(torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), torch.tensor([[1.0], [float("nan")]]), m)
    assert torch.isnan(special).all()  # a NaN or inf operand poisons the dot products it enters
    finite_row = lmul_matmul(torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), torch.tensor([[1.0], [1.0]]), m)
    assert torch.isnan(finite_row[0]).all() and torch.isfinite(finite_row[1]).all()


@pytest.mark.parametrize("m", (3, 7))
def test_dot_products_are_fp32_sums_of_the_lmul_products(m):
    g = torch.Generator().manual_seed(m)
    a, b = torch.randn(2, 5, 64, generator=g), torch.randn(2, 64, 6, generator=g)
    got = lmul_matmul(a, b, m)
    ar, br = round_mantissa(a, m), round_mantissa(b, m)
    for n in range(2):
        terms = torch.tensor([[[lmul_formula(float(ar[n, i, d]), float(br[n, d, j]), m) for d in range(64)]
                               for j in range(6)] for i in range(5)], dtype=torch.float64)
        exact_sum = terms.sum(-1)
        # float32 accumulation of 64 terms: within a few float32 ulps of the magnitudes summed
        assert torch.allclose(got[n].double(), exact_sum, rtol=0, atol=1e-5 * float(terms.abs().sum(-1).max()))
    assert (got - a @ b).abs().max() > 1e-3  # not the exact matmul


def _reference_attention(q, k, v, mask, scaling, m):
    """One head's attention with every product of both matmuls from the float64 formula."""
    ref = lambda x, y: lmul_formula(float(round_mantissa(x, m)), float(round_mantissa(y, m)), m)  # noqa: E731
    scores = torch.tensor([[sum(ref(q[i, d], k[j, d]) for d in range(q.shape[1])) for j in range(k.shape[0])]
                           for i in range(q.shape[0])], dtype=torch.float64) * scaling + mask
    probs = scores.softmax(-1).float()
    return torch.tensor([[sum(ref(probs[i, j], v[j, d]) for j in range(v.shape[0])) for d in range(v.shape[1])]
                         for i in range(q.shape[0])], dtype=torch.float64)


def test_attention_multiplies_both_matmuls_with_lmul_and_repeats_kv_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=g)
    k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)[None, None]
    module = torch.nn.Module().eval()
    out, _ = lmul_attention(3)(module, q, k, v, mask, scaling=0.125)
    assert out.shape == (1, 5, 4, 8)
    for h in range(4):  # heads 0, 1 read kv head 0; heads 2, 3 kv head 1
        expect = _reference_attention(q[0, h], k[0, h // 2], v[0, h // 2], mask[0, 0].double(), 0.125, 3)
        assert torch.allclose(out[0, :, h].double(), expect, atol=1e-5)


def _perplexity(lm, ids) -> float:
    with torch.no_grad():
        return math.exp(float(lm.module(ids, labels=ids).loss))


@pytest.mark.parametrize("apply_to", ["attention", "attention+linears"])
def test_a_tiny_model_under_lmul_has_a_finite_perplexity_other_than_the_exact_one(apply_to):
    base = loaded_tiny("llama", layers=2)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    exact = _perplexity(base, ids)
    model = models.clone(base)
    packed = LMul(mantissa_bits=3, apply_to=apply_to).compress(model, None, None)
    assert packed.execution == "emulated-lmul" and not packed.layers  # no weight changes: base bits per weight
    assert torch.equal(packed.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       base.module.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    linears = [r.module for r in model.adapter.linears()]
    assert all(isinstance(mod, LMulLinear) for mod in linears) == (apply_to == "attention+linears")
    lmul = _perplexity(model, ids)
    assert math.isfinite(lmul) and lmul != exact
    assert abs(math.log(lmul / exact)) < 0.5  # an approximation of the same model, not noise
    assert packed.info["energy.lmul_mac_pj.model-horowitz_isscc2014_45nm"] == pytest.approx(1.0)
    assert packed.info["energy.fp32_mac_pj.model-horowitz_isscc2014_45nm"] == pytest.approx(4.6)
    assert ("energy.linears_lmul_j_per_token.model-horowitz_isscc2014_45nm" in packed.info) == \
        (apply_to == "attention+linears")


def test_a_wider_mantissa_is_closer_to_the_exact_model():
    base = loaded_tiny("llama", layers=2)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = base.module(ids).logits
        gaps = []
        for m in (1, 3):  # l(1) = 1: a 50% offset, far coarser than m = 3's 12.5%
            model = models.clone(base)
            LMul(mantissa_bits=m, apply_to="attention+linears").compress(model, None, None)
            gaps.append(float((model.module(ids).logits - exact).abs().mean()))
    assert gaps[1] < gaps[0]


@pytest.mark.parametrize("override,problem", [
    ("method.mantissa_bits=0", "method.mantissa_bits=0 is not an L-Mul mantissa width here"),
    ("method.mantissa_bits=8", "method.mantissa_bits=8 is not an L-Mul mantissa width here"),
    ("method.mantissa_bits=3.5", "method.mantissa_bits=3.5 is not an L-Mul mantissa width here"),
    ("method.apply_to=mlp", "method.apply_to='mlp' is unknown"),
])
def test_bad_config_is_one_line_naming_the_fix(override, problem):
    with pytest.raises(ConfigError) as e:
        build(compose("method=lmul", override).method, "method")
    assert str(e.value).startswith(problem) and "\n" not in str(e.value)
    assert "e.g. 3" in str(e.value) or "attention+linears" in str(e.value)
