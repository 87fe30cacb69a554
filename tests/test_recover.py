"""recover=lora|dora|rora: adapters through PEFT with the right scaling, trained by KD after any method,
counted in storage, restored exactly from the artifact; the CLI record lists both stages."""

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.distill import kd_logits
from bench.errors import BenchError, NotApplicable
from bench.methods.binarymos import BinaryMoS
from bench.methods.sign import SignBinarization
from bench.recover import Recovery
from conftest import logits, mlflow_runs, random_calib, run_cli, tiny_cli_args

BUDGET = Budget(name="t", train_steps=30, lr=1e-3, calib_samples=8, calib_seqlen=32, warmup_ratio=0.0)


def _signed(lm):
    work = models.clone(lm)
    packed = SignBinarization().compress(work, None, BUDGET)
    return work, packed


@pytest.mark.parametrize("name,scaling", [("lora", 16 / 64), ("rora", 16 / 8), ("dora", 16 / 64)])
def test_recovery_scaling_and_stored_adapters(tiny_llama, name, scaling, tmp_path):
    rec = Recovery(name=name)
    assert rec.scaling == scaling
    work, packed = _signed(tiny_llama)
    before = packed.storage(tiny_llama).linear_bytes
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))  # held-out windows
    signed_err = kd_logits(logits(work, ids), logits(tiny_llama, ids))
    packed = rec.apply(tiny_llama.module, work, packed, random_calib(8, 32), BUDGET)
    for ref in work.adapter.linears():
        assert ref.module.scaling["default"] == pytest.approx(scaling)
    stage = packed.training.stages[-1]  # sign trains nothing: the recovery is the only stage
    assert len(packed.training.stages) == 1 and stage.name == f"recover={name}"
    assert stage.loss_last < 0.9 * stage.loss_first
    recovered_err = kd_logits(logits(work, ids), logits(tiny_llama, ids))
    assert recovered_err < signed_err
    # storage: fp16 A (r x in) and B (out x r) per linear, plus DoRA's magnitude (out)
    shapes = [r.module.base_layer.weight.shape for r in work.adapter.linears()]
    extra = sum(2 * 64 * (i + o) + (2 * o if name == "dora" else 0) for o, i in shapes)
    assert packed.storage(tiny_llama).linear_bytes == before + extra
    # artifact round trip: the method restores its layers, the recovery re-attaches the adapters
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    fresh = models.clone(tiny_llama)
    restored = SignBinarization().restore(fresh, *store.load("k"))
    rec.restore(models.with_module(tiny_llama, restored.model), restored)
    assert torch.equal(logits(fresh, ids), logits(work, ids))


def test_recovery_refuses_custom_layers_and_bad_settings(tiny_llama):
    work = models.clone(tiny_llama)
    packed = BinaryMoS(n_experts=2).compress(work, random_calib(8, 32), Budget(name="t", train_steps=1))
    with pytest.raises(NotApplicable):
        Recovery(name="rora").apply(tiny_llama.module, models.with_module(tiny_llama, packed.model), packed,
                                    random_calib(8, 32), BUDGET)
    for kw in ({"name": "qlora"}, {"rank": 0}, {"alpha": 0}):
        with pytest.raises(BenchError):
            Recovery(**{"name": "lora", **kw})


def test_cli_sign_then_rora_records_both_stages_and_leaves_the_baseline_alone(results_dir, tiny_llama_dir):
    r = run_cli(*tiny_cli_args(tiny_llama_dir), "method=sign", "recover=rora", "recover.rank=4",
                results=results_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = mlflow_runs(results_dir)
    base = [x for x in runs if x.data.tags["bench.method"] == "none"][0]
    assert base.data.tags["bench.stages"] == "none" and base.data.params["recover.name"] == "none"
    run = [x for x in runs if x.data.tags["bench.method"] == "sign"][0]
    assert run.data.tags["bench.stages"] == "sign > recover=rora"
    assert run.data.tags["bench.recover"] == "rora"
    assert run.data.metrics["train.steps"] == 3 and run.data.tags["train.converged"] == "false"  # budget=tiny
    assert not any(k.startswith("method.recover") for k in run.data.metrics)


def test_leaderboard_keeps_recovered_runs_apart_from_the_method_alone():
    from bench.leaderboard.collect import StoredRun, _row_key

    def run(**params):
        return StoredRun("r", "FINISHED", 0, tags={"bench.method": "sign"}, metrics={},
                         params={"method.name": "sign", **params})
    alone = _row_key(run(**{"recover.name": "none", "recover.rank": "64"}))
    rora = _row_key(run(**{"recover.name": "rora", "recover.rank": "64", "recover.seed": "0"}))
    assert alone[0] != rora[0]
    assert rora[1] == {"recover.name": "rora", "recover.rank": "64"} and alone[1] == {}
