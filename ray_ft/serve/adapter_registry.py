"""Adapters registered while serving (`serve.live_adapters`): where they may come from, what makes
one servable, and the registry file every engine replica reads.

An adapter is checked before any engine sees it, so a bad one is a 4xx naming the reason and
never reaches vLLM: the location must lie under an allowed root (symlinks resolved) or use an
allowed URI scheme; `adapter_config.json` must describe a LoRA adapter of rank <= the engine's
`max_lora_rank`; the weights must parse, and every LoRA matrix must fit the served base model
(its input and output sizes are sizes of the base's projections, its layer exists).

The registry is one JSON file {name: location} on storage every replica reads (the run folder):
written under an exclusive lock to a temp name, then renamed, so a reader never sees half of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from ray_ft.data.sources import is_uri
from ray_ft.errors import RayFTError
from ray_ft.serve.adapters import CONFIG, fetch_adapter


class BadAdapter(RayFTError):
    """The adapter cannot be served here; the message says why."""


def check_location(location: str, allowed_roots: list[str], allowed_schemes: list[str]) -> str:
    """The location, normalised, when it is allowed; else BadAdapter."""
    if "\0" in location:  # no path or URI holds one; os.path would raise ValueError (found by fuzzing)
        raise BadAdapter(f"location {location!r}: contains a NUL character")
    if is_uri(location):
        scheme = location.split("://", 1)[0]
        if scheme not in allowed_schemes:
            raise BadAdapter(f"location {location}: scheme '{scheme}' is not allowed "
                             f"(serve.live_adapters.allowed_schemes: {allowed_schemes or 'none'})")
        if ".." in location.split("://", 1)[1].split("/"):
            raise BadAdapter(f"location {location}: '..' segments are not allowed")
        return location
    path = Path(os.path.realpath(location))
    roots = [Path(os.path.realpath(r)) for r in allowed_roots]
    if not any(path == r or r in path.parents for r in roots):
        raise BadAdapter(f"location {location}: not under an allowed root "
                         f"(serve.live_adapters.allowed_roots: {allowed_roots or 'none'})")
    return str(path)


def _base_sizes(base_dir: str) -> tuple[set[int], int]:
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    sizes = {hidden, kv, cfg["num_attention_heads"] * head_dim, cfg.get("intermediate_size", hidden)}
    return sizes, cfg["num_hidden_layers"]


def check_adapter_files(folder: str, base_dir: str, max_rank: int) -> dict:
    """adapter_config.json of a servable LoRA adapter for the base at `base_dir`, else BadAdapter."""
    from safetensors import safe_open

    try:
        acfg = json.loads((Path(folder) / CONFIG).read_text())
    except FileNotFoundError:
        raise BadAdapter(f"{folder}: no LoRA adapter here ({CONFIG} missing)") from None
    except (OSError, ValueError) as err:
        raise BadAdapter(f"{folder}/{CONFIG}: not readable JSON ({err})") from None
    if str(acfg.get("peft_type", "")).upper() != "LORA":
        raise BadAdapter(f"{folder}: peft_type is {acfg.get('peft_type')!r}, not LORA")
    rank = acfg.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise BadAdapter(f"{folder}: rank r={rank!r} exceeds the engine's max_lora_rank={max_rank}"
                         if isinstance(rank, int) else f"{folder}: rank r={rank!r} is not a positive integer")
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise BadAdapter(f"{folder}: adapter_model.safetensors missing")
    sizes, layers = _base_sizes(base_dir)
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a torn file
        raise BadAdapter(f"{weights}: corrupt weights ({type(err).__name__}: {err})") from None
    for key, shape in shapes.items():
        kind = "A" if "lora_A" in key else "B" if "lora_B" in key else None
        if kind is None or len(shape) != 2:
            continue
        outer, inner = (shape[1], shape[0]) if kind == "A" else (shape[0], shape[1])
        layer = re.search(r"\.layers\.(\d+)\.", key)
        if inner != rank or outer not in sizes or (layer and int(layer.group(1)) >= layers):
            raise BadAdapter(f"{folder}: {key} has shape {list(shape)}, which does not fit the served base "
                             f"model (rank {rank}, projection sizes {sorted(sizes)}, {layers} layers)")
    return acfg


def check_live_adapter(location: str, allowed_roots: list[str], allowed_schemes: list[str], base_dir: str,
                       max_rank: int) -> str:
    """The normalised location of a servable adapter (a remote one fetched into this node's cache
    to check its files)."""
    location = check_location(location, allowed_roots, allowed_schemes)
    local = fetch_adapter(location) if is_uri(location) else location
    check_adapter_files(local, base_dir, max_rank)
    return location


class AdapterRegistry:
    """{served name: location} in one JSON file; re-read only when the file changed."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._names: dict[str, str] = {}

    def read(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._names = None, {}
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._seen:
            self._names, self._seen = json.loads(self.path.read_text() or "{}"), stamp
        return dict(self._names)

    def _update(self, change) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two ingress replicas registering at once
            names = json.loads(self.path.read_text() or "{}") if self.path.exists() else {}
            change(names)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(names, indent=1, sort_keys=True))
            tmp.replace(self.path)
        return names

    def add(self, name: str, location: str) -> None:
        self._update(lambda names: names.__setitem__(name, location))

    def remove(self, name: str) -> bool:
        gone = []
        self._update(lambda names: gone.append(names.pop(name, None)))
        return gone[0] is not None
