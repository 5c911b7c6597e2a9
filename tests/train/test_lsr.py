"""LM-supervised retrieval: the KL loss by hand, the LM's scores against direct forward passes
(real SmolLM2), and an LSR run on real Financial-QA rows that moves the embedder's distribution
over the candidates toward the LM's."""

import json
import math
from pathlib import Path

import pytest
import torch

from ray_ft.config import parse_job
from ray_ft.data.lsr import LSRGroup, softmax
from ray_ft.train.contrastive import gold_info_nce, lsr_loss
from tests.conftest import FINQA, finqa_slice


def test_lsr_loss_is_the_kl_from_the_lm_distribution_to_the_retrievers():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    p = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0],
                                                    [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]), dim=-1)
    lm = torch.tensor([[-0.5, -2.0, -1.0], [-0.1, -3.0, -0.2]])
    rt, lt = 0.5, 0.25
    expected = 0.0
    for i in range(2):
        sims = [float(q[i] @ p[i * 3 + j]) / rt for j in range(3)]
        log_r = [s - math.log(sum(math.exp(x) for x in sims)) for s in sims]
        target = softmax([float(x) for x in lm[i]], lt)
        expected += sum(t * (math.log(t) - lr) for t, lr in zip(target, log_r))
    assert float(lsr_loss(q, p, lm, rt, lt)) == pytest.approx(expected / 2, rel=1e-5)
    # The retriever matching the LM exactly: zero loss.
    same = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    lm_same = torch.tensor([[1.0, 0.0]])  # softmax(lm/1) == softmax(cos/1)
    assert float(lsr_loss(*same, lm_same, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        lsr_loss(q, p[:5], lm, rt, lt)


def test_gold_info_nce_counts_only_queries_whose_passage_was_retrieved():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    p = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]), dim=-1)
    scores = q @ p.T / 0.1
    only_second = torch.nn.functional.cross_entropy(scores[1:], torch.tensor([2 + 1]))
    assert float(gold_info_nce(q, p, torch.tensor([-1, 1]), 0.1)) == pytest.approx(float(only_second))
    none = gold_info_nce(q.requires_grad_(), p, torch.tensor([-1, -1]), 0.1)
    assert float(none) == 0.0 and none.requires_grad


def test_group_scores_per_token_or_total():
    g = LSRGroup("q", "a", "c2", ["c1", "c2"], [0.9, 0.8], [-4.0, -2.0], answer_tokens=4)
    assert g.gold_index == 1 and g.lm_scores("mean_logprob") == [-1.0, -0.5] and g.lm_scores("logprob") == [-4.0, -2.0]
    assert LSRGroup("q", "a", "zz", ["c1"], [0.1]).gold_index == -1
    assert softmax([0.0, math.log(3.0)], 1.0) == pytest.approx([0.25, 0.75])


@pytest.mark.slow
def test_answer_log_likelihood_is_the_direct_forward_pass(smollm_dir):
    """The scorer's batched, right-padded sums equal one forward pass per example over the
    answer tokens (the labels SFT trains on), and the passage holding the answer scores higher."""
    from transformers import AutoModelForCausalLM

    from ray_ft.data.lsr import AnswerLogLikelihood
    from ray_ft.data.tokenize import IGNORE_INDEX
    from ray_ft.serve.prompting import RAGPrompt

    scorer = AnswerLogLikelihood(str(smollm_dir), RAGPrompt("en", "You are a helpful assistant."), max_len=256,
                                 threads=2)
    answer = "Revenue was $394 billion in fiscal 2022."
    passages = ["Apple's total net sales (revenue) were $394 billion in fiscal 2022, up 8% from 2021.",
                "The company leases office space in Cupertino, California.",
                "Microsoft's cloud segment grew."]
    batch = {"g": [0, 0, 0], "j": [0, 1, 2], "query": ["What was Apple's revenue in fiscal 2022?"] * 3,
             "answer": [answer] * 3, "passage": passages}
    got = scorer(batch)
    model = AutoModelForCausalLM.from_pretrained(str(smollm_dir), torch_dtype=torch.float32).eval()
    for i, passage in enumerate(passages):
        ex = scorer.example(passage, batch["query"][i], answer)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        direct = sum(float(logp[t - 1, ex.input_ids[t]]) for t in range(1, len(ex.input_ids))
                     if ex.labels[t] != IGNORE_INDEX)
        assert float(got["logprob"][i]) == pytest.approx(direct, abs=2e-3)
        assert int(got["tokens"][i]) == sum(x != IGNORE_INDEX for x in ex.labels) > 5
    assert got["logprob"][0] > max(got["logprob"][1], got["logprob"][2])
    # A passage too long for max_len is cut, the answer is kept whole.
    short = AnswerLogLikelihood(str(smollm_dir), RAGPrompt("en", "sys"), max_len=120)
    ex = short.example(" ".join(["filler words here"] * 200), "Q?", answer)
    assert len(ex.input_ids) <= 120 and short.tok.decode([t for t, lab in zip(ex.input_ids, ex.labels)
                                                          if lab != IGNORE_INDEX]).startswith(answer)


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_lsr_stage_moves_the_embedder_toward_the_lm(ray_cluster, tmp_path, monkeypatch):
    """Contrastive stage -> LSR stage on real rows: the scores file holds each question's
    candidates with a normalised LM distribution, training lowers the KL to it on the trained
    questions, and the job serves the LSR model. The output folder is relative, as in a job file
    (Ray Train's workers run in another folder)."""
    import pyarrow.parquet as pq

    from ray_ft.embedder import SentenceTransformerEmbedder
    from ray_ft.run import run_all

    monkeypatch.chdir(tmp_path)
    cfg = parse_job({
        "name": "lsrtest", "task": "embedding", "output_dir": "runs",
        "embed": {"source": str(finqa_slice(tmp_path / "qa.csv", 160)), "test_size": 0.2, "neg_num": 3,
                  "train_group_size": 2, "per_device_batch_size": 8, "max_steps": 2, "passage_max_len": 128,
                  "val_size": 0.0, "cpus_per_worker": 1,
                  "lsr": {"enabled": True, "candidates": 4, "max_queries": 24, "lm_batch_size": 8,
                          "lm_max_len": 256, "lm_cpus": 1, "per_device_batch_size": 8, "num_train_epochs": 3,
                          "learning_rate": 5e-5, "warmup_ratio": 0.0, "lm_temperature": 0.2}},
    })
    summary = run_all(cfg).embed
    out = tmp_path / "runs" / "lsrtest" / "embed"
    rows = pq.read_table(out / "lsr" / "lsr_scores.parquet").to_pylist()
    assert len(rows) == 24 * 4 and {r["rank"] for r in rows} == {0, 1, 2, 3}
    by_q: dict[int, list[dict]] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], []).append(r)
    for rs in by_q.values():
        assert sum(r["lm_target"] for r in rs) == pytest.approx(1.0)
        assert sorted(r["retrieval_score"] for r in rs)[::-1] == [r["retrieval_score"] for r in sorted(rs, key=lambda r: r["rank"])]
        assert all(r["lm_logprob"] < 0 and r["answer_tokens"] > 0 for r in rs)
        assert sum(r["is_gold"] for r in rs) <= 1
    lsr = summary["lsr"]
    assert lsr["questions"] == 24 and lsr["steps"] == 9 and Path(lsr["start"]).resolve() == (out / "model").resolve()
    assert 0 < lsr["gold_retrieved"] <= 1 and summary["model_dir"] == cfg.finetuned_embedder_dir
    assert "contrastive" in (out / "retrieval.md").read_text() and "LSR" in (out / "retrieval.md").read_text()
    history = [json.loads(line) for line in (out / "lsr" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 10))

    def mean_kl(model_dir) -> float:
        emb = SentenceTransformerEmbedder(str(model_dir))
        total = 0.0
        for rs in by_q.values():
            rs = sorted(rs, key=lambda r: r["rank"])
            q = torch.tensor(emb.embed([cfg.embed.query_instruction + rs[0]["query"]]))
            p = torch.tensor(emb.embed([r["passage"] for r in rs]))
            lm = torch.tensor([[r["lm_score"] for r in rs]])
            total += float(lsr_loss(q, p, lm, cfg.embed.temperature, cfg.embed.lsr.lm_temperature))
        return total / len(by_q)

    before, after = mean_kl(out / "model"), mean_kl(out / "lsr" / "model")
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_length_sorted_chunks_embed_as_one_padded_batch(minilm_dir):
    """LSR encodes a step's candidates in length-sorted chunks (less padding); the embeddings,
    put back in order, are those of one padded batch."""
    from transformers import AutoTokenizer

    from ray_ft.train.embed import SentenceEncoder
    from ray_ft.train.lsr import LSRSteps

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    enc = SentenceEncoder.build(str(minilm_dir), "mean").eval()
    steps = LSRSteps(None, tok, None, None, None, 0, "cpu")
    texts = ["short", "a much longer passage about revenue growth in fiscal 2023 with more words", "mid length text",
             "x y"] * 5
    chunks, order = steps.length_chunks(texts, 128, size=3)
    assert len(chunks) == 7 and sorted(order.tolist()) == list(range(20))
    widths = [c["input_ids"].shape[1] for c in chunks]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # each chunk padded to its own longest
    with torch.no_grad():
        chunked = torch.cat([enc(c) for c in chunks])[order]
        whole = enc(steps.tokenize(texts, 128))
    assert torch.allclose(chunked, whole, atol=1e-5)
