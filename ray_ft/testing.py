"""Helpers shared by the tests and the benchmarks (like `torch.testing`): not used by jobs."""

from __future__ import annotations

from pathlib import Path


def make_random_lora_adapter(model_dir: Path | str, out: Path | str, std: float = 0.05, seed: int = 0):
    """Save a rank-8 all-linear LoRA adapter whose B matrices are N(0, std), seeded; return the
    peft model. std=0.05 changes SmolLM2's greedy answers without making them noise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return peft_model


def _accepts_schema_valid_requests(ctx, response, case):
    """schemathesis's positive_data_acceptance, less the 400s the published schema says a valid
    request may get (an error `code` in ray_ft.serve.openapi.LIMIT_CODES)."""
    from ray_ft.serve.openapi import LIMIT_CODES

    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = response.json()["error"].get("code")
    assert code in LIMIT_CODES, f"a schema-valid request got 400 without a limit code: {response.text[:300]}"
    return None


def api_checks() -> dict:
    """`call_and_validate` keywords: every schemathesis check, with positive-data acceptance
    taught the documented limit codes."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    return {"excluded_checks": [positive_data_acceptance], "additional_checks": [_accepts_schema_valid_requests]}


def fuzz_api(schema, headers: dict, examples: int, timeout_s: float, skip: set[tuple[str, str]] = frozenset(),
             stop_on_failure: bool = True) -> tuple[dict[str, int], list[str]]:
    """Send `examples` schemathesis-generated requests per operation of `schema` and per mode
    (valid, and broken on purpose), each checked by `api_checks()` and bounded by `timeout_s`;
    return (requests sent per "METHOD /path mode", failures). `stop_on_failure`: raise the first."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    tried: dict[str, int] = {}
    failures: list[str] = []
    checks = api_checks()
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in skip:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            key = f"{op.label} {mode.value}"

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                tried[key] = tried.get(key, 0) + 1
                case.call_and_validate(headers=headers, timeout=timeout_s, **checks)

            try:
                fuzz()
            except Unsatisfiable:  # nothing to break in a request without parameters (GET /healthz)
                if mode is not schemathesis.GenerationMode.NEGATIVE:
                    raise
            except Exception as err:  # noqa: BLE001 - a failure report, re-raised unless collecting
                if stop_on_failure:
                    raise
                failures.append(f"{key}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return tried, failures
