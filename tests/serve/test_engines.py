import numpy as np
import pytest

from ray_ft.config import VLLMConfig
from ray_ft.data.nodes import build_nodes
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.serve.engines import resolve_dtype
from ray_ft.serve.protocols import Embedder


def test_dtype_auto_follows_the_device(monkeypatch):
    from ray_ft import engine_args

    assert resolve_dtype(VLLMConfig(), use_gpu=True) == "bfloat16"
    monkeypatch.setattr(engine_args, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(VLLMConfig(), use_gpu=False) == "bfloat16"
    monkeypatch.setattr(engine_args, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(VLLMConfig(), use_gpu=False) == "float32"
    assert resolve_dtype(VLLMConfig(dtype="bfloat16"), use_gpu=False) == "bfloat16"


@pytest.mark.slow
def test_real_minilm_embeds_normalised_and_ranks_the_right_passage_first(minilm_dir):
    emb = SentenceTransformerEmbedder(str(minilm_dir))
    assert isinstance(emb, Embedder)
    vecs = emb.embed(["a cat sits on the mat", "a kitten is on the rug", "quarterly revenue grew 12%"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.3
    docs = [{"passage_id": "fin", "text": "Apple's net sales increased 8% in fiscal 2023."},
            {"passage_id": "bio", "text": "Mitochondria produce most of the cell's energy."},
            {"passage_id": "geo", "text": "Mount Everest is the highest mountain on Earth."}]
    nodes = build_nodes(docs, "passage")
    scores = emb.embed([n["text"] for n in nodes]) @ emb.embed(["What is the tallest mountain?"])[0]
    assert nodes[int(np.argmax(scores))]["node_id"] == "geo" and np.sort(scores)[-1] > np.sort(scores)[-2] + 0.1


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
