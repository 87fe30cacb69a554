"""Training: the one optimisation loop of every method that trains (and of the suite's own model training), and
the record each training run keeps, with its convergence verdict.

The loop (`Trainer.run`). Per step the caller's `step_fn(step)` draws its batch (its own sampling: distillation
walks seeded epochs, the binary-conv and diffusion loops draw with replacement, ABQ walks its windows in order) and
returns the loss and its named terms, computed under the run's compute precision. The trainer refuses a
non-finite loss (NumericalFailure, one line), zeroes the gradients and then, in fp32 outside autocast
(bench/precision.py: backward and the update never run in bf16), runs backward, optional gradient clipping, the
optimizer step, the lr schedule step and the caller's `after_step(step)` (a projection, an EMA update). At
checkpoints it evaluates the caller's `validate()`, a held-out loss, in no-grad and eval mode; validation draws no
random numbers and touches no parameter, so the trained weights are the same with or without it.

The record (`StageRecord`, one per trained stage; `TrainingRecord` holds a run's stages: FoldGPT's gates and norms,
a method then `recover=`, ABQ's blocks): loss per step, raw and smoothed (an exponential moving average, bias
corrected, span = 5% of the steps), the lr per step, named loss terms per step (as they enter the loss, weights
applied, unless the stage's `objective` says otherwise), the held-out loss at checkpoints, samples and tokens seen,
epochs over the training set, training wall seconds (validation excluded, timed apart), and the verdict below.

Convergence criterion (`judge`, stated in one line as CRITERION): a stage has converged when its loss fell by less
than 2% of its value between 50% and 80% of the stage's lr-time, lr-time being the learning rate summed over the
steps so far divided by its sum over the whole stage. The loss judged is the held-out validation loss at the
checkpoints placed at those lr-times; without held-out data, the mean training loss over the 10% of lr-time
ending at each point. Stages of fewer than 20 steps are never called converged.
- Why lr-time and not steps: every loop here decays the lr to 0 (warm-up then cosine); the last 20% of the steps
  carry only ~2.5% of the summed lr, so any run's loss flattens there because its steps shrink, and a rule such as
  "the smoothed loss changed < 2% over the last 20% of steps" calls a starved 64-step run converged. What an
  optimizer step achieves scales with the lr; against lr-time, a starved run's loss is still falling steeply.
- Why the slice 0.5-0.8: under cosine it is ~25%-48% of the steps, where the lr is still 85%-53% of its peak
  (constant lr: steps 50%-80%). The lr is at least half its peak throughout, so a flat loss there is no artefact of
  a vanishing step; and the slice ends before the annealing tail, where lowering the lr lowers the loss by cutting
  gradient noise rather than by progress, a drop that would make converged runs look unconverged in lr-time (a
  noise floor proportional to the lr still shows in the slice, as ~1/3 of its size at the peak lr: up to ~6% of
  the loss passes).
- Why 2%: were the loss to keep falling at the slice's rate (loss curves flatten, so this bounds it from above),
  twice the budget (twice the lr-time) would lower it by at most ~2%/0.3 = 7%; in practice much less.
- Why the held-out loss: it is measured on the same windows every time, so it lacks the window-to-window noise of
  a batch-1 training loss; and it shows over-fitting: a held-out loss that rises across the slice counts as
  converged (more training would not help) and the verdict says so.
- Why every term: a loss that sums differently scaled measures hides the progress of its small terms. BinaryMoS's
  reference objective is KL on logits + 10 x the hidden-state MSE; on the default model the MSE is ~100x the KL
  and flat, so the sum fell 1.8% over the slice at 64 steps (converged by the sum) while the held-out KL fell 24%,
  and doubling the steps halved the perplexity. So each named term the loss reports (held-out where the loss is,
  else its training mean) is judged like the loss, and a run whose loss or any term still falls has not converged.
  Only terms positive at both points are judged: a relative fall needs a value that is a distance from zero
  (EdgeQAT's -log terms can be negative).
A multi-stage run is converged only if every stage is.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from bench.errors import NumericalFailure
from bench.precision import fp32

SLICE = (0.5, 0.8)  # lr-time between which the loss is judged
MAX_DROP = 0.02  # a fall smaller than this fraction of the loss = converged
MIN_STEPS = 20
FALLBACK_WINDOW = 0.1  # lr-time averaged over when the training loss stands in for the held-out loss
CRITERION = ("converged = the held-out loss (else the mean training loss), and each positive term of it, fell by < 2% "
             "of its value between 50% and 80% of the stage's summed learning rate (lr-time), every stage; < 20 steps "
             "is never converged")
SMOOTH_SPAN = 0.05  # EMA span of the smoothed curve, as a fraction of the steps
VAL_SHARE = 0.2  # checkpoints every 0.1 of lr-time while their held-out samples stay within this share of the trained


# --- schedules and optimizer ---------------------------------------------------------------------------------
def warmup_cosine(warm: int, steps: int) -> Callable[[int], float]:
    """The lr multiplier of step s: linear warm-up over `warm` steps, then cosine decay to 0 (HF's "cosine")."""
    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return lr_at


def budget_schedule(budget, steps: int) -> Callable[[int], float]:
    """`warmup_cosine` with `budget.warmup_ratio` of the steps (at least one) as warm-up."""
    return warmup_cosine(max(1, int(math.ceil(budget.warmup_ratio * steps))), steps)


def budget_adamw(params, budget) -> torch.optim.AdamW:
    """AdamW with the lr and weight decay of `budget=` (betas 0.9, 0.999): every distillation loop's optimizer."""
    return torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.999), weight_decay=budget.weight_decay)


def lr_times(lrs: list[float]) -> list[float]:
    """Lr-time after k steps, k = 0..n: the lr summed over the first k steps / its sum over all n."""
    total = sum(lrs)
    out, acc = [0.0], 0.0
    for lr in lrs:
        acc += lr
        out.append(acc / total if total > 0 else len(out) / max(1, len(lrs)))
    return out


def checkpoints(lrs: list[float], targets) -> list[int]:
    """The step counts (0..n) at which lr-time first reaches each target; the end of the stage always."""
    taus = lr_times(lrs)
    out = {len(lrs)}
    for t in targets:
        out.add(next(k for k, tau in enumerate(taus) if tau >= t - 1e-9 or k == len(lrs)))
    return sorted(out)


# --- the criterion -------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    converged: bool
    reason: str
    source: str = ""  # "held-out" | "training" | "" (not judged)
    loss_start: float | None = None  # the judged loss at lr-time SLICE[0] ...
    loss_end: float | None = None  # ... and at SLICE[1]
    drop: float | None = None  # (start - end) / |end|
    term_drops: dict[str, float] = field(default_factory=dict)  # the same fall of each judged term


def _fall(start: float, end: float) -> float:
    return (start - end) / (abs(end) or abs(start) or 1.0)


def judge(losses: list[float], lrs: list[float], validation: list[dict] | None = None,
          terms: dict[str, list[float]] | None = None) -> Verdict:
    """The convergence verdict of one stage (see the module docstring): `losses` and `lrs` per step, `terms` the
    loss's named terms per step, `validation` the held-out checkpoints ({"step": k, "lr_time": tau, "loss": v,
    "terms": {...}})."""
    n = len(losses)
    if n < MIN_STEPS:
        return Verdict(False, f"{n} steps: too few to judge (fewer than {MIN_STEPS})")
    a, b = SLICE
    vals = sorted(validation or [], key=lambda v: v["step"])
    va = next((v for v in vals if v["lr_time"] >= a - 1e-9), None)
    vb = next((v for v in vals if v["lr_time"] >= b - 1e-9), None)
    if va is not None and vb is not None and va["step"] < vb["step"]:
        source = "held-out"
        points = {None: (va["loss"], vb["loss"])}
        points.update({k: (v, vb["terms"][k]) for k, v in va.get("terms", {}).items() if k in vb.get("terms", {})})
    else:
        taus = lr_times(lrs)  # the loss of step s was measured on the model at lr-time taus[s]

        def mean_before(series: list[float], t: float) -> float:
            window = [series[s] for s in range(n) if t - FALLBACK_WINDOW <= taus[s] <= t]
            if not window:
                window = [series[min(range(n), key=lambda s: abs(taus[s] - t))]]
            return sum(window) / len(window)
        source = "training"
        points = {k: (mean_before(series, a), mean_before(series, b))
                  for k, series in [(None, losses), *(terms or {}).items()] if len(series) == n}
    start, end = points.pop(None)
    drop = _fall(start, end)
    term_drops = {k: _fall(s, e) for k, (s, e) in points.items() if s > 0 and e > 0}
    falling = [k for k, d in term_drops.items() if d >= MAX_DROP]
    converged = drop < MAX_DROP and not falling
    trend = f"fell {drop:.1%}" if drop >= 0 else f"rose {-drop:.1%}"
    reason = f"{source} loss {start:.4g} -> {end:.4g} ({trend})"
    if falling:
        reason += "; " + ", ".join(f"term {k} {points[k][0]:.4g} -> {points[k][1]:.4g} (fell {term_drops[k]:.1%})"
                                   for k in falling)
    note = ("converged" if drop >= 0 else "converged (over-fitting)") if converged else \
        f"still falling (limit {MAX_DROP:.0%})"
    return Verdict(converged, f"{reason} over lr-time {a}-{b}: {note}", source, start, end, drop, term_drops)


# --- the record ----------------------------------------------------------------------------------------------
def smoothed(values: list[float], span: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average with a span of `span` steps (default 5% of the steps, >= 1)."""
    span = span or max(1.0, SMOOTH_SPAN * len(values))
    alpha = 2.0 / (span + 1.0)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _short(x: float) -> float:
    return float(f"{x:.7g}")


@dataclass
class StageRecord:
    """One trained stage. `group`: stages of one group train on the same data in turn (ABQ's blocks), so the
    run's samples, tokens and epochs count a group once."""

    name: str
    objective: str = ""
    group: str | None = None
    samples_per_step: int = 1
    train_samples: int | None = None  # size of the set the steps draw from (epochs are counted over it)
    tokens_per_sample: int | None = None  # None where the samples are not token sequences (images)
    heldout_samples: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)  # {"step", "lr_time", "loss", "terms"}
    seconds: float = 0.0  # training wall time, validation excluded
    validation_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def samples_seen(self) -> int:
        return self.steps * self.samples_per_step

    @property
    def tokens_seen(self) -> int | None:
        return None if self.tokens_per_sample is None else self.samples_seen * self.tokens_per_sample

    @property
    def epochs(self) -> float | None:
        return self.samples_seen / self.train_samples if self.train_samples else None

    def _k(self) -> int:
        return max(1, min(5, self.steps // 4))

    @property
    def loss_first(self) -> float | None:
        """Mean loss of the first k steps (k = a quarter of the steps, 1..5): steps see different samples."""
        return sum(self.losses[:self._k()]) / self._k() if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return sum(self.losses[-self._k():]) / self._k() if self.losses else None

    @property
    def val_loss_first(self) -> float | None:
        return self.validation[0]["loss"] if self.validation else None

    @property
    def val_loss_last(self) -> float | None:
        return self.validation[-1]["loss"] if self.validation else None

    @property
    def verdict(self) -> Verdict:
        return judge(self.losses, self.lrs, self.validation, self.terms)

    def to_dict(self) -> dict:
        v = self.verdict
        return {"name": self.name, "objective": self.objective, "group": self.group, "steps": self.steps,
                "samples_per_step": self.samples_per_step, "train_samples": self.train_samples,
                "tokens_per_sample": self.tokens_per_sample, "samples_seen": self.samples_seen,
                "tokens_seen": self.tokens_seen, "epochs": self.epochs, "heldout_samples": self.heldout_samples,
                "seconds": self.seconds, "validation_seconds": self.validation_seconds,
                "loss_first": self.loss_first, "loss_last": self.loss_last, "converged": v.converged,
                "verdict": v.reason, "judged": asdict(v),
                # loss and lr at full precision: a cached artifact's record gives the same metrics and verdict
                "loss": self.losses, "loss_smoothed": [_short(x) for x in smoothed(self.losses)],
                "lr": self.lrs, "lr_time": [_short(x) for x in lr_times(self.lrs)[1:]],
                "terms": {k: [_short(x) for x in vs] for k, vs in self.terms.items()},
                "validation": self.validation}

    @classmethod
    def from_dict(cls, d: dict) -> StageRecord:
        return cls(d["name"], d.get("objective", ""), d.get("group"), d.get("samples_per_step", 1),
                   d.get("train_samples"), d.get("tokens_per_sample"), d.get("heldout_samples", 0),
                   list(d["loss"]), list(d["lr"]), {k: list(v) for k, v in d.get("terms", {}).items()},
                   list(d.get("validation", [])), d.get("seconds", 0.0), d.get("validation_seconds", 0.0))


@dataclass
class TrainingRecord:
    """A run's trained stages, in order, and what the run record gets from them (`metrics`, `tags`, `to_json`,
    `plot`)."""

    stages: list[StageRecord] = field(default_factory=list)

    def add(self, other: TrainingRecord | StageRecord | None) -> TrainingRecord:
        if isinstance(other, StageRecord):
            self.stages.append(other)
        elif other is not None:
            self.stages.extend(other.stages)
        return self

    @property
    def verdicts(self) -> list[Verdict]:
        return [s.verdict for s in self.stages]

    @property
    def converged(self) -> bool:
        return bool(self.stages) and all(v.converged for v in self.verdicts)

    def _groups(self) -> list[list[StageRecord]]:
        groups: list[list[StageRecord]] = []
        for s in self.stages:
            if groups and s.group is not None and groups[-1][0].group == s.group:
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def _per_group(self, attr: str, combine) -> list[float] | None:
        vals = [combine([getattr(s, attr) for s in g]) for g in self._groups()]
        return None if any(v is None for v in vals) else vals

    def summary(self) -> dict[str, float]:
        """Run totals: steps and seconds add up over all stages; samples, tokens and epochs count a group of stages
        on the same data once; first/last losses are the first and the last group's (averaged over a group)."""
        def mean(xs):
            return None if any(x is None for x in xs) else sum(xs) / len(xs)

        def biggest(xs):
            return None if any(x is None for x in xs) else max(xs)
        out = {"steps": sum(s.steps for s in self.stages), "seconds": sum(s.seconds for s in self.stages)}
        for key, attr in (("samples_seen", "samples_seen"), ("tokens_seen", "tokens_seen"), ("epochs", "epochs")):
            per = self._per_group(attr, biggest)
            if per is not None:
                out[key] = sum(per)
        groups = self._groups()
        for key, attr, g in (("loss_first", "loss_first", groups[0]), ("loss_last", "loss_last", groups[-1]),
                             ("val_loss_first", "val_loss_first", groups[0]),
                             ("val_loss_last", "val_loss_last", groups[-1])):
            value = mean([getattr(s, attr) for s in g])
            if value is not None:
                out[key] = value
        return out

    def metrics(self) -> dict[str, float]:
        return {f"train.{k}": float(v) for k, v in self.summary().items()}

    def failed_stages(self) -> list[tuple[str, str]]:
        return [(s.name, v.reason) for s, v in zip(self.stages, self.verdicts) if not v.converged]

    def tags(self) -> dict[str, str]:
        failed, n = self.failed_stages(), len(self.stages)
        if not failed:
            verdict = f"{n} of {n} stage(s) converged; last: {self.stages[-1].name}: {self.verdicts[-1].reason}"
        else:
            verdict = f"{len(failed)} of {n} stage(s) not converged; first: {failed[0][0]}: {failed[0][1]}"
        return {"train.converged": "true" if self.converged else "false", "train.criterion": CRITERION,
                "train.verdict": verdict[:4000]}

    def to_dict(self) -> dict:
        return {"criterion": CRITERION, "converged": self.converged, **self.summary(),
                "stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TrainingRecord:
        return cls([StageRecord.from_dict(d) for d in json.loads(text)["stages"]])

    def plot(self, path: str | Path) -> Path:
        """train_curve.png: the stages side by side on one step axis. Top: raw and smoothed loss, held-out
        checkpoints; middle: the named terms; bottom: the lr."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_terms = any(s.terms for s in self.stages)
        rows = 3 if has_terms else 2
        fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows + 0.8), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 2, 1][:rows] if has_terms else [3, 1]})
        ax_loss, ax_lr = axes[0], axes[-1]
        ax_terms = axes[1] if has_terms else None
        offset, colors = 0, {}
        positive = all(v > 0 for s in self.stages for v in s.losses + [c["loss"] for c in s.validation])
        for i, s in enumerate(self.stages):
            x = list(range(offset, offset + s.steps))  # step s's loss is measured on the model after s updates
            raw_label = "training loss (raw)" if i == 0 else None
            ax_loss.plot(x, s.losses, color="0.75", lw=0.6, label=raw_label)
            ax_loss.plot(x, smoothed(s.losses), color="C0", lw=1.4, label="smoothed" if i == 0 else None)
            if s.validation:
                ax_loss.plot([offset + c["step"] for c in s.validation], [c["loss"] for c in s.validation], "o",
                             color="C3", ms=4, label="held-out" if i == 0 else None)
            for name, values in s.terms.items():
                colors.setdefault(name, f"C{len(colors) % 9 + 1}")
                ax_terms.plot(x, smoothed(values), color=colors[name], lw=1.0,
                              label=name if name not in ax_terms.get_legend_handles_labels()[1] else None)
            ax_lr.plot(x, s.lrs, color="C2", lw=1.0)
            if i:
                for ax in axes:
                    ax.axvline(offset, color="0.85", lw=0.5)
            offset += s.steps
        if positive:
            ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=7, loc="upper right")
        state = "converged" if self.converged else "NOT converged"
        names = self.stages[0].name if len(self.stages) == 1 else f"{len(self.stages)} stages"
        ax_loss.set_title(f"{names}: {state}", fontsize=9)
        if ax_terms is not None:
            ax_terms.set_ylabel("terms (smoothed)")
            if all(v > 0 for s in self.stages for vs in s.terms.values() for v in vs):
                ax_terms.set_yscale("log")
            ax_terms.legend(fontsize=7, loc="upper right")
        ax_lr.set_ylabel("lr")
        ax_lr.set_xlabel("updates done (stages in order)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# --- the loop ------------------------------------------------------------------------------------------------
class Trainer:
    """One stage of training: `Trainer(...).run(step_fn)` -> StageRecord (see the module docstring).

    `lr_at(step)` is the lr multiplier of each step (None: constant); `samples_per_step`, `train_samples` and
    `tokens_per_sample` count what the steps see; `validate()` -> (held-out loss, its terms) over
    `heldout_samples` samples, evaluated at lr-time 0, 0.5, 0.8 and 1 (and every 0.1 when that costs at most
    VAL_SHARE of the trained samples); `fix` is the hint of the error a non-finite loss raises."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, steps: int,
                 lr_at: Callable[[int], float] | None = None, *, samples_per_step: int = 1,
                 train_samples: int | None = None, tokens_per_sample: int | None = None, objective: str = "",
                 validate: Callable[[], tuple[float, dict[str, float]]] | None = None, heldout_samples: int = 0,
                 clip_grad_norm: float | None = None, after_step: Callable[[int], None] | None = None,
                 fix: str = "lower budget.lr", progress: bool = True, group: str | None = None):
        self.name, self.optimizer, self.steps, self.lr_at = name, optimizer, steps, lr_at
        self.validate = validate if validate is not None and heldout_samples > 0 else None
        self.clip_grad_norm, self.after_step, self.fix, self.progress = clip_grad_norm, after_step, fix, progress
        self.record = StageRecord(name, objective, group, samples_per_step, train_samples, tokens_per_sample,
                                  heldout_samples if self.validate else 0)

    def planned_lrs(self) -> list[float]:
        return [self.lr_at(s) if self.lr_at else 1.0 for s in range(self.steps)]

    def checkpoint_steps(self) -> list[int]:
        if self.validate is None:
            return []
        targets = [0.0, *SLICE, 1.0]
        if 11 * self.record.heldout_samples <= VAL_SHARE * self.steps * self.record.samples_per_step:
            targets += [i / 10 for i in range(1, 10)]
        return checkpoints(self.planned_lrs(), targets)

    def _checkpoint(self, done: int, tau: float) -> None:
        t0 = time.perf_counter()
        loss, terms = self.validate()
        self.record.validation_seconds += time.perf_counter() - t0
        if not math.isfinite(loss):
            raise NumericalFailure(f"{self.name} held-out loss became {loss} after {done} steps", self.fix)
        self.record.validation.append({"step": done, "lr_time": _short(tau), "loss": _short(loss),
                                       "terms": {k: _short(v) for k, v in terms.items()}})

    def run(self, step_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]]) -> StageRecord:
        opt, rec = self.optimizer, self.record
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_at) if self.lr_at is not None else None
        params = [p for group in opt.param_groups for p in group["params"]]
        cps = set(self.checkpoint_steps())
        taus = lr_times(self.planned_lrs())
        if 0 in cps:
            self._checkpoint(0, taus[0])
        elapsed = 0.0
        bar = tqdm(range(self.steps), desc=self.name, unit="step", disable=not self.progress)
        for step in bar:
            t0 = time.perf_counter()
            loss, parts = step_fn(step)
            if not torch.isfinite(loss):
                raise NumericalFailure(f"{self.name} loss became {loss.item()} at step {step}", self.fix)
            rec.lrs.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad(set_to_none=True)
            with fp32():  # autocast wraps the forwards and the loss only: backward and the update run outside it
                loss.backward()
                if self.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
                opt.step()
                if sched is not None:
                    sched.step()
                if self.after_step is not None:
                    self.after_step(step)
            rec.losses.append(float(loss.detach()))
            for k, v in parts.items():
                rec.terms.setdefault(k, []).append(float(v))
            elapsed += time.perf_counter() - t0
            bar.set_postfix(loss=f"{rec.losses[-1]:.4g}", **{k: f"{v:.4g}" for k, v in parts.items()})
            if step + 1 in cps:
                self._checkpoint(step + 1, taus[step + 1])
        rec.seconds = elapsed
        return rec
