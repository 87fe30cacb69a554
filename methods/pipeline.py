"""`method=pipeline`: methods applied one after another to the same model, e.g. SparseGPT 2:4 then RTN 4-bit
(configs/method/pipeline.yaml). Each stage compresses what the previous one left. The stored artifact is
the last stage's format (it describes the final weights completely: RTN keeps SparseGPT's zeros exactly,
as 0 is on its grid), so bits/weight is the last stage's; every stage's record is kept under its name and
the run is tagged with the stages in order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

from bench.errors import ConfigError
from bench.plugins import Method
from bench.training import TrainingRecord


@dataclass
class Pipeline(Method):
    name: str = "pipeline"
    stages: list = field(default_factory=list)  # Method objects (Hydra instantiates the stage configs)
    family: ClassVar[str] = "pipeline"

    def __post_init__(self):
        if len(self.stages) < 2 or not all(isinstance(s, Method) for s in self.stages):
            raise ConfigError("method=pipeline needs at least two stages, each a method config with _target_",
                              "see configs/method/pipeline.yaml")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.stages)

    @property
    def execution(self) -> str:
        return self.stages[-1].execution

    def check_applicable(self, model) -> None:
        for s in self.stages:
            s.check_applicable(model)

    def code_objects(self) -> list:
        return [self, *self.stages]

    def compress(self, model, calib, budget):
        records = []
        for stage in self.stages:
            packed = stage.compress(model, calib if stage.needs_calibration else None, budget)
            records.append(packed)
        training = TrainingRecord()
        for rec in records:  # the stages that trained, in order
            training.add(rec.training)
        packed.training = training if training.stages else None
        packed.method = self.name
        for stage, rec in zip(self.stages, records):
            packed.info.update({f"{stage.name}.{k}": v for k, v in rec.info.items() if isinstance(v, (int, float))})
            packed.extra_metadata.update(rec.extra_metadata)
        packed.per_layer = [{"stage": s.name, **row} for s, rec in zip(self.stages, records) for row in rec.per_layer]
        packed.extra_metadata["stages"] = json.dumps(self.stage_names)
        return packed

    def restore(self, model, tensors, metadata):
        if "removed_blocks" in metadata:  # a depth-pruning stage ran: the artifact is of the shallower model
            model.adapter.remove_blocks(json.loads(metadata["removed_blocks"]))
        packed = self.stages[-1].restore(model, tensors, metadata)
        for stage in self.stages[:-1]:
            packed = stage.runtime_hooks(model, packed)
        packed.method = self.name
        return packed
