"""One run, one direction: config -> model -> method -> task -> backend -> MLflow record -> summary.

    model    = models.load(cfg.model)
    calib    = calib.load(cfg.calib, ...)                       (only for methods that need it)
    packed   = artifact cache hit ? method.restore(...) : method.compress(model, calib, budget)
    metrics  = task.evaluate(packed model)
    deployed = backend.deploy(packed)                           (real kernels: the task is evaluated again)
    measured = backend.measure(deployed, task.workload())      (or unsupported, with the reason)
    record   = one MLflow run with params, metrics, tags, artifacts; FAILED on any exception
               (a method that trains adds its training record: train.* metrics and tags, train_curve.json/png)

Nothing downstream reaches back upstream. The uncompressed baseline is a run like any other (method=none);
when a compressed method runs, the baseline's result is reused from the store if the same model weights,
task protocol and backend were already measured, and otherwise measured first.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench import calib as calib_mod
from bench import recover as recover_mod
from bench.recover import Recovery
from bench import models, precision, preflight, record, tracking
from bench.cache import ArtifactStore, content_key, file_sha256
from bench.errors import ArtifactCorrupt, BenchError, ConfigError, NumericalFailure, did_you_mean
from bench.plugins import HardwareBackend, Method, Task
from bench.record import CellResult
from bench.reference import Reference
from bench.reproduce import Launch, reproduce
from bench.training import TrainingRecord


def build(node: DictConfig, group: str):
    """Instantiate a plug-in from its YAML; config mistakes become one-line ConfigErrors."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, BenchError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            bad = str(cause).split("'")[1]
            target = node.get("_target_", "")
            cls = _import(target)
            valid = [f.name for f in fields(cls) if f.init] if cls else []
            raise ConfigError(f"{group} has no option '{bad}'",
                              f"{did_you_mean(bad, valid)}options: {', '.join(valid)}") from None
        raise ConfigError(f"invalid {group} config: {cause}", f"check configs/{group}/") from None


def check_top_level(cfg: DictConfig) -> None:
    """What no plug-in validates: mandatory values left unset (`???`), the seed and the thread count."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is not set", f"set {missing[0]}=... on the command line")
    for key, lo, example in (("seed", 0, 0), ("threads", 1, 2)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{key}={value} is not an integer >= {lo}", f"e.g. {key}={example}")
    precision.check(cfg.precision)
    precision.check(cfg.compress_precision, "compress_precision")


def _import(target: str):
    import importlib

    mod, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return None


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")[:300]


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


# core modules whose code computes a method's artifact (family toolkits, quantizers, distillation)
TOOLKIT_MODULES = ("bench.compress.", "bench.quant.")


def method_code_files(cls: type) -> list[str]:
    """The source files that compute a method's artifact: the modules of its classes (bench.plugins' contract
    excepted) and the toolkit modules those modules use."""
    modules = {c.__module__ for c in cls.__mro__
               if c.__module__.startswith("bench.") and c.__module__ != "bench.plugins"}
    for name in list(modules):
        for value in vars(sys.modules[name]).values():
            used = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(used, str) and used.startswith(TOOLKIT_MODULES):
                modules.add(used)
    return sorted(f for f in (inspect.getsourcefile(sys.modules[m]) for m in modules) if f)


def method_code_hash(method: Method) -> str:
    """Part of the cache key: a change to the code that computes the method's artifact (its module, its base
    classes' modules, the toolkits they use) invalidates its cached artifacts."""
    hashes = []
    for obj in method.code_objects():
        files = method_code_files(type(obj))
        hashes.append(content_key(*(file_sha256(f) for f in files))[:16] if files else "unknown")
    return "-".join(hashes)


class Runner:
    def __init__(self, cfg: DictConfig, launch: Launch | None = None):
        """`launch`: how the cell was asked for (its reproducing command is derived from it); by default the running
        Hydra job's, else inferred from the config's plug-in names."""
        check_top_level(cfg)
        self.cfg = cfg
        self.launch = launch or Launch.from_hydra() or Launch.infer(cfg)
        self.results = cfg.paths.results
        self.data_root = cfg.paths.data_root
        self.method: Method = build(cfg.method, "method")
        self.task: Task = build(cfg.task, "task")
        self.backend: HardwareBackend = build(cfg.hardware, "hardware")
        self.budget = build(cfg.budget, "budget")
        self.calib_spec = build(cfg.calib, "calib")
        self.model_spec = build(cfg.model, "model")
        self.recover = build(cfg.recover, "recover")
        self.store = ArtifactStore(os.path.join(self.results, "artifacts"))

    # -- keys ------------------------------------------------------------------------------------------
    def _task_key(self) -> str:
        return content_key(OmegaConf.to_container(self.cfg.task, resolve=True), type(self.task).protocol_version)

    def _cell_config(self, method_cfg: dict, recover: Recovery) -> dict:
        """The cell's full config as run: the baseline runs the main config with method=none and no recovery."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        cfg["method"] = method_cfg
        if not recover.enabled:
            cfg["recover"] = {"name": "none"}
        return cfg

    def _tags(self, method: Method, cfg: dict, recover: Recovery, model: models.LoadedModel) -> dict[str, str]:
        method_cfg = cfg["method"]
        stages = method.stage_names + ([f"recover={recover.name}"] if recover.enabled else [])
        tags = {record.METHOD: method_cfg.get("name"), record.TASK: self.task.name,
                record.RECOVER: recover.name, record.STAGES: " > ".join(stages),
                record.MODEL: self.model_spec.name, record.HARDWARE: self.backend.name,
                record.CALIB: self.calib_spec.name, record.BUDGET: self.budget.name,
                record.SEED: str(self.cfg.seed), record.CONFIG_HASH: record.cell_hash(cfg),
                record.SWEEP: record.sweep_id() or "-",
                record.TASK_KEY: self._task_key(), record.MODEL_WEIGHTS_SHA256: model.weights_sha256,
                record.GIT_COMMIT: tracking.git_commit(), record.THREADS: str(self.cfg.threads),
                record.PRECISION: self.cfg.precision, record.COMPRESS_PRECISION: self.cfg.compress_precision}
        kernels = precision.kernels("bf16" if "bf16" in (self.cfg.precision, self.cfg.compress_precision) else "fp32")
        tags.update({f"{record.PRECISION_PREFIX}{k}": v for k, v in kernels.items()})
        tags.update({f"{record.VERSION_PREFIX}{k}": v for k, v in tracking.package_versions().items()})
        tags.update({f"{record.MACHINE_PREFIX}{k}": v for k, v in tracking.machine().items()})
        return tags

    def _compute(self):
        """Evaluation, deployment and timing forwards run in this (the metric's protocol)."""
        return precision.compute(self.cfg.precision)

    def _compress_compute(self):
        """The method's and the recovery stage's calibration and training forwards run in this."""
        return precision.compute(self.cfg.compress_precision)

    def _reference(self, model: models.LoadedModel, method: Method, recover: Recovery) -> Reference | None:
        """What a task comparing with the base model gets: the base model this run loaded (its per-window results
        cached under results/data_cache/reference). The baseline cell evaluates that model itself, so its
        evaluation fills the cache (`is_evaluated`)."""
        if not type(self.task).needs_reference:
            return None
        is_base = type(method).family == "baseline" and not recover.enabled
        return Reference(model, os.path.join(self.results, "data_cache", "reference"), is_evaluated=is_base)

    def _evaluate(self, evaluated: models.LoadedModel, reference: Reference | None):
        with self._compute():
            if type(self.task).needs_reference:
                return self.task.evaluate(evaluated, self.data_root, reference=reference)
            return self.task.evaluate(evaluated, self.data_root)

    # -- one cell --------------------------------------------------------------------------------------
    def _compress_or_restore(self, run, model, method: Method, method_cfg: dict, recover: Recovery, timings: dict):
        calib = calib_id = None
        if method.needs_calibration or recover.enabled:
            calib = calib_mod.load(self.calib_spec, model.tokenizer, self.budget.calib_samples,
                                   self.budget.calib_seqlen, self.data_root, heldout=self.budget.val_samples)
            budget = OmegaConf.to_container(self.cfg.budget, resolve=True)
            budget.pop("val_samples", None)  # held-out samples only measure: they change nothing that is stored
            calib_id = {"spec": OmegaConf.to_container(self.cfg.calib, resolve=True), "sha256": calib.sha256,
                        "budget": budget}
            run.tag({record.CALIB_SET: calib.describe, record.CALIB_SHA256: calib.sha256})
        parts = [model.weights_sha256, method_cfg, calib_id, self.cfg.seed, method_code_hash(method)]
        if calib is not None and self.cfg.compress_precision != precision.REFERENCE:
            # calibration and training forwards ran in this precision, so the stored result depends on it;
            # fp32 keys stay as they were before the axis existed, and data-free methods share one artifact
            parts.append({"precision": self.cfg.compress_precision})
        if recover.enabled:  # a recovered model is another artifact; unrecovered keys stay as they were
            parts += [OmegaConf.to_container(self.cfg.recover, resolve=True), file_sha256(recover_mod.__file__)[:16]]
        key = content_key(*parts)
        t0 = time.perf_counter()
        if self.store.has(key):
            try:
                tensors, metadata = self.store.load(key)
                packed = method.restore(models.clone(model), tensors, metadata)
                if recover.enabled:
                    packed = recover.restore(models.with_module(model, packed.model), packed)
                if "training" in metadata:  # the record of the training that built this artifact
                    packed.training = TrainingRecord.from_json(metadata["training"])
                timings["restore_s"] = time.perf_counter() - t0
                run.tag({record.CACHE: "hit", record.ARTIFACT_KEY: key})
                return packed, key
            except ArtifactCorrupt as e:
                self.store.discard(key)  # rebuilt below; the corrupt file is never trusted
                run.tag({record.CACHE_DISCARDED: e.problem})
                print(f"bench: warning: {e.problem}; rebuilding it", file=sys.stderr)
        set_determinism(self.cfg.seed, self.cfg.threads)
        with self._compress_compute():
            packed = method.compress(models.clone(model), calib, self.budget)
            if recover.enabled:
                packed = recover.apply(model.module, models.with_module(model, packed.model), packed, calib,
                                       self.budget)
        timings["compress_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors = packed.tensors(model)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # caught before the cache: a broken model is never stored, evaluated or shown as a number
            raise NumericalFailure(f"method '{method_cfg['name']}' produced NaN/inf in {len(bad)} stored tensor(s), "
                                   f"first {bad[0]}", "nothing was cached and the run is recorded as failed; try "
                                   "more bits, a lower budget.lr or another method")
        metadata = packed.metadata()
        if packed.training is not None:
            metadata["training"] = packed.training.to_json()
        self.store.save(key, tensors, metadata)
        timings["artifact_write_s"] = time.perf_counter() - t0
        run.tag({record.CACHE: "miss", record.ARTIFACT_KEY: key})
        return packed, key

    def run_cell(self, model: models.LoadedModel, method: Method, method_cfg: dict,
                 recover: Recovery | None = None) -> CellResult:
        """One MLflow run; `recover` (the main cell's recovery stage) never applies to the baseline."""
        recover = recover or Recovery()
        params = self._cell_config(method_cfg, recover)
        tags = self._tags(method, params, recover, model)
        again = reproduce(params, self.launch if method is self.method else self.launch.for_baseline())
        tags.update({record.COMMAND: again.command, record.COMMAND_CHECK: again.check,
                     record.METHOD_OVERRIDES: json.dumps(again.method_overrides, sort_keys=True)})
        # scalar facts of the model as loaded (e.g. a suite-trained model's train_seconds), for the record
        tags.update({f"{record.MODEL_PREFIX}{k}": str(v) for k, v in model.info.items()
                     if isinstance(v, (int, float, str))})
        tags.update({record.METHOD_FAMILY: type(method).family, record.METHOD_PAPER: type(method).paper,
                     record.METHOD_SUMMARY: _first_line(sys.modules[type(method).__module__].__doc__)})
        timings: dict[str, float] = {}
        tracking.close_stale_runs(tags[record.CONFIG_HASH])  # a killed earlier attempt at this cell: KILLED
        with tracking.Run(f"{method_cfg['name']}|{self.task.name}|{self.model_spec.name}", params, tags) as run:
            method.check_applicable(model)
            self.task.check_applicable(model)
            packed, key = self._compress_or_restore(run, model, method, method_cfg, recover, timings)
            storage = packed.storage(model)
            storage.artifact_bytes = self.store.paths(key)[0].stat().st_size
            late_tags = {record.EXECUTION: packed.execution}
            metrics = storage.as_metrics()
            metrics.update({f"{record.METHOD_INFO}.{k}": float(v) for k, v in packed.info.items()
                            if isinstance(v, (int, float))})
            if packed.training is not None:
                metrics.update(packed.training.metrics())
                late_tags.update(packed.training.tags())
                self._training_artifacts(run, packed.training)
            if packed.per_layer:
                run.json_artifact(packed.per_layer, record.PER_LAYER_FILE)
            # --- evaluate ---
            t0 = time.perf_counter()
            evaluated = models.with_module(model, packed.model)
            reference = self._reference(model, method, recover)
            task_metrics = self._evaluate(evaluated, reference)
            timings["evaluate_s"] = time.perf_counter() - t0
            for path in self.task.artifact_files:  # e.g. a diffusion task's sample grid
                run.file_artifact(path)
            for m in task_metrics:
                if not m.finite:
                    raise NumericalFailure(f"metric {m.name} is {m.value}", "the run is recorded as failed")
                metrics[m.name] = m.value
                if m.stderr is not None:
                    metrics[f"{m.name}{record.STDERR_SUFFIX}"] = m.stderr
                if m.ci is not None:
                    metrics[m.name + record.CI95_LOW_SUFFIX], metrics[m.name + record.CI95_HIGH_SUFFIX] = m.ci
                late_tags[record.direction_tag(m.name)] = m.direction
            if task_metrics:  # tasks list their headline metric first (ranking, plots)
                late_tags[record.PRIMARY_METRIC] = task_metrics[0].name
            if self.task.failures:  # part of a multi-task run could not run (e.g. missing data): said, not hidden
                late_tags[record.TASK_FAILURES] = json.dumps(self.task.failures)
            run.json_artifact([{"name": m.name, "value": m.value, "direction": m.direction, "unit": m.unit,
                                "stderr": m.stderr, "ci95": m.ci, "notes": m.notes,
                                "per_sample_name": m.per_sample_name,
                                "per_sample": m.per_sample} for m in task_metrics], record.TASK_METRICS_FILE)
            # --- measure (on the model as the backend deploys it) ---
            t0 = time.perf_counter()
            reason = self.backend.supports(packed)
            if not reason:
                with self._compute():
                    deployed = self.backend.deploy(packed)
                if deployed is not packed:  # real kernels: the accuracy of what runs, beside the torch model's
                    timings["deploy_s"] = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    compared = None if reference is not None and reference.is_evaluated else reference
                    metrics.update(self._evaluate_deployed(run, evaluated, packed, deployed, task_metrics, compared))
                    late_tags[record.DEPLOYED_EXECUTION] = deployed.execution
                    timings["evaluate_deployed_s"] = time.perf_counter() - t1
                    t0 = time.perf_counter()
                with self._compute():
                    measured = self.backend.measure(deployed, self.task.workload(evaluated, self.data_root))
                reason = measured.unsupported
            if reason:
                late_tags.update({record.HARDWARE_STATUS: "unsupported", record.HARDWARE_UNSUPPORTED: reason})
            else:
                metrics.update(measured.metrics)
                late_tags.update({f"{record.HARDWARE_PREFIX}{k}": v for k, v in measured.tags.items()})
            timings["measure_s"] = time.perf_counter() - t0
            metrics.update({f"{record.TIME}.{k}": v for k, v in timings.items()})
            run.tag(late_tags)
            run.metrics(metrics)
            run.text_artifact(OmegaConf.to_yaml(params), record.CONFIG_FILE)  # the cell's config, as run
            return CellResult(run.id, method_cfg["name"], metrics, dict(run.tags), timings)

    @staticmethod
    def _training_artifacts(run, training: TrainingRecord) -> None:
        """train_curve.json (every stage: raw and smoothed loss, lr, terms, held-out checkpoints, verdict) and
        train_curve.png."""
        run.text_artifact(training.to_json(), record.TRAIN_CURVE_FILE)
        with tempfile.TemporaryDirectory() as d:
            run.file_artifact(str(training.plot(Path(d) / record.TRAIN_CURVE_PLOT)))

    def _evaluate_deployed(self, run, evaluated: models.LoadedModel, packed, deployed, task_metrics,
                           reference: Reference | None) -> dict:
        """The task again, on the model the backend really runs (against the same reference):
        `<metric>.deployed` and its difference to the torch model's value, `<metric>.deployed_minus_<execution>`
        (e.g. ..._minus_fake_quant)."""
        again = {m.name: m for m in self._evaluate(models.with_module(evaluated, deployed.model), reference)}
        out = {}
        for m in task_metrics:
            d = again.get(m.name)
            if d is None or m.name.startswith(f"{record.COST}."):  # MACs/params: the architecture, not the run
                continue
            if not d.finite:
                raise NumericalFailure(f"metric {m.name} on the deployed model ({deployed.execution}) is {d.value}",
                                       "the run is recorded as failed")
            out[f"{m.name}{record.DEPLOYED_SUFFIX}"] = d.value
            out[f"{m.name}.deployed_minus_{packed.execution.replace('-', '_')}"] = d.value - m.value
        run.json_artifact([{"name": m.name, "value": m.value, "execution": deployed.execution, "unit": m.unit,
                            "per_sample_name": m.per_sample_name, "per_sample": m.per_sample}
                           for m in again.values()], record.TASK_METRICS_DEPLOYED_FILE)
        return out

    def baseline(self, model: models.LoadedModel) -> CellResult:
        prior = tracking.find_finished({record.METHOD: "none", record.TASK_KEY: self._task_key(),
                                        record.MODEL_WEIGHTS_SHA256: model.weights_sha256,
                                        record.HARDWARE: self.backend.name, record.PRECISION: self.cfg.precision})
        if prior:
            r = prior[0]
            return CellResult(r.info.run_id, "none", dict(r.data.metrics), dict(r.data.tags), reused=True)
        from bench.methods.none import NoCompression

        return self.run_cell(model, NoCompression(), {"_target_": "bench.methods.none.NoCompression", "name": "none"})

    def run(self) -> tuple[CellResult | None, CellResult]:
        set_determinism(self.cfg.seed, self.cfg.threads)
        tracking.setup(self.results)
        t0 = time.perf_counter()
        preflight.check_fits(self.model_spec)  # estimated from the weight files, before loading them
        model = models.load(self.model_spec, self.data_root)
        load_s = time.perf_counter() - t0
        self.method.check_applicable(model)  # before the baseline is measured, not after
        self.task.check_applicable(model)
        method_cfg = OmegaConf.to_container(self.cfg.method, resolve=True)
        base = None
        if self.method.name != "none" and self.cfg.compare_baseline:
            base = self.baseline(model)
        result = self.run_cell(model, self.method, method_cfg, self.recover)
        result.timings["model_load_s"] = load_s
        return base, result
