"""Summary numbers, the seed-style Markdown table and the PNG charts."""

import pytest

from ray_ft.eval.report import plot_loss, plot_metrics, summarize, to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows():
    base = dict(em=0.0, cmrc_em=0.0, cmrc_f1=0.5, cosine=0.5, origin=0.0, origin_char=0.5)
    return [
        {"model": "base", "mode": "gold", **base, "latency_s": 1.0,
         "judge_relevance": 0.4, "judge_faithfulness": None},
        {"model": "base", "mode": "gold", **{**base, "em": 1.0, "cosine": 0.9, "origin": 1.0},
         "latency_s": 3.0, "judge_relevance": 0.6, "judge_faithfulness": 1.0},
        {"model": "finetuned", "mode": "gold", **{k: 1.0 for k in base}, "latency_s": 2.0},
        {"model": "finetuned", "mode": "retrieved", **{k: 1.0 for k in base}, "context_hit": 1.0,
         "latency_s": 2.0},
    ]


def test_summary_numbers():
    table = summarize(_rows(), wall_s={("base", "gold"): 4.0, ("finetuned", "gold"): 1.0,
                                       ("finetuned", "retrieved"): 0.5})
    base = next(t for t in table if t["model"] == "base")
    assert base["n"] == 2 and base["em"] == 0.5 and base["cosine"] == pytest.approx(0.7)
    assert base["origin"] == 0.5 and base["context_hit"] is None
    assert base["latency_p50_s"] == 2.0 and base["latency_p95_s"] == pytest.approx(2.9)
    assert base["throughput_rps"] == 0.5
    # Judge means are over the judged rows that parsed; failures are counted, not averaged in.
    assert base["judge_relevance"] == pytest.approx(0.5) and base["judge_relevance_n"] == 2
    assert base["judge_faithfulness"] == 1.0 and base["judge_faithfulness_failed"] == 1
    assert [(t["model"], t["mode"]) for t in table] == [
        ("base", "gold"), ("finetuned", "gold"), ("finetuned", "retrieved")]
    assert summarize(_rows())[0]["throughput_rps"] is None


def test_markdown_shows_count_out_of_n_and_percent():
    md = to_markdown(summarize(_rows()), images=["metrics.png"])
    assert "### gold context (n = 2)" in md and "| metric | base | finetuned |" in md
    assert "| EM (seed) | 1/2 (50.0%) | 1/1 (100.0%) |" in md
    assert "| cosine | 1.4/2 (70.0%) | 1/1 (100.0%) |" in md
    assert "| faithfulness (judge) | 1/1 (100.0%), 1 unparsed | — |" in md
    assert "| context hit | 1/1 (100.0%) |" in md  # retrieved table only
    assert "![metrics](metrics.png)" in md


def test_pngs_are_written(tmp_path):
    table = summarize(_rows())
    path = plot_metrics(table, tmp_path / "metrics.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    hist = [{"step": i, "loss": 2.0 / i} for i in range(1, 20)]
    loss = plot_loss(hist, tmp_path / "loss.png")
    assert loss.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.png"]  # no temp left
