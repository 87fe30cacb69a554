"""`bct`: BCT, "Blockwise Compression of Transformer-based Models without Retraining" (Gaochen Dong, Wei Chen; arXiv
2304.01483, 2023; its earlier version is BBCT, "Block-wise Bit-Compression of Transformer-based Models", arXiv
2303.09184). Post-training, no retraining, no calibration data: every component of the transformer is quantized to
integers blockwise (a scale per small block of a tensor instead of one per layer), the paper's list being "the
embedding, matrix multiplication, GELU, Softmax, layer normalization, and intermediate results".

Read, through the search tool (corpora docs and pages): the abstract of 2304.01483 (huggingface.co/papers, ar5iv,
llm-bible, bohrium, emergentmind pages), the BBCT abstract (researchtrend, paperswithcode, emergentmind pages) and a
secondary summary (emergentmind topic "blockwise compression of transformers", which adds: adaptive low-bit
quantization per block from the block's own statistics, integer-only inference, optional entropy coding). The body
of the paper (its block shapes, scale encoding, integer kernels for GELU/softmax/layer norm and its bit-width
tables) was not reachable offline, so none of those details is copied from it. No reference code is public:
paperswithcode lists none for BBCT, and find_repos / a code search for the paper found none, so none was read.

What is implemented (fake-quant: every quantized value is computed exactly on its grid, the arithmetic between
grids is the run's float precision):
- "Blockwise": a block is `block_size` consecutive elements of a tensor's last dimension (the reduction dimension of
  the matmul that reads it; the last block shorter when the size does not divide it, one block when the dimension is
  shorter, e.g. a 32-wide head), each block with its own absmax scale. This is our reading of the abstract's
  "blockwise" (finer than layerwise, per block statistics), not a block shape taken from the paper.
- Weights: every block linear of the adapter (q, k, v, o and the MLP's) and every embedding table (token, and OPT's
  learned positions), plus the LM head when it is not tied to the token embedding (tied, as in SmolLM2, it is the
  quantized embedding): `bits`-bit symmetric integers per row and block of `block_size` input columns with an fp16
  scale, i.e. the suite's rtn grid (bench.quant.integer.quantize_rtn, symmetric, group = block), stored packed
  (bench.quant.integer.stored_int_layer): bits per weight and the embedding's bits are counted from those bytes.
- Intermediate results, dynamically per block at `act_bits` (bench.quant.activation.fake_quant_blocks, fp32 scales
  computed on the fly, signed symmetric codes): the output of each embedding; the input and the output of every block
  linear (so the layer norm / RMSNorm outputs feeding q, k, v and the MLP, the attention context feeding o, and the
  gated product act(gate) * up feeding down); the output of every norm (the blocks' and the final one, which feeds
  the head); the output of the MLP's activation (SiLU for LLaMA/SmolLM2, GELU where a model has it, ReLU for OPT);
  the query, key and value as the attention matmuls read them (after rotary embeddings); the softmax input (the
  scaled scores, before the causal mask is added, so masked positions never set a block's scale); the softmax
  output (unsigned codes, probabilities being non-negative); and every block's output (the residual stream between
  blocks). Attention is computed by the shared quantized attention (bench/quant/attention.py, through the
  adapter's `use_attention`); norms, activations, embeddings and linears
  are the adapter's, so any adapted architecture gets the same treatment.

Deviations and what is not quantized, each deliberate:
- Fake-quant, not integer-only: softmax, norms and activations are computed in float on quantized inputs and their
  outputs are quantized; the paper's integer approximations/kernels for them are not implemented (not readable here)
  and no integer kernel here runs the result: execution `fake-quant`, and cpu_kernels and tflite refuse it (their
  int8 activations are per token or per tensor, never per block, and they do not quantize softmax/norm/activation
  outputs); fpga_sim refuses language models; hardware=cpu times the fake-quant model.
- Scales: weight scales fp16 (stored), activation scales fp32 (dynamic, not stored): the paper's scale encoding is
  not known here.
- Not quantized: the norms' own weights (stored at the model's storage dtype, like every other unquantized tensor),
  rotary embeddings, the additive attention mask, the residual sum inside a block (attention output + residual:
  the adapter gives no handle on it; its two terms are both quantized, and the sum is quantized again at the
  block's output), and the arithmetic inside softmax/norm/activation (float).
- No entropy coding (the secondary summary's "optionally"): the stored codes are plain packed integers.
- Each operator's format is in the record: `per_layer.json` lists one row per operator site (quantized or not, with
  its format or the reason), and the layer formats of the artifact carry the linears' weight + activation formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.rtn import restore_int_layer
from bench.errors import ConfigError, check_range
from bench.layer_format import ActFormat, LayerFormat
from bench.models.adapter import LinearRef
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import attention, quantize_rtn
from bench.quant.activation import fake_quant_blocks
from bench.quant.integer import stored_int_layer, weight_matrix


def _first(out, fn):
    """`fn` applied to a module's output, or to its first element when the module returns a tuple."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def bct_attention(block: int, bits: int, block_size: int) -> attention.AttentionQuant:
    """Block `block`'s attention operands as BCT quantizes them (bench/quant/attention.py computes the attention):
    query, key and value per block of head_dim, the softmax input per block of keys (before the mask), its output
    on an unsigned grid."""
    def signed(t):
        return fake_quant_blocks(t, bits, block_size)

    def unsigned(t):
        return fake_quant_blocks(t, bits, block_size, unsigned=True)

    return attention.AttentionQuant(block, query=signed, key=signed, value=signed, scores=signed, probs=unsigned)


@dataclass
class BCT(Method):
    name: str = "bct"
    bits: int = 8  # weights: block linears, embeddings (and an untied head)
    act_bits: int = 8  # every quantized intermediate result
    block_size: int = 64  # consecutive elements of the last dimension per scale
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = ("Dong & Chen, Blockwise Compression of Transformer-based Models without Retraining "
                            "(arXiv 2304.01483, 2023): BCT")

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        check_range("method.act_bits", self.act_bits, 2, 8)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"method.block_size={self.block_size} is not a block size",
                              "use a positive integer number of elements per scale, e.g. 64")

    # --- formats ------------------------------------------------------------------------------------------------
    def weight_format(self, prefix: str = "bct") -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.block_size, True, prefix=prefix)

    def act_format(self, unsigned: bool = False) -> ActFormat:
        return ActFormat(self.act_bits, "int", f"per_block{self.block_size}", "dynamic",
                         detail=("unsigned",) if unsigned else ())

    def linear_format(self) -> LayerFormat:
        """A block linear: its weight grid, its quantized input, and (note) its quantized output."""
        return self.weight_format().with_act(self.act_format()).with_notes(f"out-{self.act_format().label}")

    # --- compress / restore ---------------------------------------------------------------------------------------
    @staticmethod
    def weight_tables(model) -> list[LinearRef]:
        """The embedding tables, and the head when it is not tied to one of them, as (name, module) refs."""
        adapter = model.adapter
        names = {id(m): n for n, m in model.module.named_modules()}
        tables = list(adapter.embeddings())
        head = adapter.head()
        if all(head.weight is not t.weight for t in tables):
            tables.append(head)
        return [LinearRef(-1, "head" if t is head else "embedding", names[id(t)], t) for t in tables]

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        self.check_applicable(model)
        packed = Packed(model.module, self.name, self.execution)
        tables = self.weight_tables(model)
        for ref in [*model.adapter.linears(), *tables]:
            w = weight_matrix(ref.module)
            q = quantize_rtn(w, self.bits, self.block_size, symmetric=True, layer=ref.name)
            packed.layers[ref.name] = stored_int_layer(q.codes, q.scale, None, self.bits,
                                                       getattr(ref.module, "bias", None))
            wq = q.dequantize()
            packed.per_layer.append(layer_stats(ref, w, wq))
            w.copy_(wq)
            packed.layer_format[ref.name] = self.weight_format(f"bct-{ref.role}") if ref.block < 0 \
                else self.linear_format()
        return self.runtime_hooks(model, packed)

    def restore_layer(self, model, ref, stored) -> None:
        restore_int_layer(ref, stored, self.bits, self.block_size, True)

    def restore(self, model, tensors, metadata) -> Packed:
        packed = super().restore(model, tensors, metadata)  # the block linears
        for ref in self.weight_tables(model):
            self.restore_layer(model, ref, packed.layers[ref.name])
        return packed

    # --- the quantized operators (after compress and after restore alike) --------------------------------------------
    def runtime_hooks(self, model, packed: Packed) -> Packed:
        adapter, bits, block = model.adapter, self.act_bits, self.block_size

        def quantize(t: torch.Tensor) -> torch.Tensor:
            return fake_quant_blocks(t, bits, block)

        def quantize_output(_module, _args, out):
            return _first(out, quantize)

        sites: dict[str, int] = {}

        def hook_outputs(site: str, modules) -> None:
            seen = set()
            for m in modules:
                if id(m) not in seen:
                    seen.add(id(m))
                    m.register_forward_hook(quantize_output)
            sites[site] = len(seen)

        linears = [r.module for r in adapter.linears()]
        for m in linears:
            m.register_forward_pre_hook(lambda _m, args: (quantize(args[0]), *args[1:]))
        sites["linear.input"] = len(linears)
        hook_outputs("linear.output", linears)
        hook_outputs("embedding.output", adapter.embeddings())
        blocks = list(adapter.blocks())
        hook_outputs("norm.output", [n for b in blocks for n in adapter.block_norms(b).values()]
                     + [adapter.final_norm()])
        activations = [adapter.mlp_activation(b) for b in blocks]
        hook_outputs(f"mlp_activation.output ({type(activations[0]).__name__})", activations)
        hook_outputs("block.output (residual stream)", blocks)
        attention.attach(adapter, {i: bct_attention(i, bits, block) for i in range(len(blocks))})
        sites["attention.query_key_value"] = sites["softmax.input"] = sites["softmax.output"] = len(blocks)

        act, unsigned = self.act_format().label, self.act_format(unsigned=True).label
        rows = [{"operator": "linear.weight", "format": self.weight_format().label, "sites": len(linears)}]
        rows += [{"operator": f"{ref.role}.weight ({ref.name})", "format": packed.layer_format[ref.name].label,
                  "sites": 1} for ref in self.weight_tables(model)]
        rows += [{"operator": site, "format": unsigned if site == "softmax.output" else act, "sites": n}
                 for site, n in sites.items()]
        rows += [{"operator": op, "format": "not quantized", "why": why} for op, why in NOT_QUANTIZED]
        packed.per_layer = [*packed.per_layer, *rows]
        table_bytes = {r.name: sum(t.numel() * t.element_size() for t in packed.layers[r.name].values())
                       for r in self.weight_tables(model)}
        table_weights = sum(r.module.weight.numel() for r in self.weight_tables(model))
        packed.info.update({"block_size": block, "act_bits": bits, "operator_sites": sum(sites.values()),
                            "embedding_bits_per_weight": 8.0 * sum(table_bytes.values()) / table_weights})
        packed.extra_metadata["bct"] = f"bits={self.bits};act_bits={bits};block_size={block}"
        return packed


NOT_QUANTIZED = (
    ("norm.weight", "stored at the model's storage dtype like every unquantized tensor; its output is quantized"),
    ("rotary embedding", "float; the query and key it rotates are quantized as the attention reads them"),
    ("attention mask", "added exactly after the softmax input is quantized"),
    ("residual sum inside a block", "no adapter handle; both terms are quantized, the block output is too"),
    ("softmax / norm / activation arithmetic", "float on quantized inputs (fake-quant, no integer kernels)"),
)
