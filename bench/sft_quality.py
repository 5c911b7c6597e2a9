"""What a training setting costs in answer quality, measured on held-out dev questions: LoRA SFT
of SmolLM2-135M on the same CMRC2018 training examples under each variant, then every variant's
adapter scored on the same dev questions with their whole passages, through ray_ft's own stages
(`ray-ft run` with `eval.source`). The first variant is the reference; each other one is
compared with it question by question (paired bootstrap, 95%).

Variants set `data.cutoff_len` and `train.precision`, e.g. the answer-centred context window
(cutoff 448, the whole-split job's: nearly every CMRC context is cut to a window around its answer; 2048: none is) and
bf16 vs fp32 compute.

The dev questions are a seeded 10% of the *training* passages of the whole-split job
(jobs/cmrc_full_cpu.yaml: CMRC2018 dev, seed 42, 20% of passages held out for its eval set), so
neither its 652 reported questions nor any example trained on here is among them. Each variant
trains on the first `--samples` examples of the remaining passages in the seeded order (the same
examples in every variant: with shorten_context all of them fit), packed into 2,048-token rows,
one epoch, the full job's other settings.

    .venv/bin/python bench/sft_quality.py [--samples 256] [--dev-share 0.1]
        [--variants 448:bf16 2048:bf16 448:fp32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CMRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"
COLUMNS = ("cmrc_em", "cmrc_f1", "em", "origin")


def squad_file(records, path: Path) -> Path:
    """QA records as a SQuAD-layout file (one paragraph per passage)."""
    by_passage: dict[str, dict] = {}
    for r in records:
        para = by_passage.setdefault(r.passage_id, {"context": r.context, "qas": []})
        para["qas"].append({"id": r.id, "question": r.question,
                            "answers": [{"text": a, "answer_start": r.context.find(a)} for a in r.answers]})
    path.write_text(json.dumps({"data": [{"paragraphs": list(by_passage.values())}]}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--dev-share", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", default=["448:bf16", "2048:bf16", "448:fp32"],
                    help="CUTOFF:PRECISION; the first is the reference")
    args = ap.parse_args()

    from ray_ft.config import load_job, parse_job
    from ray_ft.data.readers import read_qa_source
    from ray_ft.data.split import split_by_group
    from ray_ft.eval.intervals import paired_difference_ci
    from ray_ft.io import read_jsonl
    from ray_ft.run import run_all

    full = load_job(Path(__file__).resolve().parents[1] / "jobs" / "cmrc_full_cpu.yaml")
    records = read_qa_source(str(CMRC))
    train, _ = split_by_group(records, lambda r: r.passage_id, full.data.eval_size, full.data.seed)
    pool, dev = split_by_group(train, lambda r: r.passage_id, args.dev_share, full.data.seed + 7)
    work = Path(tempfile.mkdtemp(prefix="bench_sft_quality_"))
    train_file, dev_file = squad_file(pool, work / "train.json"), squad_file(dev, work / "dev.json")
    results, preds = {}, {}
    for variant in args.variants:
        cutoff, precision = variant.split(":")
        name = f"cutoff{cutoff}_{precision}"
        job = full.model_dump()
        job.update(name=name, output_dir=str(work / "runs"))
        job["data"].update(source=str(train_file), max_samples=args.samples, cutoff_len=int(cutoff), dev_size=0.0,
                           packing_len=max(2048, int(cutoff)))
        job["train"].update(eval_every_n_steps=None, precision=precision)
        job["eval"].update(source=str(dev_file), max_samples=len(dev), modes=["gold"], models=["finetuned"])
        t = time.perf_counter()
        summary = run_all(parse_job(job))
        row, m = summary.eval[0], summary.manifest
        preds[variant] = {r["id"]: r for r in read_jsonl(work / "runs" / name / "eval" / "predictions.jsonl")}
        results[variant] = {"wall_s": time.perf_counter() - t, "timings": summary.timings,
                            "train_tokens": m["train_tokens"], "shortened_context": m["shortened_context"],
                            "final_loss": summary.final_loss, "n": row["n"],
                            **{k: row[k] for k in COLUMNS}, **{f"{k}_ci95": row[f"{k}_ci95"] for k in COLUMNS}}
    ref, *others = args.variants
    ids = sorted(preds[ref])
    for other in others:
        for col in COLUMNS:
            results[other][f"{col}_vs_ref"] = list(paired_difference_ci(
                [preds[other][i][col] for i in ids], [preds[ref][i][col] for i in ids]))

    print(f"\n{args.samples} training examples (the same in every variant), one epoch; {len(dev)} dev questions over "
          f"{len({r.passage_id for r in dev})} passages, gold passage, whole; reference: {ref}")
    print("| cutoff:precision | contexts shortened (all built examples) | train tokens | train s | final loss | EM (CMRC) | F1 (CMRC) "
          "| EM (seed) | origin | F1 vs reference (paired) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        em, f1 = r["cmrc_em_ci95"], r["cmrc_f1_ci95"]
        diff = r.get("cmrc_f1_vs_ref")
        vs = f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]" if diff else "—"
        print(f"| {variant} | {r['shortened_context']} | {r['train_tokens']} | {r['timings']['train_s']:.0f} "
              f"| {r['final_loss']:.3f} | {100 * r['cmrc_em']:.1f} [{100 * em[0]:.1f}, {100 * em[1]:.1f}] "
              f"| {100 * r['cmrc_f1']:.1f} [{100 * f1[0]:.1f}, {100 * f1[1]:.1f}] | {100 * r['em']:.1f} "
              f"| {100 * r['origin']:.1f} | {vs} |")
    (work / "bench_sft_quality.json").write_text(json.dumps(results, indent=2))
    print(f"details: {work / 'bench_sft_quality.json'}")


if __name__ == "__main__":
    main()
