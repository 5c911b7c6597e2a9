"""ServeConfig's operations section: per-deployment replicas/autoscaling, batching, limits,
auth, prompt template; how it maps onto Ray Serve's options; which combinations are refused."""

import types
import typing

import pytest
from pydantic import BaseModel

from ray_ft.config import DataConfig, ServeConfig, parse_job
from ray_ft.data.templates import rag_messages
from ray_ft.errors import RayFTError
from ray_ft.serve.prompting import RAGPrompt, rag_prompt_of


def _models_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def test_every_serve_field_is_documented_including_optional_sections():
    seen, undocumented = set(), []

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            nested = list(_models_in(field.annotation))
            if not field.description and not nested:
                undocumented.append(f"{model.__name__}.{name}")
            for sub in nested:
                walk(sub)

    walk(ServeConfig)
    assert {m.__name__ for m in seen} >= {"AutoscalingSettings", "DeploymentSettings", "EmbedderBatching"}
    assert undocumented == []


def test_deployment_settings_become_serve_options():
    cfg = parse_job({"name": "x", "serve": {"deployments": {
        "generator": {"num_replicas": 2, "graceful_shutdown_timeout_s": 5},
        "embedder": {"max_ongoing_requests": 32, "autoscaling": {
            "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8, "upscale_delay_s": 3}}}}})
    d = cfg.serve.deployments
    assert d.generator.serve_options() == {
        "num_replicas": 2, "max_ongoing_requests": 64, "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 5.0}
    emb = d.embedder.serve_options()
    assert "num_replicas" not in emb and emb["max_ongoing_requests"] == 32
    assert emb["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0,
                                         "upscale_delay_s": 3.0, "downscale_delay_s": 600.0,
                                         "look_back_period_s": 30.0}
    # Ray Serve accepts them as they are.
    from ray.serve.config import AutoscalingConfig

    assert AutoscalingConfig(**emb["autoscaling_config"]).max_replicas == 4
    assert d.ingress.serve_options()["num_replicas"] == 1 and d.ingress.max_ongoing_requests == 256
    # A partial section keeps the type's other defaults.
    part = parse_job({"name": "x", "serve": {"deployments": {"ingress": {"num_replicas": 2}}}}).serve.deployments
    assert (part.ingress.num_replicas, part.ingress.max_ongoing_requests) == (2, 256)


@pytest.mark.parametrize("serve, message", [
    ({"deployments": {"embedder": {"num_replicas": 2, "autoscaling": {}}}}, "set num_replicas or autoscaling, not both"),
    ({"deployments": {"generator": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
     "min_replicas=3 > max_replicas=2"),
    ({"deployments": {"generator": {"autoscaling": {"initial_replicas": 5, "max_replicas": 2}}}},
     r"initial_replicas=5 is outside \[min_replicas, max_replicas\] = \[1, 2\]"),
    ({"deployments": {"retriever": {"max_ongoing_requests": 4, "autoscaling": {"target_ongoing_requests": 8}}}},
     "target_ongoing_requests=8 exceeds max_ongoing_requests=4"),
    ({"embedder_batching": {"max_batch_size": 100}}, "max_batch_size=100 exceeds deployments.embedder.max_ongoing_requests=64"),
    ({"max_tokens": 300, "max_tokens_limit": 200}, "max_tokens=300 exceeds max_tokens_limit=200"),
    ({"max_tokens_limit": 4096}, "max_tokens_limit=4096 leaves no room for a prompt in vllm.max_model_len=4096"),
    ({"prompt_template": "Q: {query}"}, r"exactly \{context_str\} and \{query\}; it uses \['query'\]"),
    ({"prompt_template": "{context_str} {query} {answer}"}, "it uses"),
    ({"deployments": {"generator": {"num_replicas": 0}}}, "greater than or equal to 1"),
])
def test_bad_combinations_name_the_field_and_why(serve, message):
    with pytest.raises(RayFTError, match=message):
        parse_job({"name": "x", "serve": serve})


def test_default_prompt_is_the_training_prompt_byte_for_byte():
    for language in ("zh", "en"):
        cfg = parse_job({"name": "x", "data": {"language": language}})
        prompt = rag_prompt_of(cfg)
        contexts, query = ["第一段 {braces}", "second passage\n"], "问题 {query}?"
        assert prompt.messages(contexts, query) == rag_messages(contexts, query, language, cfg.model.system_prompt)
    custom = rag_prompt_of(parse_job({"name": "x", "serve": {
        "system_prompt": "Be terse.", "prompt_template": "Context:\n{context_str}\n\nQ: {query}"}}))
    assert custom == RAGPrompt("zh", "Be terse.", "Context:\n{context_str}\n\nQ: {query}", None)
    assert custom.messages(["a {x}", "b"], "why {y}?") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Context:\na {x}\n\nb\n\nQ: why {y}?"}]


@pytest.mark.skipif("prompt_template" not in DataConfig.model_fields,
                    reason="data.prompt_template (the training template) arrives with the data stage's issue-3 work")
def test_default_prompt_follows_a_custom_training_template():
    tmpl = "Context: {context}\nQuestion: {question}\n"
    cfg = parse_job({"name": "x", "data": {"prompt_template": tmpl}})
    contexts, query = ["p1", "p2"], "q?"
    assert rag_prompt_of(cfg).messages(contexts, query) == rag_messages(
        contexts, query, cfg.data.language, cfg.model.system_prompt, tmpl)
    assert rag_prompt_of(cfg).messages(contexts, query)[1]["content"] == "Context: p1\n\np2\nQuestion: q?\n"


def test_missing_auth_token_fails_before_anything_is_deployed(monkeypatch):
    from ray_ft.serve.app import ingress_settings

    cfg = parse_job({"name": "x", "serve": {"auth_token_env": "RAY_FT_TEST_ABSENT_TOKEN"}})
    monkeypatch.delenv("RAY_FT_TEST_ABSENT_TOKEN", raising=False)
    with pytest.raises(RayFTError, match="environment variable RAY_FT_TEST_ABSENT_TOKEN is not set or empty"):
        ingress_settings(cfg)
    monkeypatch.setenv("RAY_FT_TEST_ABSENT_TOKEN", "abc123xyz")
    settings = ingress_settings(cfg)
    assert settings.auth_token.get_secret_value() == "abc123xyz" and "abc123xyz" not in repr(settings)
