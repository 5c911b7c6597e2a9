"""`data.qa_generation.*`: an LLM writes questions per document node and answers them from the node."""

from __future__ import annotations

from pydantic import Field, model_validator

from ray_ft.config.base import _Strict


class QAEndpointConfig(_Strict):
    """Any OpenAI-compatible chat endpoint (vLLM, OpenAI, ray_ft's own served graph)."""

    base_url: str = Field(..., pattern=r"^https?://",
                          description="API root ending in /v1 (e.g. http://127.0.0.1:8000/v1).")
    model: str = Field(..., min_length=1, description="The `model` field sent to the endpoint.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the bearer token (never put the key here).")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight.")
    requests_per_second: float | None = Field(
        None, gt=0, description="Token-bucket rate limit on requests (None: unlimited).")
    burst: int = Field(1, ge=1, description="Requests the bucket lets through at once before the rate applies.")
    max_retries: int = Field(
        4, ge=0, le=10, description="Re-sends after a 429, a 5xx or a broken connection (exponential "
        "backoff from 0.5 s; a Retry-After header is honoured).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds one request may take.")
    structured_output: bool = Field(
        True, description="Send the reply's JSON schema as `response_format` (vLLM and OpenAI constrain "
        "decoding to it); false for servers without it: the reply is still parsed and checked.")


class QAFilterConfig(_Strict):
    """Quality filters on the generated pairs; each drop is counted in the manifest."""

    min_question_chars: int = Field(6, ge=1, description="Shorter questions are dropped.")
    max_question_chars: int = Field(300, ge=8, description="Longer questions are dropped.")
    min_answer_chars: int = Field(1, ge=1, description="Shorter answers are dropped.")
    max_answer_chars: int = Field(400, ge=2, description="Longer answers are dropped.")
    min_support: float = Field(
        0.6, ge=0.0, le=1.0, description="Share of the answer's words (Latin text) or characters "
        "(CJK) that must occur in the node; below it the answer is not supported by the node.")
    self_contained: bool = Field(
        True, description="Drop questions that point at the passage instead of naming their subject "
        "(\"the passage\", \"this text\", \"文中\"): asked of a retriever over the whole corpus they "
        "have no answer.")
    near_duplicate_ratio: float = Field(
        90.0, ge=50.0, le=100.0, description="A question whose rapidfuzz ratio to a kept question of the "
        "same node is at least this is a near duplicate (100: exact repeats only, after normalising).")


class QAGenerationConfig(_Strict):
    """Questions and answers written per node of `data.documents` (the seed's two steps: write
    questions from the node, then answer each from the node alone)."""

    questions_per_node: int = Field(2, ge=1, le=10, description="Questions asked per node.")
    max_nodes: int | None = Field(
        None, ge=1, description="Generate for at most this many nodes (a seeded sample; None: all). "
        "The knowledge base keeps every node either way.")
    model: str | None = Field(
        None, description="The writer on vLLM in Ray Data (packaged name, HF id or folder; None: "
        "model.name). Ignored with `endpoint`.")
    endpoint: QAEndpointConfig | None = Field(
        None, description="Write with an OpenAI-compatible endpoint instead of vLLM in Ray Data.")
    question_prompt: str | None = Field(
        None, description="User turn asking for questions, with {context} and {n} (None: the "
        "data.language built-in).")
    answer_prompt: str | None = Field(
        None, description="User turn asking for the answer, with {context} and {question} (None: the "
        "data.language built-in).")
    max_question_tokens: int = Field(48, ge=8, description="Tokens per question in the reply budget.")
    max_answer_tokens: int = Field(96, ge=8, description="Tokens of one answer reply.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature of both steps.")
    batch_size: int = Field(16, ge=1, description="Nodes per Ray Data batch: one engine writes their questions, then the answers.")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas (Ray Data actors).")
    cpus_per_engine: float = Field(1.0, gt=0, description="Logical CPUs reserved per engine actor (CPU runs).")
    filters: QAFilterConfig = Field(default_factory=QAFilterConfig)

    @model_validator(mode="after")
    def _check_prompts(self) -> "QAGenerationConfig":
        from ray_ft.data.templates import template_fields

        for name, want in (("question_prompt", {"context", "n"}), ("answer_prompt", {"context", "question"})):
            text = getattr(self, name)
            if text is not None and template_fields(text) != want:
                raise ValueError(f"{name} must use exactly {{{'}, {'.join(sorted(want))}}}; it uses "
                                 f"{sorted(template_fields(text))}")
        return self
