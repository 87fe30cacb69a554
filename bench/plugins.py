"""The plug-in contracts: Method, Task, HardwareBackend. One module + one YAML each under methods/, tasks/,
hardware/. Each plug-in class is a dataclass built by Hydra from its YAML (`_target_`) and validates
itself in `__post_init__`. Plug-ins never import each other; data flows one way (see DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from bench.budget import Budget
from bench.calib import CalibSet
from bench.errors import ArtifactCorrupt, NotApplicable
from bench.metrics import Metric
from bench.models import LoadedModel
from bench.models.adapter import LinearRef
from bench.packed import EXECUTION_FAKE_QUANT, Packed, read_layer_formats
from bench.reference import Reference


@dataclass
class Method:
    name: str
    family: ClassVar[str] = ""  # quantization | binarization | pruning | none ...
    paper: ClassVar[str] = ""
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm",)
    needs_calibration: ClassVar[bool] = False

    def check_applicable(self, model: LoadedModel) -> None:
        if model.kind not in self.applies_to:
            raise NotApplicable(f"method '{self.name}' does not apply to {model.kind} model '{model.spec.name}'",
                                f"it applies to: {', '.join(self.applies_to)}")

    def compress(self, model: LoadedModel, calib: CalibSet | None, budget: Budget) -> Packed:
        raise NotImplementedError

    def restore_layer(self, model: LoadedModel, ref: LinearRef, stored: dict[str, torch.Tensor]) -> None:
        """Rebuild one compressed layer from its stored tensors (in place, or via adapter.replace_linear)."""
        raise NotImplementedError

    execution: ClassVar[str] = EXECUTION_FAKE_QUANT

    def restore(self, model: LoadedModel, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Packed:
        """Rebuild the runnable model from a stored artifact (the compressed-model cache). `model` is a
        fresh copy of the base model; its other parameters are overwritten from the artifact too."""
        layer_format = read_layer_formats(metadata)
        stored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layer_format}
        kept = {}
        for key, t in tensors.items():
            layer = next((n for n in layer_format if key.startswith(n + ".")), None)
            if layer is None:
                kept[key] = t
            else:
                stored[layer][key[len(layer) + 1:]] = t
        missing, unexpected = model.module.load_state_dict(
            {k: v.to(torch.float32) for k, v in kept.items()}, strict=False)
        if unexpected:
            raise ArtifactCorrupt(f"artifact holds unknown tensors ({unexpected[0]}, ...)",
                                  "it was written for another model; delete it to rebuild")
        for ref in list(model.adapter.linears()):
            if ref.name in stored:
                self.restore_layer(model, ref, stored[ref.name])
        packed = Packed(model.module, self.name, self.execution, stored, layer_format)
        packed.info["restored_from_artifact"] = True
        return self.runtime_hooks(model, packed)

    @property
    def stage_names(self) -> list[str]:
        """The stages the record lists (`bench.stages`); a pipeline names each of its methods."""
        return [self.name]

    def code_objects(self) -> list:
        """Whose source files key the artifact cache (a pipeline adds its stages)."""
        return [self]

    def runtime_hooks(self, model: LoadedModel, packed: Packed) -> Packed:
        """Run-time behaviour that is not stored weights (e.g. activation quantization), re-attached after
        compress and after restore alike."""
        return packed


@dataclass
class Workload:
    """What a backend times. `kind="causal_lm"`: a prefill of `prompt_ids` and `decode_tokens` greedy
    decoding steps; `kind="image"`: one forward pass of `inputs`, named `label` in the metrics;
    `kind="diffusion"`: `sampler(model)` is a module running all `steps` denoiser calls from the noise `inputs`."""

    kind: str
    prompt_ids: torch.Tensor | None = None
    decode_tokens: int = 32
    inputs: torch.Tensor | None = None
    label: str = ""
    steps: int = 0
    sampler: Callable | None = None


@dataclass
class Task:
    name: str
    limit: int | None = None  # first N windows/examples; a limited run says so in its metric names
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm",)
    protocol_version: ClassVar[str] = "1"
    # True: the task also compares the evaluated model with the uncompressed base model the run loaded, and
    # `evaluate` takes `reference=`: the runner passes a bench.reference.Reference over that base model for every
    # compressed (or recovered) model, and None for the baseline cell itself, which is the reference.
    needs_reference: ClassVar[bool] = False
    # set by `evaluate`, read by the runner after it: files stored with the run (e.g. a sample grid), and the
    # parts of a multi-part task that could not run, {part: error} (recorded, never hidden)
    artifact_files: list[str] = field(default_factory=list, init=False, repr=False)
    failures: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def check_applicable(self, model: LoadedModel) -> None:
        if model.kind not in self.applies_to:
            raise NotApplicable(f"task '{self.name}' does not apply to {model.kind} model '{model.spec.name}'",
                                f"it applies to: {', '.join(self.applies_to)}")

    def evaluate(self, model: LoadedModel, data_root: str | None = None,
                 reference: Reference | None = None) -> list[Metric]:
        """`reference` is passed only to tasks that set `needs_reference`."""
        raise NotImplementedError

    def workload(self, model: LoadedModel, data_root: str | None = None) -> Workload:
        raise NotImplementedError

    def limit_tag(self) -> str:
        return f".first{self.limit}" if self.limit else ""


@dataclass
class Measurement:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. energy source, execution kind
    unsupported: str | None = None  # reason, when the backend cannot run this packed model


@dataclass
class HardwareBackend:
    """A `hardware=` choice: where and how the packed model runs (a CPU with torch or real low-bit kernels, a GPU, a
    mobile runtime, a simulated accelerator), what it can execute, and its measurements."""

    name: str
    # What this backend really executes. A packed model needing something not listed is `unsupported`.
    capabilities: ClassVar[dict] = {}

    def supports(self, packed: Packed) -> str | None:
        return None

    def deploy(self, packed: Packed) -> Packed:
        """The packed model as this backend executes it (called only when `supports` said yes). By default
        torch runs `packed.model` itself. A backend with real kernels returns a new Packed whose model calls
        them and whose `execution` names them; the runner then evaluates the task on it too and records both
        accuracies, and `measure` receives it."""
        return packed

    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        raise NotImplementedError
