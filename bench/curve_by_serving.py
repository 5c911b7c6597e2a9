"""The learning curve's two ways, what each costs: validation during training (greedy answers of the
trainer's model to the dev questions, transformers `generate`; its time is `val_s` in the run's
train/metrics.jsonl) vs serving the run's kept checkpoints' adapters side by side on one vLLM
engine after training (`eval.adapters`) and asking them the same dev questions.

Given a finished run of jobs/cmrc_full_cpu.yaml, this rebuilds its dev questions (the same reads
and seeded splits as its prepare stage), serves the base with every checkpoint's adapter kept
under train/ray (unmerged, the engine's LoRA path), evaluates the dev questions in gold mode with
`ray-ft eval`'s code, and prints seconds per (checkpoint, question) next to the validation's.

    .venv/bin/python bench/curve_by_serving.py [--job jobs/cmrc_full_cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def dev_questions(cfg):
    """The dev split of `cfg`'s prepare stage, as QA records."""
    from ray_ft.data.readers import read_source
    from ray_ft.data.split import split_by_group

    d = cfg.data
    records = read_source(d.source, d.format, d.on_error, d.bad_answer).qa
    train, _ = split_by_group(records, lambda r: r.passage_id, d.eval_size, d.seed)
    _, dev = split_by_group(train, lambda r: r.passage_id, d.dev_size, d.seed + 1)
    return dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default=str(Path(__file__).resolve().parents[1] / "jobs" / "cmrc_full_cpu.yaml"))
    args = ap.parse_args()

    from sft_quality import squad_file

    from ray_ft.config import load_job, parse_job
    from ray_ft.io import read_jsonl
    from ray_ft.pipeline import run_eval_only

    cfg = load_job(args.job)
    history = read_jsonl(cfg.run_dir / "train" / "metrics.jsonl")
    points = [h for h in history if "val_s" in h]
    checkpoints = sorted((cfg.run_dir / "train" / "ray").glob("sft_*/checkpoint_*/export"))
    if not points or not checkpoints:
        raise SystemExit(f"{cfg.run_dir}: run jobs/cmrc_full_cpu.yaml first (no validations or checkpoints)")
    n = cfg.train.val_generate_samples
    work = Path(tempfile.mkdtemp(prefix="bench_curve_"))
    dev = dev_questions(cfg)
    job = cfg.model_dump()
    job.update(name="curve_by_serving", output_dir=str(work / "runs"))
    job["eval"].update(source=str(squad_file(dev, work / "dev.json")), max_samples=n, modes=["gold"],
                       models=["base"], adapters={f"ckpt{i}": str(c) for i, c in enumerate(checkpoints)})
    job["data"].update(max_samples=16)  # prepare builds a training set too; it is not used here
    served = parse_job(job)
    t = time.perf_counter()
    table = run_eval_only(served)
    total = time.perf_counter() - t
    per = {row["model"]: row for row in table}
    val_s = [p["val_s"] for p in points]
    questions = points[0].get("val_questions", n)
    out = {"checkpoints": len(checkpoints), "dev_questions": questions,
           "validation_s_per_point": sum(val_s) / len(val_s),
           "validation_s_per_question": sum(val_s) / len(val_s) / questions,
           "serving_total_s": total,
           "serving_s_per_question": {m: 1 / r["throughput_rps"] for m, r in per.items()},
           "f1": {m: r["cmrc_f1"] for m, r in per.items()}}
    print(json.dumps(out, indent=1))
    (work / "bench_curve.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
