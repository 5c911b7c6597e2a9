"""`ray-ft runs` / `ray-ft compare` over run folders written the way a run writes them (resolved
config, stages.json, eval summary and predictions)."""

import json

import pytest

from ray_ft.config import parse_job, write_resolved
from ray_ft.errors import RayFTError
from ray_ft.eval.report import summarize
from ray_ft.io import write_jsonl_atomic
from ray_ft.runs import compare_markdown, config_differences, list_runs, read_run, runs_markdown, write_comparison
from tests.eval.fakes import eval_rows
from tests.test_cli import ray_ft


def _run(out, name, n, seed, **train):
    cfg = parse_job({"name": name, "output_dir": str(out), "train": train})
    write_resolved(cfg)
    run = out / name
    (run / "stages.json").write_text(json.dumps({s: {"hash": "x", "outputs": {}, "paths": []} for s in ("prepare", "train", "eval")}))
    rows = eval_rows(n, seed=seed)
    (run / "eval").mkdir()
    write_jsonl_atomic(run / "eval" / "predictions.jsonl", rows)
    (run / "eval" / "summary.json").write_text(json.dumps(summarize(rows)))
    return run, rows


@pytest.fixture
def two_runs(tmp_path):
    out = tmp_path / "runs"
    a = _run(out, "lr1", 8, 0, learning_rate=1e-4)
    b = _run(out, "lr2", 12, 1, learning_rate=2e-4, max_steps=5)
    (out / "mlartifacts").mkdir()  # not a run: left out
    return out, a, b


def test_runs_lists_each_run_with_its_stages_and_headline(two_runs):
    out, (a, rows_a), _ = two_runs
    runs = list_runs(out)
    assert [r.name for r in runs] == ["lr1", "lr2"]
    md = runs_markdown(runs)
    ft = sum(r["cmrc_f1"] for r in rows_a if (r["model"], r["mode"]) == ("finetuned", "gold")) / 8
    assert "gold cmrc_f1: base " in md and f"finetuned {100 * ft:.1f}%" in md
    assert "| lr1 | sft | SmolLM2-135M-Instruct |" in md and "prepare, train, eval" in md


def test_compare_scores_the_shared_questions_and_shows_the_config_differences(two_runs, tmp_path):
    _, (a, rows_a), (b, rows_b) = two_runs
    runs = [read_run(a), read_run(b)]
    assert config_differences(runs) == [("train.learning_rate", ["0.0001", "0.0002"]), ("train.max_steps", ["null", "5"])]
    md = compare_markdown(runs)
    assert "(n = 8)" in md  # the 8 questions both answered
    em_b = sum(r["em"] for r in rows_b if (r["model"], r["mode"], r["id"] < "q00008") == ("finetuned", "gold", True)) / 8
    assert "| gold | finetuned | em | " in md and f"{100 * em_b:.1f}% |" in md
    md_path, html_path = write_comparison(runs, tmp_path / "cmp" / "x")
    assert md_path.read_text() == md and "<table>" in html_path.read_text()
    with pytest.raises(RayFTError, match="two or more"):
        compare_markdown(runs[:1])
    with pytest.raises(RayFTError, match="not a run folder"):
        read_run(tmp_path)


def test_the_cli_runs_and_compare(two_runs):
    out, (a, _), (b, _) = two_runs
    code, text, err = ray_ft("runs", str(out))
    assert code == 0 and "| lr1 |" in text and "| lr2 |" in text, err
    code, text, err = ray_ft("compare", str(a), str(b))
    assert code == 0 and "`train.learning_rate`" in text, err
    assert (out / "compare" / "lr1_vs_lr2.html").is_file()
    code, _, err = ray_ft("compare", str(a), str(out / "nope"))
    assert code == 2 and "not a run folder" in err
