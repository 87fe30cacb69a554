"""The console summary printed at the end of a run: baseline vs compressed, storage, latency, energy."""

from __future__ import annotations

from bench.runner import CellResult, Runner, fmt


_ENERGY_UNITS = {"prefill_j_per_token": "J/token", "j_per_image": "J/image"}


def _energy(metrics: dict) -> tuple[str, str]:
    """(value with unit, source) of the run's energy figure: per prefill token (LMs) or per image."""
    for k, v in metrics.items():
        _, quantity, source = k.split(".", 2) if k.startswith("energy.") else ("", "", "")
        if quantity in _ENERGY_UNITS:
            return f"{fmt(v)} {_ENERGY_UNITS[quantity]}", source.replace("-", ":", 1)
    return "-", "-"


def _latency(metrics: dict) -> str:
    """Median latency of the backend's main workload: the prefill (LMs) or one forward pass (images)."""
    key = next((k for k in metrics if k.startswith("latency.") and k.endswith(".p50_s")
                and not k.startswith("latency.decode_per_token")), None)
    return f"{fmt(metrics[key] * 1e3)} ms" if key else "-"


def rows(results: list[CellResult]) -> list[list[str]]:
    out = []
    for r in results:
        task_metrics = [k for k in r.metrics if k.split(".")[0] in _task_roots(r.metrics)]
        metric = r.tags.get("bench.primary_metric") or (task_metrics[0] if task_metrics else "-")
        e_val, e_src = _energy(r.metrics)
        decode = r.metrics.get("latency.decode_per_token.p50_s")
        out.append([r.method + (" (reused)" if r.reused else ""), metric, fmt(r.metrics.get(metric)),
                    fmt(r.metrics.get("storage.bits_per_weight.block_linears")),
                    fmt(r.metrics.get("storage.artifact_bytes", 0) / 1e6) + " MB", _latency(r.metrics),
                    f"{fmt(decode * 1e3)} ms" if decode is not None else "-",
                    e_val, e_src, r.tags.get("bench.execution", "-")])
    return out


def _task_roots(metrics: dict) -> set[str]:
    skip = {"storage", "latency", "throughput", "memory", "energy", "time", "method", "cost", "train"}
    return {k.split(".")[0] for k in metrics} - skip


def _interval(metrics: dict, name: str) -> str:
    lo, hi = metrics.get(f"{name}.ci95_low"), metrics.get(f"{name}.ci95_high")
    return f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def print_summary(runner: Runner, base: CellResult | None, result: CellResult) -> None:
    results = [r for r in (base, result) if r is not None]
    header = ["method", "metric", "value", "bits/weight", "artifact", "latency p50", "decode/token",
              "energy", "energy source", "execution"]
    print()
    print(table(header, rows(results)))
    t = result.timings
    split = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items() if k.endswith("_s"))
    print(f"\nwall time: {split}")
    prec = result.tags.get("bench.precision", "fp32")
    kernel = result.tags.get("precision.bf16_matmul")
    print(f"model {runner.model_spec.name} | hardware {runner.backend.name} ({result.tags.get('hardware.threads', '?')} threads)"
          f" | compute {prec}{f' ({kernel})' if kernel else ''} | mlflow run {result.run_id}")
    vs_base = [k[len("metric."):-len(".direction")] for k in result.tags
               if k.startswith("metric.") and k.endswith(".direction") and "_vs_base." in k]
    if vs_base:  # e.g. KL divergence from the base model, which ties in perplexity can hide
        shown = [f"{n} {fmt(result.metrics.get(n))}{_interval(result.metrics, n)}" for n in vs_base]
        print("against the base model: " + "; ".join(shown))
    for key, value in result.metrics.items():  # a backend with real kernels re-evaluated the task on them
        if key.endswith(".deployed"):
            name = key[:-len(".deployed")]
            diff = next((v for k, v in result.metrics.items() if k.startswith(f"{key}_minus_")), None)
            print(f"deployed ({result.tags.get('bench.deployed_execution')}): {name} = {fmt(value)}; torch "
                  f"{result.tags.get('bench.execution')}: {fmt(result.metrics.get(name))}; difference {fmt(diff)}")
    if result.tags.get("train.converged") == "false":
        print(f"training did not converge: {result.tags.get('train.verdict')} (criterion: "
              f"{result.tags.get('train.criterion')})")
    if result.tags.get("bench.execution") == "fake-quant" and "bench.deployed_execution" not in result.tags:
        print(f"note: latency/energy are for fake-quant execution ({prec} matmuls on dequantized weights); "
              "accuracy is real, speed is not that of a low-bit kernel")
