"""What a job command prints: one view of the run on the terminal, the full logs on disk.

- `setup_logging(run_dir, verbose)`: every log record goes to `run_dir/logs/driver.log` (Ray's,
  Ray Data's, Serve's and the libraries' loggers and Python warnings included); the terminal
  gets only warnings and errors of ray_ft. Ray workers' output (training ranks, vLLM in the Serve
  replicas, Ray Data actors) stays in the Ray session's log files (`log_to_driver`), which
  `collect_ray_logs` copies to `run_dir/logs/ray/` when the command ends. `verbose=True` keeps
  today's behaviour: everything on the terminal too.
- `RunView`: the stages with their state (pending, running, done, skipped, failed) and time, and
  for the running stage its progress with ETA and key figures. On a terminal a live view (rich);
  elsewhere (CI, `ray job submit` logs) plain lines, a running stage's progress at most every
  `interval_s`.
- `report_stage` / `report_progress`: what the stages call; no-ops when no view is open (a
  library call, a test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
PROGRESS_FILE = "progress.jsonl"  # rank 0 of a training run appends its step rows here
_SILENT = logging.CRITICAL + 1  # a handler level no record reaches
_LIBRARIES = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune", "vllm", "py.warnings")
_state = {"verbose": True, "file_handler": None, "handlers": [], "view": None, "since": 0.0}


def verbose() -> bool:
    """Whether Ray workers' output and the libraries' logs go to the terminal (init_ray asks)."""
    return _state["verbose"]


class _LazyFileHandler(logging.FileHandler):
    """A log file whose folder is made at the first record (a command that fails before it
    logs anything leaves no run folder behind)."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def driver_log(run_dir: Path) -> Path:
    return (run_dir / LOG_DIR / DRIVER_LOG).resolve()


def _to_terminal(record: logging.LogRecord) -> bool:
    """Without --verbose: ray_ft's warnings, and errors of anyone but the libraries whose own
    output goes to the logs (Ray logs errors while it recovers, as designed, from dead actors)."""
    if record.name.startswith("ray_ft"):
        return record.levelno >= logging.WARNING
    library = any(record.name == n or record.name.startswith(n + ".") for n in _LIBRARIES)
    return record.levelno >= logging.ERROR and not library


def setup_logging(run_dir: Path | None, verbose_: bool, level: str = "INFO") -> None:
    """Route log records: all to `run_dir/logs/driver.log`, to the terminal only what
    `_to_terminal` lets through (verbose: everything). Replaces the handlers an earlier call
    installed; leaves others (a test's capture) alone."""
    _state["verbose"], _state["since"] = verbose_, time.time()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for h in _state["handlers"]:
        root.removeHandler(h)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(fmt)
    if not verbose_:
        terminal.addFilter(_to_terminal)
    _state["handlers"] = [terminal]
    _state["file_handler"] = None
    if run_dir is not None:
        handler = _LazyFileHandler(driver_log(run_dir), delay=True, encoding="utf-8")
        handler.setFormatter(fmt)
        _state["handlers"].append(handler)
        _state["file_handler"] = handler
    for h in _state["handlers"]:
        root.addHandler(h)
    logging.captureWarnings(not verbose_)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per eval request is noise
    quiet_libraries()


def quiet_libraries() -> None:
    """Ray, Ray Data, Serve and vLLM log through handlers of their own (not the root's): without
    `verbose` their terminal handlers are silenced (errors too, as `_to_terminal` keeps library
    errors off the terminal: Ray logs them while it recovers) and their records also go to the
    driver log. Ray Data's progress bars are turned off (the view shows the stage instead)."""
    if _state["verbose"]:
        return
    # Ray Data installs its handlers when it is first imported: imported later (by the prepare
    # stage), its INFO lines and progress logs reached the terminal (~70 lines per prepare).
    import ray.data  # noqa: F401

    handler = _state["file_handler"]
    for name in _LIBRARIES:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(_SILENT)
        if handler is not None and not logger.propagate and handler not in logger.handlers:
            logger.addHandler(handler)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def collect_ray_logs(run_dir: Path) -> Path | None:
    """Copy the Ray session's log files written since `setup_logging` (driver, workers, Serve,
    Ray Data) to `run_dir/logs/ray`; None when Ray is not up in this process (a remote
    cluster's files stay on its nodes)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - a remote cluster's logs stay on its nodes
        return None
    if not session.is_dir() or not run_dir.is_dir():
        return None
    out = run_dir / LOG_DIR / "ray"
    for src in session.rglob("*"):
        if src.is_file() and src.suffix in (".log", ".out", ".err", ".txt") and src.stat().st_mtime >= _state["since"]:
            dst = out / src.relative_to(session)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return out


# -- the view ---------------------------------------------------------------------------------

STATES = ("pending", "running", "done", "skipped", "failed")
_MARK = {"pending": "·", "running": "▶", "done": "✓", "skipped": "↷", "failed": "✗"}


@dataclass
class _Stage:
    name: str
    state: str = "pending"
    started: float | None = None
    started_wall: float = 0.0
    seconds: float | None = None
    done: int = 0
    total: int = 0
    label: str = ""
    figures: dict = field(default_factory=dict)
    first_progress: tuple[float, int] | None = None

    def eta_s(self, now: float) -> float | None:
        if not self.total or self.first_progress is None or self.done <= self.first_progress[1]:
            return None
        t0, d0 = self.first_progress
        return (now - t0) / (self.done - d0) * (self.total - self.done)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _figures(figures: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())


class RunView:
    """The stages of one command and the running one's progress (a context manager)."""

    def __init__(self, stages: list[str], run_dir: Path, interactive: bool | None = None,
                 interval_s: float = 30.0, out=None):
        self.out = out or sys.stdout
        self.stages = {s: _Stage(s) for s in stages}
        self.run_dir, self.interval_s = Path(run_dir), interval_s
        self.interactive = self.out.isatty() if interactive is None else interactive
        self._lock = threading.Lock()
        self._last_line: dict[str, float] = {}
        self._stop = threading.Event()
        self._live = None

    # The stages and the poller report here.
    def stage(self, name: str, state: str, seconds: float | None = None) -> None:
        with self._lock:
            st = self.stages.setdefault(name, _Stage(name))
            st.state = state
            if state == "running":
                st.started, st.started_wall = time.monotonic(), time.time()
                st.done, st.total, st.first_progress, st.figures = 0, 0, None, {}
                quiet_libraries()  # a stage may have imported one (Ray Data, Serve) since
            elif seconds is not None:
                st.seconds = seconds
        if not self.interactive:
            took = f" in {_duration(seconds)}" if seconds is not None and state in ("done", "failed") else ""
            why = " (config and inputs unchanged)" if state == "skipped" else ""
            self._line(f"{name}: {state}{took}{why}")
        self._refresh()

    def progress(self, name: str, done: int, total: int, label: str = "", **figures) -> None:
        now = time.monotonic()
        with self._lock:
            st = self.stages.setdefault(name, _Stage(name, "running", now))
            if label != st.label or st.first_progress is None or done < st.done:
                st.first_progress, st.label = (now, done), label
            st.done, st.total, st.figures = done, total, figures
            due = done >= total or now - self._last_line.get(name, 0.0) >= self.interval_s
            if due:
                self._last_line[name] = now
            line = self._progress_text(st, now)
        if not self.interactive and due:
            self._line(line)
        self._refresh()

    def _progress_text(self, st: _Stage, now: float) -> str:
        eta = st.eta_s(now)
        head = f"{st.name}{' ' + st.label if st.label else ''}: {st.done}/{st.total}"
        pct = f" ({st.done / st.total:.0%})" if st.total else ""
        tail = f" eta {_duration(eta)}" if eta is not None and st.done < st.total else ""
        figs = _figures(st.figures)
        return f"{head}{pct}{' ' + figs if figs else ''}{tail}"

    def _line(self, text: str) -> None:
        print(f"[ray-ft {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    # Rendering on a terminal.
    def _renderable(self):
        from rich.table import Table

        now = time.monotonic()
        table = Table.grid(padding=(0, 2))
        with self._lock:
            for st in self.stages.values():
                took = st.seconds if st.seconds is not None else (now - st.started if st.started and st.state == "running" else None)
                detail = ""
                if st.state == "running" and st.total:
                    width = 24
                    filled = int(width * st.done / st.total)
                    detail = "█" * filled + "░" * (width - filled) + " " + self._progress_text(st, now).split(": ", 1)[1]
                elif st.state == "skipped":
                    detail = "unchanged"
                table.add_row(f"{_MARK[st.state]} {st.name}", st.state, _duration(took) if took is not None else "",
                              detail)
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._renderable())

    def _poll(self) -> None:
        """Training ranks run in Ray workers: rank 0 appends each logged step to the stage's
        progress file, read here."""
        seen: dict[Path, int] = {}
        while not self._stop.wait(1.0):
            for name, st in list(self.stages.items()):
                if st.state != "running":
                    continue
                for path in (self.run_dir / name).rglob(PROGRESS_FILE) if (self.run_dir / name).is_dir() else ():
                    stat = path.stat()
                    if stat.st_size == seen.get(path) or stat.st_mtime < st.started_wall:
                        continue  # unchanged, or left by an earlier run
                    seen[path] = stat.st_size
                    row = _last_row(path)
                    if row and row.get("n_steps"):
                        self.progress(name, row["step"], row["n_steps"], row.get("tag", ""),
                                      **{k: row[k] for k in ("loss", "tokens_per_s", "val_loss", "val_mrr")
                                         if isinstance(row.get(k), (int, float))})

    def __enter__(self) -> "RunView":
        if self.interactive:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._renderable(), console=Console(file=self.out), refresh_per_second=2,
                              transient=False)
            self._live.start()
        threading.Thread(target=self._poll, daemon=True, name="ray-ft-progress").start()
        _state["view"] = self
        return self

    def __exit__(self, *exc) -> None:
        _state["view"] = None
        self._stop.set()
        if self._live is not None:
            self._live.update(self._renderable())
            self._live.stop()


def _last_row(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def stage(name: str):
    """Report `name` running, then done or failed with its time (for commands that run a stage
    outside `run_all`)."""
    report_stage(name, "running")
    t = time.perf_counter()
    try:
        yield
    except BaseException:
        report_stage(name, "failed", time.perf_counter() - t)
        raise
    report_stage(name, "done", time.perf_counter() - t)


def report_stage(name: str, state: str, seconds: float | None = None) -> None:
    view = _state["view"]
    if view is not None:
        view.stage(name, state, seconds)


def report_progress(name: str, done: int, total: int, label: str = "", **figures) -> None:
    view = _state["view"]
    if view is not None:
        view.progress(name, done, total, label, **figures)
