"""dbllm: FDB's planes and init follow the paper's formulas; each group holds at most the four levels
{a2, 0, a1 + a2, a1} of its two stored planes; bits/weight = 2 + 32/g from the bytes; DAD weighs tokens by
teacher entropy; training lowers the loss and the artifact reloads exactly."""

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.dbllm import DBLLM, DualBinaryLinear, dual_planes
from bench.quant import unpack_bits
from conftest import logits, random_calib


def test_fdb_planes_are_nearest_level_rounding_at_init():
    s = torch.tensor(0.1)
    w = torch.tensor([-0.5, -0.08, -0.04, 0.0, 0.04, 0.06, 0.14, 0.16, 0.5])
    b1, b2 = dual_planes(w, 2 * s, -s)
    w_hat = 2 * s * b1 - s * b2
    # levels {-s, 0, s, 2s}: thresholds at -s/2, s/2, 3s/2, clamped outside
    assert torch.allclose(w_hat, torch.tensor([-0.1, -0.1, 0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.2]))


def test_dual_binary_linear_init_and_straight_through():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 8)
    m = DualBinaryLinear(lin, 32)
    assert m.alpha1.shape == (8, 3)
    assert torch.allclose(m.alpha1, -2 * m.alpha2)  # a1 = 2s, a2 = -s
    w_hat, b1, b2 = m.quantize()
    err = (w_hat - lin.weight).pow(2).sum()
    for frac in (0.5, 2.0):  # the searched s beats rescaled ones
        a1, a2 = (a.detach().half().float().repeat_interleave(32, 1) * frac for a in (m.alpha1, m.alpha2))
        p1, p2 = dual_planes(lin.weight.detach(), a1, a2)
        assert (a1 * p1 + a2 * p2 - lin.weight).pow(2).sum() > err
    w_hat.sum().backward()
    assert m.weight.grad is not None and m.alpha1.grad.abs().sum() > 0
    assert set(m.weight.grad.unique().tolist()) <= {0.0, 1.0}  # straight through inside the level range


def test_dad_weighs_tokens_by_teacher_entropy():
    class Out:
        def __init__(self, logits):
            self.logits = logits
    t = torch.tensor([[[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # a confident and an ambiguous token
    s = torch.tensor([[[0.0, 8.0, 0.0], [0.0, 8.0, 0.0]]])
    plain, _ = DBLLM(dad_gamma=0.0)._loss(Out(t), Out(s))
    dad, _ = DBLLM(dad_gamma=1.0)._loss(Out(t), Out(s))
    p = torch.softmax(t[0], -1)
    kl = (p * (p.log() - torch.log_softmax(s[0], -1))).sum(-1)
    h = -(p * p.log()).sum(-1)
    assert torch.allclose(plain, kl.sum())
    assert torch.allclose(dad, (kl * h / h.mean()).sum())


def test_dbllm_trains_stores_two_planes_and_reloads(tiny_llama, tmp_path):
    budget = Budget(name="t", train_steps=30, lr=1e-3, calib_samples=8, calib_seqlen=32, warmup_ratio=0.0)
    method = DBLLM(group_size=32)
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(8, 32), budget)
    assert packed.training.summary()["loss_last"] < 0.9 * packed.training.summary()["loss_first"]
    assert 0.0 < packed.info["zero_fraction"] < 1.0
    n_weights = 0
    for ref in work.adapter.linears():
        assert type(ref.module) is torch.nn.Linear
        out_f, in_f = ref.module.weight.shape
        n_weights += out_f * in_f
        st = packed.layers[ref.name]
        b1, b2 = (unpack_bits(st[k], 1, out_f * in_f, (out_f, in_f)).float() for k in ("plane1", "plane2"))
        a1, a2 = (st[k].float().repeat_interleave(32, 1)[:, :in_f] for k in ("alpha1", "alpha2"))
        assert torch.equal(ref.module.weight.data, a1 * b1 + a2 * b2)
        for c in range(0, in_f, 32):
            assert ref.module.weight.data[:, c:c + 32].unique().numel() <= 4 * out_f
            assert ref.module.weight.data[0, c:c + 32].unique().numel() <= 4
    storage = packed.storage(tiny_llama)
    assert storage.bits_per_weight == 2 + 32 / 32
    assert storage.linear_bytes * 8 == storage.bits_per_weight * n_weights
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))
