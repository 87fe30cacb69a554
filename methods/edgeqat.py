"""`edgeqat`: EdgeQAT, "Entropy and Distribution Guided Quantization-Aware Training for the Acceleration of
Lightweight LLMs on the Edge" (Shen, Kong, Yang, Han, Lu, Dong, ..., Zhao, Wang; arXiv 2402.10787, 2024). Reference
code read: shawnricecake/EdgeQAT (identical to shawnricecake/squant, the v2 "Squat" paper's code):
distill_train/models/modeling_llama_qat_distribution_guide.py, quant/quant.py and
quant-train-distribution-guide-llama-58m-distill.py; written anew here. Of the paper: its abstract (quantized query
and key distort the attention maps; entropy- and distribution-guided QAT repairs them; token-adaptive bit-widths)
and public summaries; its full text was not available offline.

What is quantized (fake-quant: values on their grids, fp32 arithmetic), as the reference's W4A8 model:
- weights of every block linear: LSQ, signed `bits`-bit codes, one learned step per tensor (bench.quant.lsq);
- the input of every block linear: LSQ+ `act_bits`, a learned step and zero point per tensor, static at inference;
- inside self-attention (bench.quant.attention, through the adapter's `use_attention`): the query (`query_bits`)
  and the key (`kv_bits`) after the rotary embedding, as q.k^T multiplies them; the value (`kv_bits`); the softmax
  probabilities (`act_bits`, unsigned) as they multiply the value. Key and value are quantized on their static
  grids wherever attention reads them, so the KV cache holds `kv_bits` values. One LSQ+ quantizer per tensor kind
  and block, initialised on the first calibration window and trained with everything else. The reference's
  defaults: 8 bits for all of these (ActQ nbits_a=8), 4 for weights (LinearQ nbits_w=4).
Loss, as the reference trainer's total: 0.5 CE (LM loss on the window) + 0.5 T^2 KL(teacher || student) at T = 2
+ distribution term + entropy term (the reference averages three teachers' logits; here the one uncompressed model):
- entropy (the reference's exactly): -0.5 log E, E = sum over blocks, batch, heads and tokens of
  log(1 + Var_d(q)) + log(1 + Var_d(k)), q and k the quantized query and key after the rotary embedding (k with its
  grouped heads repeated, as the reference's repeat_kv): maximizing a Gaussian entropy proxy keeps the quantized
  query/key spread from collapsing.
- distribution: the reference computes S = sum over blocks, batch and heads of cos(student scores, teacher scores),
  each (T x S) map flattened, scores = q k^T / sqrt(d) BEFORE the mask and the softmax, the student's from its
  quantized q, k, the teacher's from the uncompressed model; and adds +1 x log S to the minimized loss. Minimizing
  +log S lowers the cosine, pushing the quantized maps away from the full-precision ones, against the paper's own
  aim (a "distribution guided" loss that mitigates the distortion of the quantized attention maps; the reference's
  entropy line is negated explicitly "to maximize", this one is not). Here S is computed exactly as the reference
  does (same maps, same reduction, same log) and `distribution_sign: align` (default) adds -log S, which falls
  as the student's maps approach the teacher's (the paper's stated aim); `distribution_sign: reference` adds
  +log S, the released code's sign, for measuring it as released.
Every parameter trains (as the reference's trainer), AdamW with steps, lr and weight decay from `budget=`
(`budget=paper` is the reference's recipe: lr 2.5e-4, weight decay 0.1, cosine, warm-up).
Deviations: (1) token-adaptive bit-widths are not used: the reference's entropy-and-distribution-guided model runs
with them off (quant_a_low_bit_percent = -1 in modeling_llama_qat_distribution_guide.py) and its token-adaptive
model (modeling_llama_qat_mix.py, 4-bit activations for the half of the tokens attending least to the first token)
is trained without these two losses; (2) the input of the attention's output projection is quantized too (the
reference feeds it the product of quantized probabilities and values unquantized); (3) one teacher.
Artifact: per linear, packed codes + fp16 weight step, the input quantizer's fp16 step, rounded zero point (fp16)
and sign flag; the attention quantizers' step / zero / sign stored with the projection producing the tensor (query
with q, key with k, value and probabilities with v), counted in their bytes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.distill import distill, kd_logits
from bench.errors import check_bits, check_range, unknown_choice
from bench.layer_format import ActFormat, LayerFormat
from bench.models import adapter_for, round_to_storage
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import IntQuantized, attention
from bench.quant.integer import fp16_ste, load_int_layer, restore_bias, round_ste, scale_grad, stored_int_layer
from bench.quant.lsq import LearnedActQuantizer, static_quantizer
from bench.training import TrainingRecord

DISTRIBUTION_SIGNS = ("align", "reference")
# attention tensor -> (the projection whose stored tensors hold its quantizer, the config field of its bits)
ATTENTION_TENSORS = {"query": ("q", "query_bits"), "key": ("k", "kv_bits"), "value": ("v", "kv_bits"),
                     "probs": ("v", "act_bits")}
QUANTIZER_FIELDS = ("step", "zero", "signed")


class EdgeQATLinear(nn.Module):
    """A block linear during training: LSQ weights, an LSQ+ input quantizer."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int):
        super().__init__()
        self.w_bits = w_bits
        self.weight = nn.Parameter(linear.weight.data.float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.float().clone())
        qp = 2 ** (w_bits - 1) - 1
        self.w_step = nn.Parameter(2 * self.weight.detach().abs().mean() / qp**0.5)
        self.act = LearnedActQuantizer(a_bits)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantized weight and its signed integer codes."""
        qn, qp = -(2 ** (self.w_bits - 1)), 2 ** (self.w_bits - 1) - 1
        s = fp16_ste(scale_grad(self.w_step, 1 / (self.weight.numel() * qp) ** 0.5).clamp(min=1e-8))
        q = round_ste(torch.clamp(self.weight / s, qn, qp))
        return q * s, q.detach()

    def forward(self, x):
        return F.linear(self.act(x), self.quantized_weight()[0], self.bias)


def map_cosines(student_scores: torch.Tensor, teacher_query: torch.Tensor, teacher_key: torch.Tensor) -> torch.Tensor:
    """Sum over batch and heads of cos(student map, teacher map), each (T x S) map flattened: the student's
    pre-softmax scores (B, heads, T, S) against the teacher's q k^T (a constant; the cosine ignores the common
    1/sqrt(d) scaling), in fp32 (the maps may be bf16 under autocast)."""
    with torch.no_grad():
        teacher = torch.matmul(teacher_query.float(), teacher_key.float().transpose(2, 3))
    return F.cosine_similarity(student_scores.float().flatten(2), teacher.flatten(2), dim=-1, eps=1e-6).sum()


def distribution_term(cosine_sum: torch.Tensor, sign: str) -> torch.Tensor:
    """-log S (`align`: falls as the maps approach the teacher's) or the reference's +log S."""
    return -torch.log(cosine_sum) if sign == "align" else torch.log(cosine_sum)


def head_spread(x: torch.Tensor) -> torch.Tensor:
    """Sum over batch, heads and tokens of log(1 + Var over the head dimension): the entropy proxy of q or k."""
    return torch.log1p(x.float().var(dim=-1)).sum()


def attach_input_quantizer(linear: nn.Module, stored: dict[str, torch.Tensor], bits: int) -> None:
    quantize = static_quantizer({k: stored[f"act_{k}"] for k in QUANTIZER_FIELDS}, bits)
    linear.register_forward_pre_hook(lambda _m, args: (quantize(args[0]), *args[1:]))


@dataclass
class EdgeQAT(Method):
    name: str = "edgeqat"
    bits: int = 4
    act_bits: int = 8
    query_bits: int = 8
    kv_bits: int = 8
    temperature: float = 2.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    distribution_weight: float = 1.0
    entropy_weight: float = 0.5
    distribution_sign: str = "align"
    seed: int = 0
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Shen et al., EdgeQAT: Entropy and Distribution Guided QAT for Lightweight LLMs (2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_bits("method.bits", self.bits, 2, 8)
        for key in ("act_bits", "query_bits", "kv_bits"):
            check_bits(f"method.{key}", getattr(self, key), 2, 16)
        check_range("method.temperature", self.temperature, 1e-3, 100.0)
        for key in ("ce_weight", "kd_weight", "distribution_weight", "entropy_weight"):
            check_range(f"method.{key}", getattr(self, key), 0.0, 1e6)
        if self.distribution_sign not in DISTRIBUTION_SIGNS:
            raise unknown_choice("method.distribution_sign", self.distribution_sign, list(DISTRIBUTION_SIGNS))

    def _static(self, what: str) -> ActFormat:
        return ActFormat(getattr(self, ATTENTION_TENSORS[what][1]), "int", "per_tensor", "static")

    def layer_format(self, role: str = "") -> LayerFormat:
        """The linear's weights and input; the q/k/v projections' formats also name the attention tensors they
        produce and how those are quantized (query; key and value as the KV cache holds them; probabilities)."""
        notes = tuple(f"{what}-{self._static(what).label}" for what, (r, _) in ATTENTION_TENSORS.items() if r == role)
        return LayerFormat("int", self.bits, f"edgeqat-w{self.bits}-per_tensor-sym", "tensor", symmetric=True,
                           act=ActFormat(self.act_bits, "int", "per_tensor", "static"), notes=notes)

    def objective(self) -> str:
        sign = "-" if self.distribution_sign == "align" else "+"
        return (f"ce = {self.ce_weight:g} x LM loss + kd = {self.kd_weight:g} x T^2 KL(teacher || student) at "
                f"T={self.temperature:g} + dist = {self.distribution_weight:g} x {sign}log(sum of cosines of the "
                f"pre-softmax attention scores, student vs teacher) + ent = {self.entropy_weight:g} x -0.5 log(sum "
                "of log(1 + Var) of the quantized q/k heads); terms as weighted in the loss (dist and ent can be "
                "negative)")

    def compress(self, model, calib, budget) -> Packed:
        self.check_applicable(model)
        teacher = model.module
        student = copy.deepcopy(teacher)
        adapter = adapter_for(student)
        mods = {}
        for ref in list(adapter.linears()):
            mods[ref.name] = EdgeQATLinear(ref.module, self.bits, self.act_bits)
            adapter.replace_linear(ref, mods[ref.name])
        quantizers = [nn.ModuleDict({what: LearnedActQuantizer(getattr(self, field))
                                     for what, (_, field) in ATTENTION_TENSORS.items()})
                      for _ in adapter.blocks()]
        quants = {i: attention.AttentionQuant(i, **dict(q.items())) for i, q in enumerate(quantizers)}
        attention.attach(adapter, quants)
        with torch.no_grad():
            student(calib.windows[:1], use_cache=False)  # every quantizer initialises itself on the first window

        teacher_qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cosines: list[torch.Tensor] = []
        spreads: list[torch.Tensor] = []

        def record_teacher(view):
            teacher_qk[view.block] = (view.query.detach(), view.key.detach())

        def observe_student(view):
            cosines.append(map_cosines(view.scores, *teacher_qk[view.block]))
            spreads.append(head_spread(view.query) + head_spread(view.key))

        for q in quants.values():
            q.observers.append(observe_student)

        def loss_fn(t_out, s_out):
            kd = kd_logits(s_out.logits, t_out.logits, self.temperature)
            distribution = distribution_term(sum(cosines), self.distribution_sign)
            entropy = -0.5 * torch.log(sum(spreads))
            cosines.clear()
            spreads.clear()
            loss = (self.ce_weight * s_out.loss + self.kd_weight * kd + self.distribution_weight * distribution
                    + self.entropy_weight * entropy)
            return loss, {"ce": self.ce_weight * s_out.loss.item(), "kd": self.kd_weight * kd.item(),
                          "dist": self.distribution_weight * distribution.item(),
                          "ent": self.entropy_weight * entropy.item()}

        trainable = list(student.parameters()) + [p for q in quantizers for p in q.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        try:
            with model.adapter.eager_attention():  # the teacher's attention implementation comes back afterwards
                attention.attach(model.adapter, {i: attention.AttentionQuant(i, observers=[record_teacher])
                                                 for i in range(len(model.adapter.blocks()))})
                history = distill(teacher, student, trainable, calib.windows, budget, self.seed, loss_fn,
                                  "edgeqat quantization-aware training", student_labels=True,
                                  heldout=calib.heldout, objective=self.objective())
        finally:
            attention.detach(model.adapter)
        for p in trainable:
            p.requires_grad_(False)
        return self.runtime_hooks(model, self._freeze(model, student, adapter, mods, quantizers, history))

    @torch.no_grad()
    def _freeze(self, model, student, adapter, mods, quantizers, history) -> Packed:
        """The trained student as it is stored: dequantized weights on plain linears, static input quantizers."""
        packed = Packed(student, self.name, self.execution)
        round_to_storage(student, getattr(torch, model.spec.storage_dtype))  # what runs is what is stored
        for ref in list(adapter.linears()):
            m = mods[ref.name]
            deq, q = m.quantized_weight()
            linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None)
            linear.weight.data.copy_(deq)
            if m.bias is not None:
                linear.bias.data.copy_(m.bias)
            packed.per_layer.append(layer_stats(ref, model.module.get_submodule(ref.name).weight, deq))
            adapter.replace_linear(ref, linear)
            codes = (q + 2 ** (self.bits - 1)).to(torch.uint8)
            stored = stored_int_layer(codes, m.w_step.detach().half().reshape(1, 1), None, self.bits, m.bias)
            stored.update({f"act_{k}": v for k, v in m.act.stored().items()})
            for what, (role, _) in ATTENTION_TENSORS.items():
                if role == ref.role:
                    stored.update({f"attn_{what}_{k}": v for k, v in quantizers[ref.block][what].stored().items()})
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = self.layer_format(ref.role)
            attach_input_quantizer(linear, stored, self.act_bits)
        packed.training = TrainingRecord([history])
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        shape = tuple(ref.module.weight.shape)
        codes, _ = load_int_layer(stored, self.bits, shape)
        ref.module.weight.data.copy_(IntQuantized(codes, stored["scale"], None, self.bits, shape[1], True).dequantize())
        restore_bias(ref.module, stored)
        attach_input_quantizer(ref.module, stored, self.act_bits)

    def runtime_hooks(self, model, packed):
        """The attention quantizers, static, from the stored steps (after compress and after restore alike)."""
        adapter = adapter_for(packed.model)
        names = {(r.block, r.role): r.name for r in adapter.linears()}
        quants = {}
        for i in range(len(adapter.blocks())):
            fns = {}
            for what, (role, field) in ATTENTION_TENSORS.items():
                stored = packed.layers[names[(i, role)]]
                fns[what] = static_quantizer({k: stored[f"attn_{what}_{k}"] for k in QUANTIZER_FIELDS},
                                             getattr(self, field))
            quants[i] = attention.AttentionQuant(i, **fns)
        attention.attach(adapter, quants)
        packed.info["activations"] = (f"a{self.act_bits}-per_tensor-static (block linear inputs); attention: query "
                                      f"a{self.query_bits}, key and value (KV cache) a{self.kv_bits}, probabilities "
                                      f"a{self.act_bits}, per_tensor static")
        packed.info.update({"query_bits": self.query_bits, "kv_bits": self.kv_bits,
                            "distribution_sign": self.distribution_sign})
        return packed
