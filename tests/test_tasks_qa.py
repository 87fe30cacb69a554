"""Commonsense QA through lm-eval: local files converted to the stock layouts, numbers equal to lm-eval's
own stock tasks on the same documents, a missing file fails only its own task."""

import pytest

from bench import data
from bench.tasks.commonsense_qa import LOCAL, CommonsenseQA, convert, recapitalize_ctx_b


@pytest.mark.parametrize("task,n", [("piqa", 1838), ("hellaswag", 10042), ("arc_easy", 2376),
                                    ("arc_challenge", 1172), ("winogrande", 1267), ("boolq", 3270),
                                    ("openbookqa", 500)])
def test_local_files_convert_to_the_counts_lm_eval_scores(task, n):
    assert len(convert(task, data.local_file(f"qa/{LOCAL[task][0]}"))) == n


def test_winogrande_rebuild_regenerates_the_contexts():
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target

    path = data.local_file("qa/winogrande/winogrande.jsonl")
    import json

    raw = [json.loads(x) for x in path.read_text().splitlines()[:200]]
    for r, doc in zip(raw, convert("winogrande", path)):
        assert doc_to_choice(doc) == r["context_options"]
        assert doc_to_target(doc) == r["continuation"].strip()


def test_hellaswag_ctx_b_recapitalised_like_lm_eval():
    assert recapitalize_ctx_b("A man is sitting on a roof. he") == "A man is sitting on a roof. He"
    assert recapitalize_ctx_b("Clean the pan. Then rinse it.") == "Clean the pan. Then rinse it."


def test_boolq_prompt_has_one_question_mark():
    doc = convert("boolq", data.local_file("qa/boolq/boolq.jsonl"))[0]
    assert not doc["question"].endswith("?") and not doc["passage"].startswith("Passage: ")


def test_accuracies_equal_stock_lm_eval(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    task = CommonsenseQA(tasks=["piqa", "arc_easy", "winogrande"], limit=20)
    ours = {m.name: m for m in task.evaluate(default_model)}
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=default_model.module, tokenizer=default_model.tokenizer, max_length=2048, batch_size=8)
    stock = evaluator.simple_evaluate(model=lm, tasks=[task.task_config(t) for t in task.tasks], limit=20,
                                      bootstrap_iters=1000)["results"]
    for t in task.tasks:
        m = ours[f"{t}.acc.lmeval_0shot.first20"]
        assert m.value == stock[t]["acc,none"]
        assert m.stderr == pytest.approx(stock[t]["acc_stderr,none"])
        assert len(m.per_sample) == 20 and sum(m.per_sample) / 20 == pytest.approx(m.value)
    assert ours["piqa.acc_norm.lmeval_0shot.first20"].value == stock["piqa"]["acc_norm,none"]
    assert "commonsense_qa.acc_mean_of_3_tasks.lmeval_0shot.first20" in ours


def test_missing_task_file_fails_only_that_task(default_model, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data.data_root() / "qa" / "piqa", root / "qa" / "piqa")
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    task = CommonsenseQA(tasks=["piqa", "openbookqa"], limit=4)
    metrics = task.evaluate(default_model, str(root))
    assert [m.name for m in metrics] == ["piqa.acc.lmeval_0shot.first4", "piqa.acc_norm.lmeval_0shot.first4"]
    assert "qa/openbookqa/openbook_qa.jsonl' not found" in task.failures["openbookqa"]
