"""The command line end to end on a tiny real-architecture model (fast). Its error behaviour is the bad-input
matrix of tests/test_bad_inputs.py."""

from pathlib import Path

from conftest import mlflow_runs, run_cli, tiny_cli_args


def test_every_shipped_plugin_config_builds():
    """Each YAML of each plug-in group, composed as the CLI composes it, instantiates its dataclass."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)
    from bench.errors import ResourceError

    root = Path(__file__).parents[1] / "configs"
    with initialize_config_dir(config_dir=str(root), version_base=None):
        for group in ("method", "task", "hardware", "budget", "calib", "model", "recover"):
            for path in sorted((root / group).glob("*.yaml")):
                extra = ["model.name_or_path=org/some-model"] if (group, path.stem) == ("model", "hf") else []
                cfg = compose(config_name="config", overrides=[f"{group}={path.stem}", *extra])
                try:
                    obj = instantiate(cfg[group], _convert_="all")
                except InstantiationException as e:  # a backend for hardware this machine lacks (cuda without
                    if group == "hardware" and isinstance(e.__cause__, ResourceError):  # a GPU): its one line is
                        continue  # tested beside it (tests/test_cuda_backend.py)
                    raise
                assert obj.name == path.stem or group == "model", path
        for path in sorted((root / "budget_recipe").glob("*.yaml")):  # paper_<method>: that method's recipe
            budget, method = path.stem.split("_", 1)
            cfg = compose(config_name="config", overrides=[f"budget={budget}", f"method={method}"])
            recipe = instantiate(cfg.budget, _convert_="all")
            generic = instantiate(compose(config_name="config", overrides=[f"budget={budget}", "method=rtn"]).budget)
            assert recipe.name == generic.name == budget and recipe != generic, path


def test_every_shipped_sweep_composes_and_names_existing_plugins():
    from hydra import compose, initialize_config_dir

    import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)

    root = Path(__file__).parents[1] / "configs"
    with initialize_config_dir(config_dir=str(root), version_base=None):
        for path in sorted((root / "sweep").glob("*.yaml")):
            cfg = compose(config_name="config", overrides=[f"sweep={path.stem}"], return_hydra_config=True)
            params = cfg.hydra.sweeper.params
            for group in ("method", "task", "hardware", "model"):
                for choice in str(params.get(group, "")).split(","):
                    assert not choice or (root / group / f"{choice}.yaml").exists(), (path.stem, group, choice)


def test_help_and_cfg_job_work(results_dir):
    r = run_cli("--help", results=results_dir)
    assert r.returncode == 0 and "method:" in r.stdout and "binarymos" in r.stdout
    r = run_cli("--cfg", "job", results=results_dir)
    assert r.returncode == 0 and "_target_: bench.methods.binarymos.BinaryMoS" in r.stdout


def test_rtn_run_records_everything_and_reuses_baseline(results_dir, tiny_llama_dir):
    args = tiny_cli_args(tiny_llama_dir)
    r = run_cli(*args, "method=rtn", "method.group_size=32", results=results_dir)
    assert r.returncode == 0, r.stderr
    assert "wikitext2.ppl_token.gptq_s64.first1" in r.stdout and "fake-quant" in r.stdout
    assert "against the base model: wikitext2.kld_vs_base.gptq_s64.first1 " in r.stdout
    runs = {x.data.tags["bench.method"]: x for x in mlflow_runs(results_dir)}
    assert set(runs) == {"none", "rtn"} and all(x.info.status == "FINISHED" for x in runs.values())
    rtn = runs["rtn"]
    m, tags, params = rtn.data.metrics, rtn.data.tags, rtn.data.params
    assert m["wikitext2.ppl_token.gptq_s64.first1"] > 1
    assert abs(m["storage.bits_per_weight.block_linears"] - (4 + 20 / 32)) < 1e-9
    assert m["storage.artifact_bytes"] > 0 and m["latency.prefill_16.p50_s"] > 0
    assert any(k.startswith("energy.prefill_j_per_token.model-") for k in m)
    for key in ("bench.git_commit", "bench.config_hash", "version.torch", "machine.cpu", "bench.model_weights_sha256",
                "hardware.energy_source", "bench.execution", "bench.cache"):
        assert tags.get(key), key
    assert tags["hardware.energy_source"] == "model:horowitz_isscc2014_45nm"
    assert params["method.bits"] == "4" and params["seed"] == "0"
    assert m["wikitext2.kld_vs_base.gptq_s64.first1"] > 0
    assert 0 <= m["wikitext2.top1_agree_vs_base.gptq_s64.first1"] <= 1
    assert not any(".kld_" in k for k in runs["none"].data.metrics)  # the baseline is the reference
    # second method run: the baseline is reused from the store, not re-evaluated
    r = run_cli(*args, "method=sign", results=results_dir)
    assert r.returncode == 0, r.stderr
    assert "none (reused)" in r.stdout
    methods = sorted(x.data.tags["bench.method"] for x in mlflow_runs(results_dir))
    assert methods == ["none", "rtn", "sign"]


def test_third_party_plugin_package_is_discovered(results_dir, tmp_path):
    """A package declaring a `bench.plugins` entry point adds its config groups without forking bench."""
    site = tmp_path / "site"
    pkg = site / "benchx_plugins"
    (pkg / "method").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "method" / "xnorx.yaml").write_text("_target_: bench.methods.sign.SignBinarization\nname: xnorx\n")
    dist = site / "benchx_plugins-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: benchx-plugins\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[bench.plugins]\nbenchx = benchx_plugins\n")
    r = run_cli("method=xnorx", "--cfg", "job", results=results_dir, env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert "name: xnorx" in r.stdout
    r = run_cli("method=xnorxx", results=results_dir, env={"PYTHONPATH": str(site)})
    assert "did you mean 'xnorx'?" in r.stderr


def test_second_task_reuses_the_compressed_model(results_dir, tiny_llama_dir):
    args = [a for a in tiny_cli_args(tiny_llama_dir) if not a.startswith("task.seqlen")]
    args += ["method=rtn", "method.group_size=32", "compare_baseline=false"]
    r = run_cli(*args, "task=wikitext", "task.seqlen=64", results=results_dir)
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "task=wikitext_lmeval", "task.max_length=64", results=results_dir)
    assert r.returncode == 0, r.stderr
    runs = {x.data.tags["bench.task"]: x for x in mlflow_runs(results_dir)}
    assert runs["wikitext"].data.tags["bench.cache"] == "miss"
    assert runs["wikitext_lmeval"].data.tags["bench.cache"] == "hit"
    assert runs["wikitext_lmeval"].data.tags["bench.artifact_key"] == runs["wikitext"].data.tags["bench.artifact_key"]
    assert "time.restore_s" in runs["wikitext_lmeval"].data.metrics
    assert "time.compress_s" not in runs["wikitext_lmeval"].data.metrics
    m = runs["wikitext_lmeval"].data.metrics
    assert m["wikitext2.word_ppl.lmeval_ml64.first1"] > 1


def test_default_command_end_to_end_on_the_default_model(results_dir):
    """`python -m bench` as the README runs it (binarymos on WikiText-2), shortened: 1 window, tiny budget."""
    r = run_cli("task.limit=1", "budget=tiny", "hardware.min_seconds=0", "hardware.min_reps=1",
                "task.decode_tokens=2", results=results_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x.data.tags["bench.method"]: x for x in mlflow_runs(results_dir)}
    assert set(runs) == {"none", "binarymos"}
    base = runs["none"].data.metrics["wikitext2.ppl_token.gptq_s2048.first1"]
    mos = runs["binarymos"].data.metrics["wikitext2.ppl_token.gptq_s2048.first1"]
    assert 10 < base < 30 and mos > base
    tags = runs["binarymos"].data.tags
    assert tags["bench.calib_set"] == "wikitext2_valid[validation] 4x64 seed=0"
    assert tags["bench.model"] == "smollm2_135m_instruct_q4_1" and tags["bench.execution"] == "fake-quant"
    assert abs(runs["binarymos"].data.metrics["storage.bits_per_weight.block_linears"] - 1.2743) < 1e-3
