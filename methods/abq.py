"""`abq`: ABQ-LLM, "Arbitrary-Bit Quantized Inference Acceleration for Large Language Models" (Zeng, Liu,
Chen, Zhao, Lin, ...; AAAI 2025; reference code bytedance/ABQ-LLM). Any weight bit-width 2..8, with or
without activation quantization (W2A16, W4A4, W6A6 ... are configs), in fake-quant; the arbitrary-bit
kernel itself is a hardware-backend concern.

Block by block (OmniQuant-style reconstruction, as the reference), the quantized block is trained to match
the full-precision one. Trained per block, everything else frozen:
- learnable weight clipping (LWC): per (row, group) factors sigmoid(u) and sigmoid(l) on the max and min of
  the asymmetric grid, initialised at 4 (sigmoid 0.982);
- learnable equivalent transformation (LET): a per-channel scale between each norm and the linears reading
  it, and between the linear pairs the adapter declares (v -> o when shapes match, up -> down), initialised
  as SmoothQuant (act_max^alpha / w_max^(1-alpha)); with activation quantization and a norm that has a
  bias (OPT), also a channel shift folded into that bias and the linears' biases;
- distribution compensation: a rank-1 term l r^T (l = 0, r = 1 at start) added to the MLP output linear
  of the first 3 and last 4 blocks before quantization, so it costs no storage.
Loss (the paper's distribution-correction objective), with q the quantized block's output on the quantized
model's input, t1 the fp block's output on the fp model's input and t2 the fp block on the quantized input:
MSE(q, t1) + MSE(q, t2) - log|cos(q, t1)| - log|cos(q, t2)| + KL(A_fp || A_q) + KL(A_q || A_fp), where A
are the attention probability maps (fp block on fp input vs quantized block). The reference applies
log_softmax/softmax once more to the already-normalised maps; this follows the paper's KL of the maps.
AdamW, no weight decay, lr 5e-3 (LET), 1e-2 (LWC and compensation), constant, as in the reference; steps per
block and the calibration windows come from `budget=` (reference: 20 epochs of 128 x 2048 tokens, 40 at 2 bits);
when the steps visit fewer windows than the calibration set holds, only those are propagated. Each block is one
stage of bench.training's record (group "abq blocks": the same windows pass through every block); the held-out
calibration windows are propagated beside the trained ones (fp and quantized) and give each block's validation
loss, the same objective on them.

Bit balance: at 2 bits the grid has 5 levels (scale = range / 4, codes 0..4), the reference's symmetric
{-2..2} trick. Five levels need more than 2 bits: codes are stored three per 7 bits (5^3 = 125 <= 128),
2.33 bits per weight before scales, and reported so. Stored per (row, group): fp16 scale and the zero-point
code. The zero point is clamped into the code range so it packs like the codes (the reference keeps an
unclamped zero; the two differ only for a group whose weights all share one sign).

Deviations, all stated: activations use the suite's quantizer (dynamic symmetric per-token, like every
method here) and only linear inputs are quantized (the reference also quantizes the q.k^T and attention.v
matmuls, with a learned q/k scale that only serves those matmuls and is omitted here); v -> o is not
transformed under grouped-query attention (shapes differ), as in AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bench.errors import ConfigError, check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.progress import each_block
from bench.quant import IntQuantized, n_groups, pack_levels, resolve_group_size, unpack_levels
from bench.quant.activation import ActivationQuantized, fake_quant_activations
from bench.quant.integer import restore_bias, round_ste, stored_bias
from bench.training import StageRecord, Trainer, TrainingRecord

LWC_INIT = 4.0
SCALE_FLOOR = 1e-2  # the reference keeps |LET scale| >= 1e-2 ("truncate_number")
COMPENSATED_FIRST, COMPENSATED_LAST = 3, 4  # blocks whose MLP output linear gets the rank-1 term


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g); a ragged last group is padded with its own last column, which
    leaves its min and max unchanged."""
    out_f, in_f = w.shape
    pad = n_groups(in_f, g) * g - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, g)


def lwc_quantize(w: torch.Tensor, levels: int, g: int, up: torch.Tensor | None = None,
                 low: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `levels`-level quantization per (row, group) with learnable clipping factors (logits, shape
    (out, n_groups)); differentiable in w, up, low (straight-through rounding). Returns the dequantized
    weight and the codes, fp16 scales and zero points."""
    out_f, in_f = w.shape
    wg = grouped(w, g)
    xmax, xmin = wg.amax(dim=-1), wg.amin(dim=-1)
    if up is not None:
        xmax, xmin = torch.sigmoid(up) * xmax, torch.sigmoid(low) * xmin
    scale = ((xmax - xmin) / (levels - 1)).clamp(1e-5, 1e4).to(torch.float16).to(w.dtype)
    zero = torch.clamp(torch.round(-xmin / scale), 0, levels - 1).detach()
    codes = torch.clamp(round_ste(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels - 1)
    deq = ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_f, -1)[:, :in_f]
    return deq, codes.detach().reshape(out_f, -1)[:, :in_f], scale.detach().to(torch.float16), zero


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of attention maps, averaged over every entry (the reference's reduction='mean')."""
    return (p * (torch.log(p.clamp(min=1e-12)) - torch.log(q.clamp(min=1e-12)))).mean()  # finite grads at p = 0


def _neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.log(F.cosine_similarity(a, b, dim=-1).mean().abs().clamp(min=1e-12))


@dataclass
class _Transform:
    """One learnable equivalent transformation: a channel scale (and shift) between `producer` (a norm's
    name, or a linear's role) and the linears (roles) reading its output."""

    producer: str
    from_norm: bool
    roles: tuple[str, ...]
    scale: torch.nn.Parameter
    shift: torch.nn.Parameter | None = None


@dataclass
class ABQ(ActivationQuantized, Method):
    name: str = "abq"
    bits: int = 4
    group_size: int = -1  # -1 = per output channel (the reference's default)
    alpha: float = 0.5  # LET initialisation (SmoothQuant migration strength)
    let: bool = True
    lwc: bool = True
    compensation: bool = True
    bit_balance: bool = True  # 2 bits: five levels, stored three codes per 7 bits
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    compensation_lr: float = 1e-2
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Zeng et al., ABQ-LLM: Arbitrary-Bit Quantized Inference Acceleration for LLMs (AAAI 2025)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        check_range("method.alpha", self.alpha, 0.0, 1.0)
        for key in ("let_lr", "lwc_lr", "compensation_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be positive", f"set method.{key} > 0")
        self.check_activation_settings()

    @property
    def levels(self) -> int:
        return 2**self.bits + 1 if self.bits == 2 and self.bit_balance else 2**self.bits

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, False, prefix="abq",
                                    levels=self.levels if self.levels != 2**self.bits else None)

    # --- compression ---------------------------------------------------------------------------------
    def compress(self, model, calib, budget) -> Packed:
        adapter = model.adapter
        packed = Packed(model.module, self.name, self.execution)
        n_blocks = len(adapter.blocks())
        # only the windows the training steps visit are propagated (all of them when the budget covers an epoch)
        windows = list(calib.windows)[:max(1, budget.steps() * budget.batch_size)]
        heldout = [] if calib.heldout is None else list(calib.heldout)
        record = TrainingRecord()
        with adapter.eager_attention():
            inputs = adapter.capture_block_inputs(windows)
            q_in = list(inputs.hidden)
            fp_in = [h.clone() for h in q_in]
            val = adapter.capture_block_inputs(heldout)  # held-out windows: propagated, never trained on
            val_q, val_fp = list(val.hidden), [h.clone() for h in val.hidden]
            for b in each_block(self.name, n_blocks):
                fp_in, q_in, val_fp, val_q, stage = self._block(adapter, b, fp_in, q_in, inputs.kwargs, val_fp, val_q,
                                                                val.kwargs, budget, calib.windows.shape[0], packed)
                record.add(stage)
        packed.training = record if record.stages else None
        packed.info["abq_steps_per_block"] = budget.steps()
        packed.info["abq_windows"] = len(windows)
        return self.runtime_hooks(model, packed)

    def _block(self, adapter, b, fp_in, q_in, kwargs, val_fp, val_q, val_kwargs, budget, n_calib, packed):
        """Train and quantize block b; returns the next block's fp and quantized inputs (trained and held-out
        windows) and the block's training record (None when nothing trains)."""
        block = adapter.blocks()[b]
        refs = {r.role: r for r in adapter.linears() if r.block == b}
        rel = {id(m): n for n, m in block.named_modules()}
        norms = adapter.block_norms(block)
        # 1. fp outputs on the fp input, with each linear's per-channel input min/max (LET initialisation)
        stats: dict[str, list[torch.Tensor]] = {}

        def record(role):
            def hook(_m, args):  # fp32: activation min/max (the LET initialisation)
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                lo, hi = x.amin(dim=0), x.amax(dim=0)
                stats[role] = [lo, hi] if role not in stats else [torch.minimum(stats[role][0], lo),
                                                                  torch.maximum(stats[role][1], hi)]
            return hook
        hooks = [r.module.register_forward_pre_hook(record(role)) for role, r in refs.items()]
        try:
            fp_out = [adapter.run_block(b, h, kw) for h, kw in zip(fp_in, kwargs)]
        finally:
            for h in hooks:
                h.remove()
        val_fp_out = [adapter.run_block(b, h, kw) for h, kw in zip(val_fp, val_kwargs)]  # after the statistics

        g = {role: resolve_group_size(self.group_size, r.module.weight.shape[1], r.name) for role, r in refs.items()}
        transforms = self._init_transforms(adapter, refs, norms, stats) if self.let else []
        clip = {}
        if self.lwc:
            for role, r in refs.items():
                shape = (r.module.weight.shape[0], n_groups(r.module.weight.shape[1], g[role]))
                clip[role] = (torch.nn.Parameter(torch.full(shape, LWC_INIT)),
                              torch.nn.Parameter(torch.full(shape, LWC_INIT)))
        comp = None
        n_blocks = len(adapter.blocks())
        if self.compensation and (b < COMPENSATED_FIRST or b >= n_blocks - COMPENSATED_LAST):
            w = refs[adapter.mlp_out_role].module.weight
            comp = (torch.nn.Parameter(torch.zeros(w.shape[0], 1)), torch.nn.Parameter(torch.ones(1, w.shape[1])))

        def params(with_codes=False):
            return self._quantized_params(refs, norms, rel, transforms, clip, comp, g, adapter.mlp_out_role,
                                          with_codes)

        learnable = [p for t in transforms for p in (t.scale, t.shift) if p is not None]
        groups = [{"params": learnable, "lr": self.let_lr},
                  {"params": [p for pair in clip.values() for p in pair], "lr": self.lwc_lr},
                  {"params": list(comp) if comp else [], "lr": self.compensation_lr}]
        groups = [grp for grp in groups if grp["params"]]
        stage = None
        if groups and budget.steps():
            held = (val_fp, val_q, val_fp_out, val_kwargs)
            stage = self._train(adapter, b, refs, params, groups, [t.scale for t in transforms], fp_in, q_in,
                                fp_out, kwargs, held, budget, n_calib)
        with torch.no_grad():
            # 2. apply: quantized weights exactly; transformed norms and biases at their fp16 storage
            final, stored = params(with_codes=True)
            linear_weights = {f"{rel[id(r.module)]}.weight" for r in refs.values()}
            for role, r in refs.items():
                w = r.module.weight.data.clone()
                deq = final[f"{rel[id(r.module)]}.weight"]
                packed.per_layer.append({**layer_stats(r, w, deq), "includes_equivalent_transform": self.let})
            for name, value in final.items():
                block.get_parameter(name).data.copy_(value if name in linear_weights else value.half().float())
            for role, r in refs.items():
                packed.layers[r.name] = {**stored[role], **stored_bias(r.module)}
                packed.layer_format[r.name] = self.layer_format()
            # 3. next block's inputs: the quantized block (activation quantization on) on the quantized input
            hooks = self._act_hooks(refs, ste=False)
            try:
                q_out = [adapter.run_block(b, h, kw) for h, kw in zip(q_in, kwargs)]
                val_q_out = [adapter.run_block(b, h, kw) for h, kw in zip(val_q, val_kwargs)]
            finally:
                for h in hooks:
                    h.remove()
        return fp_out, q_out, val_fp_out, val_q_out, stage

    def _init_transforms(self, adapter, refs, norms, stats) -> list[_Transform]:
        def init_scale(act_role: str, roles) -> torch.Tensor:
            lo, hi = stats[act_role]
            act = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-5)
            w_max = torch.stack([refs[r].module.weight.abs().amax(dim=0) for r in roles]).amax(dim=0).clamp(min=1e-5)
            return (act.pow(self.alpha) / w_max.pow(1 - self.alpha)).clamp(min=1e-5)

        out = []
        for norm_name, roles in adapter.norm_feeds.items():
            shift = None
            if self.act_spec.enabled and getattr(norms[norm_name], "bias", None) is not None:
                lo, hi = stats[roles[0]]
                shift = torch.nn.Parameter((lo + hi) / 2)
            scale = torch.nn.Parameter(init_scale(roles[0], roles))
            out.append(_Transform(norm_name, True, tuple(roles), scale, shift))
        for a, c in adapter.linear_pairs:
            if refs[a].module.weight.shape[0] != refs[c].module.weight.shape[1]:
                continue  # grouped-query attention: v's rows do not map one-to-one onto o's columns
            out.append(_Transform(a, False, (c,), torch.nn.Parameter(init_scale(c, (c,)))))
        return out

    @fp32  # fp32: weight transforms (W @ shift, the rank-1 l r^T) and the LWC quantizer
    def _quantized_params(self, refs, norms, rel, transforms, clip, comp, g, out_role, with_codes):
        """The block's parameters after LET, compensation and LWC fake-quant, by name relative to the block
        (for functional_call); with `with_codes`, also each linear's stored tensors."""
        weight = {role: r.module.weight for role, r in refs.items()}
        bias = {role: r.module.bias for role, r in refs.items() if r.module.bias is not None}
        out: dict[str, torch.Tensor] = {}
        for t in transforms:
            s = t.scale
            if t.from_norm:
                norm = norms[t.producer]
                out[f"{rel[id(norm)]}.weight"] = norm.weight / s
                if getattr(norm, "bias", None) is not None:
                    shift = t.shift if t.shift is not None else torch.zeros_like(s)
                    out[f"{rel[id(norm)]}.bias"] = (norm.bias - shift) / s
                    for r in t.roles:
                        if r in bias:
                            bias[r] = bias[r] + refs[r].module.weight @ shift
            else:
                weight[t.producer] = weight[t.producer] / s.view(-1, 1)
                if t.producer in bias:
                    bias[t.producer] = bias[t.producer] / s
            for r in t.roles:
                weight[r] = weight[r] * s.view(1, -1)
        if comp is not None:
            weight[out_role] = weight[out_role] + comp[0] @ comp[1]
        stored = {}
        for role, r in refs.items():
            up, low = clip.get(role, (None, None))
            deq, codes, scale, zero = lwc_quantize(weight[role], self.levels, g[role], up, low)
            out[f"{rel[id(r.module)]}.weight"] = deq
            if role in bias:
                out[f"{rel[id(r.module)]}.bias"] = bias[role]
            if with_codes:
                stored[role] = {"qweight": pack_levels(codes, self.levels), "scale": scale,
                                "qzero": pack_levels(zero, self.levels)}
        return (out, stored) if with_codes else out

    def _act_hooks(self, refs, ste: bool):
        spec = self.act_spec
        if not spec.enabled:
            return []

        def hook(_m, args):
            x = args[0]
            q = fake_quant_activations(x, spec)
            return (x + (q - x).detach() if ste else q, *args[1:])
        return [r.module.register_forward_pre_hook(hook) for r in refs.values()]

    def _loss(self, block, refs, params, maps, x_q, x_fp, t_fp, kw):
        """The distribution-correction loss of the quantized block on `x_q` (fp block on the fp input `x_fp` gave
        `t_fp`) and its six terms."""
        with torch.no_grad():
            t_q = _first(block(x_q, **kw)).float()  # fp block on the quantized model's input
            maps.clear()
            block(x_fp, **kw)  # fp block on fp input: teacher maps
            a_fp = maps.pop().float()
        hooks = self._act_hooks(refs, ste=True)
        try:
            out = _first(functional_call(block, params(), (x_q,), kw))
        finally:
            for h in hooks:
                h.remove()
        a_q = maps.pop().float()
        out, t_fp = out.float(), t_fp.float()  # the loss from fp32 outputs
        terms = [F.mse_loss(out, t_fp), F.mse_loss(out, t_q), _neg_log_cos(out, t_fp), _neg_log_cos(out, t_q),
                 _kl(a_fp, a_q), _kl(a_q, a_fp)]
        loss = terms[0] + terms[1] + terms[2] + terms[3] + terms[4] + terms[5]
        values = [float(t.detach()) for t in terms]
        return loss, {"mse_fp": values[0], "mse_q": values[1], "cos_fp": values[2], "cos_q": values[3],
                      "kl_maps": values[4] + values[5]}

    def _train(self, adapter, b, refs, params, groups, scales, fp_in, q_in, fp_out, kwargs, held, budget,
               n_calib) -> StageRecord:
        steps, batch = budget.steps(), budget.batch_size
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        block = adapter.blocks()[b]
        maps: list[torch.Tensor] = []
        grab = adapter.attention(block).register_forward_hook(lambda _m, _a, out: maps.append(out[1]))
        frozen = [p for p in block.parameters() if p.requires_grad]
        for p in frozen:  # only the ABQ parameters train; the block's own weights are read, not updated
            p.requires_grad_(False)

        def step_fn(step):
            idx = [(step * batch + j) % len(q_in) for j in range(batch)]
            with torch.no_grad():
                for s in scales:  # keep LET scales away from zero, as the reference
                    s.data = torch.where(s.data.abs() < SCALE_FLOOR,
                                         torch.where(s.data < 0, -SCALE_FLOOR, SCALE_FLOOR), s.data)
            # rotary embeddings and mask of one window broadcast over the batch
            return self._loss(block, refs, params, maps, torch.cat([q_in[i] for i in idx]),
                              torch.cat([fp_in[i] for i in idx]), torch.cat([fp_out[i] for i in idx]),
                              kwargs[idx[0]])

        val_fp, val_q, val_out, val_kw = held

        def validate():  # the same loss on the held-out windows, one at a time; nothing is clamped or updated
            total, terms = 0.0, {}
            with torch.no_grad():
                for args in zip(val_q, val_fp, val_out, val_kw):
                    loss, parts = self._loss(block, refs, params, maps, *args)
                    total += float(loss)
                    for k, v in parts.items():
                        terms[k] = terms.get(k, 0.0) + v
            return total / len(val_q), {k: v / len(val_q) for k, v in terms.items()}

        trainer = Trainer(f"abq block {b}", opt, steps, samples_per_step=batch, train_samples=n_calib,
                          tokens_per_sample=q_in[0].shape[1], group="abq blocks", validate=validate,
                          heldout_samples=len(val_q), progress=False,
                          objective="mse_fp + mse_q + cos_fp + cos_q + kl_maps: MSE and -log|cos| of the quantized "
                                    "block's output against the fp block on the fp (t1) and on the quantized (t2) "
                                    "input, KL both ways of the attention maps (the paper's distribution correction)",
                          fix="lower method.let_lr/lwc_lr or set method.let=false")
        try:
            return trainer.run(step_fn)
        finally:
            grab.remove()
            for p in frozen:
                p.requires_grad_(True)

    # --- artifact ------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        g = resolve_group_size(self.group_size, in_f, ref.name)
        codes = unpack_levels(stored["qweight"], self.levels, out_f * in_f, (out_f, in_f))
        scale = stored["scale"]
        zero = unpack_levels(stored["qzero"], self.levels, scale.numel(), scale.shape)
        ref.module.weight.data.copy_(IntQuantized(codes, scale, zero, self.bits, g, False).dequantize())
        restore_bias(ref.module, stored)


def _first(out):
    return out[0] if isinstance(out, tuple) else out

