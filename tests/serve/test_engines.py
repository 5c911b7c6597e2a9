import numpy as np
import pytest

from ray_ft.config import VLLMConfig
from ray_ft.data.nodes import build_nodes
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.serve.engines import EmbeddingRetriever, VectorIndex, resolve_dtype
from ray_ft.serve.protocols import Embedder, Retriever


def test_vector_index_top_k_order_and_scores():
    nodes = [{"node_id": n, "text": n} for n in "abcd"]
    vecs = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    hits = VectorIndex(nodes, vecs).search(np.array([0.8, 0.6]), top_k=3)
    assert [h.node_id for h in hits] == ["c", "a", "b"]
    np.testing.assert_allclose([h.score for h in hits], [0.96, 0.8, 0.6], rtol=1e-6)
    assert len(VectorIndex(nodes, vecs).search(np.array([1.0, 0.0]), top_k=10)) == 4
    with pytest.raises(ValueError, match="4 nodes but 3 vectors"):
        VectorIndex(nodes, vecs[:3])


def test_dtype_auto_follows_the_device(monkeypatch):
    from ray_ft import engine_args

    assert resolve_dtype(VLLMConfig(), use_gpu=True) == "bfloat16"
    monkeypatch.setattr(engine_args, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(VLLMConfig(), use_gpu=False) == "bfloat16"
    monkeypatch.setattr(engine_args, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(VLLMConfig(), use_gpu=False) == "float32"
    assert resolve_dtype(VLLMConfig(dtype="bfloat16"), use_gpu=False) == "bfloat16"


@pytest.mark.slow
def test_real_minilm_embeds_normalised_and_retrieves_the_right_passage(minilm_dir):
    emb = SentenceTransformerEmbedder(str(minilm_dir))
    assert isinstance(emb, Embedder)
    vecs = emb.embed(["a cat sits on the mat", "a kitten is on the rug", "quarterly revenue grew 12%"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.3
    docs = [{"passage_id": "fin", "text": "Apple's net sales increased 8% in fiscal 2023."},
            {"passage_id": "bio", "text": "Mitochondria produce most of the cell's energy."},
            {"passage_id": "geo", "text": "Mount Everest is the highest mountain on Earth."}]
    retriever = EmbeddingRetriever(build_nodes(docs, "passage"), emb)
    assert isinstance(retriever, Retriever)
    hits = retriever.retrieve("What is the tallest mountain?", top_k=2)
    assert hits[0].node_id == "geo" and hits[0].score > hits[1].score


@pytest.mark.slow
def test_bfloat16_embedder_gives_float32_vectors_close_to_float32_ones(minilm_dir):
    texts = ["a cat sits on the mat", "quarterly revenue grew 12%", "Mount Everest is 8,849 metres tall"]
    fp32 = SentenceTransformerEmbedder(str(minilm_dir)).embed(texts)
    bf16 = SentenceTransformerEmbedder(str(minilm_dir), dtype="bfloat16").embed(texts)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    cos = np.sum(fp32 * bf16, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(fp32, bf16)  # close, but really bf16


def test_a_chat_template_that_refuses_the_messages_is_a_bad_request(smollm_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ray_ft.serve.engines import InvalidMessages, VLLMGenerator

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    # As strict templates do (Llama 2, Mistral): roles must alternate user/assistant.
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 and messages[loop.index0 - 1].role == m.role %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m.content }}{% endfor %}")
    gen = SimpleNamespace(tokenizer=tok, system_prompt="s")
    assert VLLMGenerator.render(gen, [{"role": "user", "content": "hi"}]) == "shi"
    with pytest.raises(InvalidMessages, match="chat template refused them: roles must alternate"):
        VLLMGenerator.render(gen, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
