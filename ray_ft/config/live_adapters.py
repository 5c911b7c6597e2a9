"""`serve.live_adapters`: LoRA adapters registered over HTTP while the graph serves."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_ft.config.base import _Strict


class LiveAdaptersConfig(_Strict):
    """`POST /v1/adapters` (bearer auth required) registers an adapter under a name; every engine
    replica picks it up from the shared registry file on its first request for that name, and
    vLLM loads it then (at most `max_loras` resident, least recently used evicted)."""

    enabled: bool = Field(False, description="Serve POST/DELETE /v1/adapters (needs serve.auth_token_env).")
    allowed_roots: list[str] = Field(
        default_factory=list, description="Local folders an adapter may be registered from (the adapter "
        "folder, symlinks resolved, must lie under one of them). Relative: to the working directory.",
    )
    allowed_schemes: list[Literal["s3", "gs", "hdfs"]] = Field(
        default_factory=list, description="Object-storage URI schemes an adapter may be registered from.",
    )
    max_loras: int = Field(4, ge=1, description="Adapters resident in an engine at once (vLLM max_loras).")
    registry: str | None = Field(
        None, description="The registry file every replica reads (None: run_dir/serve/adapters.json; on a "
        "cluster it must be on storage all nodes share, as the run folder is).",
    )
