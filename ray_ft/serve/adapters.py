"""LoRA adapters by location: a local folder or an object-storage prefix (s3://, gs://, ...).

Locations are checked where the job is submitted (`adapter_config.json` must be there) and
fetched where the engine runs: a remote adapter is copied once into the local cache
(`$RAY_FT_HOME/adapters`, keyed by the location and the remote files' sizes and mtimes, so a
re-trained adapter at the same prefix is fetched again), temp folder first, then renamed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from ray_ft.data.sources import is_uri
from ray_ft.errors import RayFTError

CONFIG = "adapter_config.json"


def adapter_location(path: str | Path) -> str:
    """What the engine is given: a URI as it is, a local path made absolute."""
    return str(path) if is_uri(str(path)) else str(Path(path).resolve())


def _remote(uri: str):
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    return fs, base.rstrip("/")


def has_adapter(path: str | Path) -> bool:
    path = str(path)
    if not is_uri(path):
        return (Path(path) / CONFIG).is_file()
    import pyarrow.fs as pafs

    try:
        fs, base = _remote(path)
        return fs.get_file_info(f"{base}/{CONFIG}").type == pafs.FileType.File
    except (OSError, ValueError):
        return False


def check_adapter(path: str | Path, what: str, hint: str = "") -> str:
    """The adapter's location, or a one-line error naming `what` when there is none."""
    if not has_adapter(path):
        raise RayFTError(f"{what}{path}: no LoRA adapter here ({CONFIG} missing){hint}")
    return adapter_location(path)


def fetch_adapter(path: str, cache_root: Path | None = None) -> str:
    """A local folder holding the adapter at `path` (downloaded into the cache when remote)."""
    if not is_uri(path):
        return path
    import pyarrow.fs as pafs

    from ray_ft.models import cache_root as default_cache

    fs, base = _remote(path)
    files = sorted(fs.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda f: f.path)
    files = [f for f in files if f.type == pafs.FileType.File]
    if not any(f.path.endswith(f"/{CONFIG}") for f in files):
        raise RayFTError(f"{path}: no LoRA adapter here ({CONFIG} missing)")
    stamp = "".join(f"{f.path}:{f.size}:{f.mtime_ns};" for f in files)
    key = hashlib.sha256(f"{path}\0{stamp}".encode()).hexdigest()[:16]
    dest = (cache_root or default_cache().parent / "adapters") / key
    if (dest / CONFIG).is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{key}."))
    try:
        for f in files:
            target = tmp / f.path[len(base) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f.path) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        try:
            tmp.rename(dest)
        except OSError:  # another replica fetched it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dest)
