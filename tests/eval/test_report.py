"""Summary numbers, the seed-style Markdown table and the PNG charts."""

import pytest

from ray_ft.eval.report import plot_metrics, summarize, to_markdown
from ray_ft.plots import plot_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows():
    base = dict(em=0.0, cmrc_em=0.0, cmrc_f1=0.5, cosine=0.5, origin=0.0, origin_char=0.5)
    return [
        {"id": "q0", "model": "base", "mode": "gold", **base, "latency_s": 1.0,
         "judge_relevance": 0.4, "judge_faithfulness": None},
        {"id": "q1", "model": "base", "mode": "gold", **{**base, "em": 1.0, "cosine": 0.9, "origin": 1.0},
         "latency_s": 3.0, "judge_relevance": 0.6, "judge_faithfulness": 1.0},
        {"id": "q0", "model": "finetuned", "mode": "gold", **{k: 1.0 for k in base}, "latency_s": 2.0},
        {"id": "q0", "model": "finetuned", "mode": "retrieved", **{k: 1.0 for k in base}, "context_hit": 1.0,
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
    # Each score with its 95% bootstrap interval over the questions.
    assert "| EM (seed) | 1/2 (50.0% [0.0, 100.0]) | 1/1 (100.0% [100.0, 100.0]) |" in md
    assert "| cosine | 1.4/2 (70.0% [50.0, 90.0]) | 1/1 (100.0% [100.0, 100.0]) |" in md
    assert "| faithfulness (judge) | 1/1 (100.0%), 1 unparsed | — |" in md
    assert "| context hit | 1/1 (100.0% [100.0, 100.0]) |" in md  # retrieved table only
    assert "![metrics](metrics.png)" in md


def test_pngs_are_written(tmp_path):
    table = summarize(_rows())
    path = plot_metrics(table, tmp_path / "metrics.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    hist = [{"step": i, "loss": 2.0 / i} for i in range(1, 20)]
    loss = plot_loss(hist, tmp_path / "loss.png")
    assert loss.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.png"]  # no temp left


def _paired_rows(n: int, base_right: float, tuned_right: float, seed: int = 0) -> list[dict]:
    """n questions answered by base and finetuned; each right (1) with the given probability."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for model, p in (("base", base_right), ("finetuned", tuned_right)):
            score = float(rng.random() < p)
            rows.append({"id": f"q{i}", "model": model, "mode": "gold", "em": score, "cmrc_em": score,
                         "cmrc_f1": score, "cosine": 0.5, "origin": score, "origin_char": 1.0, "latency_s": 1.0})
    return rows


def test_intervals_cover_the_mean_and_narrow_with_more_questions():
    from ray_ft.eval.intervals import bootstrap_ci, paired_difference_ci

    small, large = [1.0, 0.0] * 10, [1.0, 0.0] * 250
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 500 vs 20 questions
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * 0.5 / 500 ** 0.5, rel=0.15)  # the normal interval
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded
    # Paired: the same questions, one model right on 10 more of them.
    a, b = [1.0] * 30 + [0.0] * 70, [1.0] * 20 + [0.0] * 80
    diff, lo, hi = paired_difference_ci(a, b)
    assert diff == pytest.approx(0.1) and 0.0 < lo < 0.1 < hi
    with pytest.raises(ValueError):
        paired_difference_ci([1.0], [1.0, 0.0])


def test_gain_over_base_is_paired_on_the_same_questions():
    table = summarize(_paired_rows(300, 0.1, 0.4), served_as={"finetuned": "merged adapter"})
    tuned = next(t for t in table if t["model"] == "finetuned")
    base = next(t for t in table if t["model"] == "base")
    diff, lo, hi = tuned["gain_vs_base"]["cmrc_em"]
    assert diff == pytest.approx(tuned["cmrc_em"] - base["cmrc_em"]) and 0.2 < lo < diff < hi < 0.4
    assert "gain_vs_base" not in base and tuned["served_as"] == "merged adapter" and "served_as" not in base
    md = to_markdown(table)
    assert "Gain over base, gold context" in md and f"| finetuned | {100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |" in md
    assert "Served: finetuned: merged adapter." in md
    # No real gain: the interval of the difference straddles 0.
    _, lo0, hi0 = next(t for t in summarize(_paired_rows(300, 0.3, 0.3, seed=1))
                       if t["model"] == "finetuned")["gain_vs_base"]["cmrc_em"]
    assert lo0 < 0 < hi0


def test_learning_curve_table_and_plot(tmp_path):
    from ray_ft.train.learning_curve import curve_points, plot_learning_curve
    from ray_ft.train.learning_curve import to_markdown as curve_markdown

    history = [{"step": s, "examples_seen": 8 * s, "loss": 1.0 / s} for s in range(1, 13)]
    for h in history[3::4]:  # validations at steps 4, 8, 12
        h.update(val_loss=1.0, val_exact_match=h["step"] / 40, val_exact_match_se=0.05, val_f1=h["step"] / 20,
                 val_f1_se=0.04, val_origin=0.5, val_origin_se=0.06, val_questions=48)
    assert [h["step"] for h in curve_points(history)] == [4, 8, 12]
    md = curve_markdown(history)
    assert "48 questions" in md and "| 8 | 64 | 1.000 | 20.0 ± 9.8 | 40.0 ± 7.8 | 50.0 ± 11.8 |" in md
    png = plot_learning_curve(history, tmp_path / "learning_curve.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert plot_learning_curve(history[:3], tmp_path / "none.png") is None and curve_markdown(history[:3]) == ""
