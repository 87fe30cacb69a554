"""`Packed`: what a method returns. The runnable model, the stored tensors, and the storage report.

Storage is counted from the tensors actually written: `bits_per_weight` = 8 x (bytes stored for the decoder
linear layers, every scale/zero/expert/router included) / (their number of weights), and `artifact_bytes`
is the size of the safetensors file on disk (compressed layers + every other parameter at the model's
storage dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.errors import ArtifactCorrupt
from bench.layer_format import LayerFormat
from bench.models import LoadedModel
from bench.training import TrainingRecord

# How the timed/evaluated model executes the compressed layers. Backends and summaries say this out loud.
EXECUTION_DENSE = "dense"  # ordinary fp32 matmuls on uncompressed weights
EXECUTION_FAKE_QUANT = "fake-quant"  # fp32 matmuls on dequantized weights: accuracy is real, speed is not
EXECUTION_SPARSE_AS_DENSE = "dense-zeros"  # pruned weights run as dense fp32 matmuls: no sparse kernel, no speed-up
EXECUTION_EMULATED_PREFIX = "emulated-"  # another arithmetic emulated in fp32 torch code: its accuracy, not its speed

@dataclass
class StorageReport:
    n_weights: int  # weights of the decoder-block linear layers
    linear_bytes: int  # bytes stored for those layers (all overheads)
    other_bytes: int  # embeddings, norms, head ... at storage dtype
    n_params: int
    artifact_bytes: int | None = None  # file size on disk, once written

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.linear_bytes / self.n_weights

    @property
    def bits_per_param(self) -> float:
        return 8.0 * (self.linear_bytes + self.other_bytes) / self.n_params

    def as_metrics(self) -> dict[str, float]:
        m = {"storage.bits_per_weight.block_linears": self.bits_per_weight,
             "storage.bits_per_param.model": self.bits_per_param,
             "storage.block_linear_bytes": float(self.linear_bytes),
             "storage.other_bytes": float(self.other_bytes)}
        if self.artifact_bytes is not None:
            m["storage.artifact_bytes"] = float(self.artifact_bytes)
        return m


@dataclass
class Packed:
    model: nn.Module
    method: str
    execution: str
    # compressed layer name -> its stored tensors (packed codes, fp16 scales, ...)
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layer_format: dict[str, LayerFormat] = field(default_factory=dict)  # compressed layer -> its format
    per_layer: list[dict] = field(default_factory=list)  # statistics, logged as an artifact
    info: dict = field(default_factory=dict)  # method-specific facts for the record (numbers become method.*)
    extra_metadata: dict[str, str] = field(default_factory=dict)  # what a restore needs besides tensors
    training: TrainingRecord | None = None  # the trained stages, for methods that train (bench.training)

    def tensors(self, base: LoadedModel) -> dict[str, torch.Tensor]:
        """Everything the artifact stores: compressed layers + the other parameters at storage dtype."""
        storage = getattr(torch, base.spec.storage_dtype)
        out: dict[str, torch.Tensor] = {}
        for layer, ts in self.layers.items():
            for k, t in ts.items():
                out[f"{layer}.{k}"] = t.contiguous()
        prefixes = tuple(f"{layer}." for layer in self.layers)
        state = self.model.state_dict()
        # tied weights (embeddings == head) are stored once: not at all beside a compressed layer they alias
        seen = {p.data_ptr() for name, p in state.items() if name.startswith(prefixes)}
        for name, p in state.items():
            if name.startswith(prefixes) or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            out[name] = p.detach().to(storage).contiguous()
        return out

    def storage(self, base: LoadedModel) -> StorageReport:
        tensors = self.tensors(base)
        block_linears = {r.name for r in base.adapter.linears()}
        n_weights = base.info["n_block_linear_weights"]
        compressed_linears = [lay for lay in self.layers if lay in block_linears]  # not a compressed embedding

        def is_linear(key: str) -> bool:
            return key.rpartition(".")[0] in block_linears or \
                any(key.startswith(f"{lay}.") for lay in compressed_linears)

        linear = sum(t.numel() * t.element_size() for k, t in tensors.items() if is_linear(k))
        other = sum(t.numel() * t.element_size() for k, t in tensors.items() if not is_linear(k))
        return StorageReport(n_weights, linear, other, base.info["n_params"])

    def metadata(self) -> dict[str, str]:
        formats = {k: v.to_json() for k, v in self.layer_format.items()}
        return {"method": self.method, "execution": self.execution, "layer_format": json.dumps(formats),
                **self.extra_metadata}


def read_layer_formats(metadata: dict[str, str]) -> dict[str, LayerFormat]:
    """The layer formats of an artifact's metadata (`Packed.metadata`), typed; label strings of artifacts written
    before formats were typed are parsed (`LayerFormat.from_label`)."""
    try:
        return {k: LayerFormat.from_json(v) for k, v in json.loads(metadata.get("layer_format", "{}")).items()}
    except (ValueError, TypeError) as e:
        raise ArtifactCorrupt(f"the artifact's layer formats cannot be read ({e})", "it will be rebuilt") from None


def layer_stats(ref, w: torch.Tensor, wq: torch.Tensor) -> dict:
    """Per-layer record: relative Frobenius error of the compressed weight."""
    err = (w.float() - wq.float()).norm() / w.float().norm().clamp(min=1e-12)
    return {"layer": ref.name, "block": ref.block, "role": ref.role, "shape": list(w.shape),
            "rel_weight_error": float(err)}
