"""Preference pairs from the model's own answers to the training questions (`ray-ft pairs`)."""

import json

import pytest

from ray_ft.config import parse_job
from ray_ft.config.train import PairMiningConfig
from ray_ft.data.preference import read_preference_source
from ray_ft.eval.pairs import mine_pairs, write_pairs
from ray_ft.serve.prompting import RAGPrompt


class ScriptedGraph:
    """Answers from a script, per (question, temperature); records what it was sent."""

    def __init__(self, replies: dict):
        self.replies, self.sent = replies, []

    def rag(self, query, model, contexts=None, **kw):
        self.sent.append({"query": query, "model": model, "contexts": contexts, **kw})
        return {"answer": self.replies[(query, kw["temperature"] > 0)]}


def test_answers_below_the_threshold_become_pairs_with_the_prompt_the_generator_saw(tmp_path):
    items = [{"id": "a1", "passage_id": "p1", "question": "Which port?", "context": "Ferries leave Kelby harbour.",
              "answers": ["Kelby harbour"]},
             {"id": "b1", "passage_id": "p2", "question": "Which day?", "context": "They sail on Tuesdays.",
              "answers": ["Tuesdays"]}]
    graph = ScriptedGraph({("Which port?", False): "Kelby harbour", ("Which port?", True): "The moon",
                           ("Which day?", False): "On Mondays", ("Which day?", True): "On  Mondays"})
    prompt = RAGPrompt("en", "Answer from the context.")
    mining = PairMiningConfig(max_f1=0.5, samples=2, concurrency=2)
    mined = mine_pairs(graph, items, "ft", prompt, mining, max_tokens=16)

    # a1: greedy answer is right (no pair), the sample is wrong; b1: the sample repeats the greedy one
    assert [(p["id"], p["rejected"]) for p in mined.pairs] == [("a1#1", "The moon"), ("b1#0", "On Mondays")]
    assert mined.summary() == {"questions": 2, "answers": 3, "below_threshold": 2, "rejected_requests": 0, "pairs": 2}
    assert all(s["contexts"] == [next(i["context"] for i in items if i["question"] == s["query"])] for s in graph.sent)
    assert {s["temperature"] for s in graph.sent} == {0.0, 0.8} and {s["model"] for s in graph.sent} == {"ft"}
    assert mined.pairs[0]["prompt"] == prompt.messages([items[0]["context"]], "Which port?")
    path = write_pairs(mined, tmp_path, "ft", mining)
    pairs, report = read_preference_source(str(path))
    assert [p.chosen for p in pairs] == ["Kelby harbour", "Tuesdays"] and report.skipped_records == 0
    assert pairs[0].system == "Answer from the context." and pairs[0].prompt[0]["role"] == "user"
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == 2


@pytest.mark.slow
def test_pairs_come_from_training_questions_answered_by_the_served_model(ray_cluster, cmrc_slice, tmp_path,
                                                                         smollm_dir, minilm_dir):
    from ray_ft.pipeline import run_pairs

    cfg = parse_job({
        "name": "pairs", "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(cmrc_slice), "max_samples": 6, "cutoff_len": 1024, "eval_size": 0.2},
        "serve": {"http_port": 8767, "max_tokens": 16},
        "train": {"preference": {"mining": {"model": "base", "max_f1": 1.0, "max_questions": 6}}},
    })
    path, mined = run_pairs(cfg)

    data = tmp_path / "runs" / "pairs" / "data"
    held = {json.loads(line)["id"] for line in (data / "eval.jsonl").read_text().splitlines()}
    asked = [json.loads(line) for line in (data / "train_questions.jsonl").read_text().splitlines()][:6]
    assert mined.questions == 6 and mined.answers == 6 and mined.rejected_requests == 0
    pairs, _ = read_preference_source(str(path))
    assert len(pairs) == mined.below_threshold >= 1  # a 135M base model is not perfect on CMRC
    by_id = {q["id"]: q for q in asked}
    for p in pairs:
        qid = p.id.split("#")[0]
        assert qid in by_id and qid not in held  # a training question, never a held-out one
        assert by_id[qid]["context"] in p.prompt[-1]["content"] and p.chosen == by_id[qid]["answers"][0]
    summary = json.loads((tmp_path / "runs" / "pairs" / "pairs" / "summary.json").read_text())
    assert summary["answered_by"] == "SmolLM2-135M-Instruct"
