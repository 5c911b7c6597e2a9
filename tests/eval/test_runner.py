"""The eval runner against the real served graph (vLLM + SmolLM2 + MiniLM on a local Ray cluster):
an external OpenAI-compatible target, both context modes, the LLM judge, and the report files."""

import json
import time

import numpy as np
import pytest

from ray_ft.config import parse_job
from ray_ft.eval.clients import OpenAIChat, RAGClient
from ray_ft.metrics.qa import clipped_cosine
from ray_ft.eval.runner import EvalTarget, PromptSettings, run_eval

DOCS = [
    {"passage_id": "everest", "text": "Mount Everest is the highest mountain on Earth, 8,849 metres tall."},
    {"passage_id": "nile", "text": "The Nile is a major river in Africa that flows into the Mediterranean Sea."},
    {"passage_id": "apple", "text": "Apple's total net sales were 383 billion dollars in fiscal 2023."},
]
ITEMS = [
    {"id": "q1", "question": "How tall is Mount Everest?", "answers": ["8,849 metres"],
     "context": DOCS[0]["text"], "passage_id": "everest"},
    {"id": "q2", "question": "Into which sea does the Nile flow?", "answers": ["the Mediterranean Sea"],
     "context": DOCS[1]["text"], "passage_id": "nile"},
    {"id": "q3", "question": "What were Apple's net sales in fiscal 2023?", "answers": ["383 billion dollars"],
     "context": DOCS[2]["text"], "passage_id": "apple"},
]
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def reranker_dir(minilm_dir, tmp_path_factory):
    """A MiniLM cross-encoder with a seeded fresh head: its order is arbitrary but fixed."""
    from ray_ft.reranker import load_cross_encoder

    folder = tmp_path_factory.mktemp("reranker")
    for part in load_cross_encoder(str(minilm_dir), seed=5):
        part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cfg(reranker_dir):
    return parse_job({
        "name": "evaltest", "model": {"system_prompt": "You are a helpful assistant."},
        "data": {"language": "en"},
        # fp32: bf16 greedy answers on vLLM CPU depend on which requests share a batch, and the
        # test compares the same model reached two ways, under concurrency.
        "serve": {"http_port": 8769, "max_tokens": 24, "top_k": 1, "vllm": {"dtype": "float32"},
                  "rerank": {"enabled": True, "model": str(reranker_dir), "candidates": 3, "cpus": 0.3}},
        "eval": {"models": ["base"], "modes": ["gold", "retrieved"], "concurrency": 3,
                 "endpoints": [{"label": "base-by-url", "base_url": "http://127.0.0.1:8769/v1",
                                "model": BASE}],
                 "judge": {"enabled": True, "model": "base", "max_samples": 2, "n_questions": 2}},
    })


@pytest.fixture(scope="module")
def served_url(ray_cluster, smollm_dir, minilm_dir, cfg):
    from ray import serve

    from ray_ft.serve.app import deploy

    yield deploy(cfg, str(smollm_dir), str(minilm_dir), {}, DOCS, reranker_dir=cfg.serve.rerank.model)
    serve.shutdown()


@pytest.mark.slow
def test_compare_internal_and_external_targets_with_judge(served_url, cfg, tmp_path):
    client = RAGClient(served_url)
    e = cfg.eval.endpoints[0]
    targets = [EvalTarget("base", BASE), EvalTarget(e.label, e.model, OpenAIChat(e.base_url, e.model))]
    prompt = PromptSettings(cfg.data.language, cfg.model.system_prompt, cfg.serve.max_tokens)
    history = [{"step": i, "loss": 3.0 / i} for i in range(1, 11)]
    table = run_eval(client, ITEMS, targets, cfg.eval, prompt, tmp_path, judge=client.chat_model(BASE),
                     loss_history=history)

    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {(r["model"], r["mode"]) for r in rows} == {
        (m, d) for m in ("base", "base-by-url") for d in ("gold", "retrieved")}
    by = {(r["model"], r["mode"], r["id"]): r for r in rows}
    for mode in ("gold", "retrieved"):
        for it in ITEMS:
            ours, ext = by[("base", mode, it["id"])], by[("base-by-url", mode, it["id"])]
            # Same template, same contexts, same engine, greedy: the external path is exact.
            assert ext["context"] == ours["context"] and ext["prediction"] == ours["prediction"]
            assert ours["prediction"].strip()
    assert [by[("base", "retrieved", i["id"])]["context_hit"] for i in ITEMS] == [1.0, 1.0, 1.0]
    assert "8,849" in by[("base", "gold", "q1")]["prediction"].replace(" ", "")

    judged = [r for r in rows if "judge_relevance" in r]
    assert len(judged) == 8  # first 2 questions x 2 models x 2 modes
    for r in judged:
        # Structured output makes the small model's judge replies parse on the first attempt.
        assert r["judge_relevance"] is not None and r["judge_faithfulness"] is not None, r
        assert r["judge_relevance_detail"]["attempts"] == 1
        gen = r["judge_relevance_detail"]["generated_questions"]
        assert len(gen) == 2
        vecs = client.embed([r["question"], *gen])
        want = clipped_cosine(np.repeat(vecs[:1], 2, axis=0), vecs[1:]).mean()
        assert r["judge_relevance"] == pytest.approx(want, abs=1e-5)
        v = r["judge_faithfulness_detail"]["verdicts"]
        assert r["judge_faithfulness"] == pytest.approx(sum(v) / len(v))

    t = {(x["model"], x["mode"]): x for x in table}
    for key in ("em", "cmrc_f1", "cosine", "origin_char"):
        assert t[("base", "gold")][key] == pytest.approx(np.mean([by[("base", "gold", i["id"])][key] for i in ITEMS]))
    assert t[("base", "gold")]["judge_relevance_n"] == 2
    md = (tmp_path / "summary.md").read_text()
    assert "| metric | base | base-by-url |" in md and "![loss](loss.png)" in md
    assert json.loads((tmp_path / "summary.json").read_text()) == table
    assert (tmp_path / "metrics.png").stat().st_size > 5000 and (tmp_path / "loss.png").is_file()


@pytest.mark.slow
def test_reranked_mode_asks_the_reranker_and_retrieved_mode_the_first_stage_alone(served_url, cfg, tmp_path):
    import httpx

    client = RAGClient(served_url)
    e = cfg.eval.endpoints[0]
    targets = [EvalTarget("base", BASE), EvalTarget(e.label, e.model, OpenAIChat(e.base_url, e.model))]
    ecfg = cfg.eval.model_copy(update={"modes": ["retrieved", "reranked"],
                                       "judge": cfg.eval.judge.model_copy(update={"enabled": False})})
    prompt = PromptSettings(cfg.data.language, cfg.model.system_prompt, cfg.serve.max_tokens)
    table = run_eval(client, ITEMS, targets, ecfg, prompt, tmp_path)
    rows = {(r["model"], r["mode"], r["id"]): r
            for r in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    texts = [d["text"] for d in DOCS]
    for it in ITEMS:
        # the reranker's best of the retriever's 3 candidates (all passages), asked directly
        best = httpx.post(f"{served_url}/v1/rerank", json={"query": it["question"], "documents": texts},
                          timeout=60).json()["results"][0]["index"]
        for label in ("base", "base-by-url"):
            reranked, first = rows[(label, "reranked", it["id"])], rows[(label, "retrieved", it["id"])]
            assert reranked["retrieved_texts"] == [texts[best]]
            assert first["retrieved_ids"] == [it["passage_id"]]  # MiniLM's dense top-1 is the gold one
        assert rows[("base", "reranked", it["id"])]["prediction"] == rows[("base-by-url", "reranked", it["id"])]["prediction"]
    hits = {(t["model"], t["mode"]): t["context_hit"] for t in table}
    assert hits[("base", "retrieved")] == 1.0
    assert hits[("base", "reranked")] == pytest.approx(np.mean(
        [rows[("base", "reranked", i["id"])]["context_hit"] for i in ITEMS]))


@pytest.mark.slow
def test_unknown_served_model_is_reported_before_any_request(served_url, cfg, tmp_path):
    from ray_ft.errors import RayFTError

    prompt = PromptSettings("en", "s", 8)
    with pytest.raises(RayFTError, match=r"models not served: \['tuned'\]"):
        run_eval(RAGClient(served_url), ITEMS, [EvalTarget("finetuned", "tuned")], cfg.eval, prompt, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_refused_question_scores_zero_and_the_run_goes_on(served_url, cfg, tmp_path):
    huge = {"id": "q9", "question": "What is said?", "answers": ["nothing"], "context": "word " * 40_000,
            "passage_id": "huge"}  # 200,000 characters: over serve.max_input_chars, a 400
    ecfg = cfg.eval.model_copy(update={"modes": ["gold"],
                                       "judge": cfg.eval.judge.model_copy(update={"enabled": False})})
    prompt = PromptSettings("en", cfg.model.system_prompt, 8)
    table = run_eval(RAGClient(served_url), [ITEMS[0], huge], [EvalTarget("base", BASE)], ecfg, prompt, tmp_path)

    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    assert "-> 400" in rows["q9"]["error"] and "exceed the limit" in rows["q9"]["error"]
    assert rows["q9"]["prediction"] == "" and rows["q9"]["cmrc_f1"] == rows["q9"]["cosine"] == 0.0
    assert "error" not in rows["q1"] and rows["q1"]["prediction"].strip()
    assert table[0]["n"] == 2 and table[0]["rejected"] == 1
    assert table[0]["cosine"] == pytest.approx(rows["q1"]["cosine"] / 2)
    assert "| base | gold | 2 | 1 |" in (tmp_path / "summary.md").read_text()


def test_external_targets_get_the_jobs_training_template():
    from ray_ft.eval.runner import _ask

    class Capture:
        def chat(self, messages, max_tokens, temperature=0.0, json_schema=None):
            self.messages, self.max_tokens = messages, max_tokens
            return "8,849 metres"

    ext = Capture()
    prompt = PromptSettings("en", "sys", 8, template=None, training_template="Q: {question}\nC: {context}")
    out = _ask(None, EvalTarget("ext", "m", ext), ITEMS[0], "gold", prompt)  # gold: no retrieval call
    assert out["answer"] == "8,849 metres" and ext.max_tokens == 8
    assert ext.messages[0] == {"role": "system", "content": "sys"}
    assert ext.messages[-1]["content"].startswith("Q: How tall is Mount Everest?\nC: ")
    assert ITEMS[0]["context"] in ext.messages[-1]["content"]


def test_questions_go_passage_by_passage_first_question_alone():
    import threading

    from ray_ft.eval.runner import run_by_passage

    items = [{"id": f"{p}{k}", "passage_id": p} for p in "abcdef" for k in range(4 if p in "ab" else 2)]
    lock, events, active, peak = threading.Lock(), [], [0], [0]

    def ask(i):
        with lock:
            events.append(("start", i))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            events.append(("end", i))
            active[0] -= 1
        return items[i]["id"]

    done = run_by_passage(items, ask, concurrency=3)
    assert sorted(done) == sorted(it["id"] for it in items) and peak[0] <= 3
    position = {e: n for n, e in enumerate(events)}
    for p in "abcdef":
        first, *rest = [i for i, it in enumerate(items) if it["passage_id"] == p]
        # The others of a passage start only after its first question is answered (the prefix is cached).
        assert all(position[("start", i)] > position[("end", first)] for i in rest)
    # A started passage's questions go ahead of passages not started yet: passage a's follow-ups
    # start before passage f's first question.
    a_rest = [i for i, it in enumerate(items) if it["passage_id"] == "a"][1:]
    f_first = next(i for i, it in enumerate(items) if it["passage_id"] == "f")
    assert min(position[("start", i)] for i in a_rest) < position[("start", f_first)]
