"""The cross-encoder on the real MiniLM: a fresh head is seeded, scores equal a direct forward
pass of each (query, passage), and a saved reranker loads in sentence-transformers' CrossEncoder
with the same scores (the format users' tools read)."""

import numpy as np
import pytest

from ray_ft.reranker import CrossEncoderReranker, encode_pairs, load_cross_encoder, pair_logits, relevance

QUERY = "How tall is Mount Everest?"
PASSAGES = ["Mount Everest is 8,849 metres tall.", "The Nile flows into the Mediterranean Sea.",
            "Apple's net sales were 383 billion dollars in fiscal 2023, a figure reported in its 10-K."]


@pytest.mark.slow
def test_fresh_head_is_seeded_and_scores_match_a_direct_forward(minilm_dir, tmp_path):
    import torch

    a, tok = load_cross_encoder(str(minilm_dir), seed=3)
    b, _ = load_cross_encoder(str(minilm_dir), seed=3)
    c, _ = load_cross_encoder(str(minilm_dir), seed=4)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    a.eval()
    got = pair_logits(a, tok, [QUERY] * 3, PASSAGES, max_len=64, batch_size=2)  # padded across batches
    with torch.no_grad():
        one_by_one = [a(**tok(QUERY, p, return_tensors="pt")).logits.item() for p in PASSAGES]
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    assert got.shape == (3,)

    # The passage is cut, never the query.
    enc = encode_pairs(tok, [QUERY], [" ".join(PASSAGES * 20)], max_len=32)
    ids = enc["input_ids"][0].tolist()
    assert len(ids) == 32 and tok.decode(ids).startswith("[CLS] how tall is mount everest? [SEP]")

    a.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reranker = CrossEncoderReranker(str(tmp_path), max_len=64)
    scores = reranker.scores(QUERY, PASSAGES)
    np.testing.assert_allclose(scores, relevance(np.array(one_by_one)), atol=1e-5)
    assert ((scores > 0) & (scores < 1)).all()

    from sentence_transformers import CrossEncoder

    theirs = CrossEncoder(str(tmp_path), max_length=64).predict([(QUERY, p) for p in PASSAGES],
                                                                activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(theirs, one_by_one, atol=1e-4)
    # A folder that has its head keeps it (no re-initialisation under another seed).
    again, _ = load_cross_encoder(str(tmp_path), seed=99)
    assert torch.equal(again.classifier.weight, a.classifier.weight)
