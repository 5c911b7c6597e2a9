import pytest

from ray_ft.config import parse_job
from ray_ft.stages import StageLog, stage_hashes
from tests.conftest import make_squad


def _cfg(tmp_path, **over):
    src = tmp_path / "qa.json"
    if not src.exists():
        make_squad(src, [("Paris is in France.", [("q1", "Where is Paris?", "France")])])
    job = {"name": "s", "output_dir": str(tmp_path / "runs"), "data": {"source": str(src)}}
    for section, fields in over.items():
        job.setdefault(section, {}).update(fields)
    return parse_job(job)


def test_a_change_reruns_its_stage_and_everything_after_it(tmp_path):
    base = stage_hashes(_cfg(tmp_path))
    # Without embed.enabled the embedder's settings change nothing downstream.
    emb = stage_hashes(_cfg(tmp_path, embed={"temperature": 0.05}))
    assert emb["embed"] != base["embed"] and all(emb[s] == base[s] for s in ("prepare", "train", "eval"))
    lr = stage_hashes(_cfg(tmp_path, train={"learning_rate": 1e-4}))
    assert lr["prepare"] == base["prepare"] and lr["train"] != base["train"] and lr["eval"] != base["eval"]
    ev = stage_hashes(_cfg(tmp_path, eval={"max_samples": 7}))
    assert (ev["prepare"], ev["train"]) == (base["prepare"], base["train"]) and ev["eval"] != base["eval"]
    data = stage_hashes(_cfg(tmp_path, data={"seed": 1}))
    assert all(data[s] != base[s] for s in ("prepare", "train", "eval")) and data["embed"] == base["embed"]
    # The source file's bytes count too.
    (tmp_path / "qa.json").write_text((tmp_path / "qa.json").read_text().replace("France.", "France!"))
    assert stage_hashes(_cfg(tmp_path))["prepare"] != base["prepare"]


def test_another_ray_ft_version_reruns_every_stage_and_rebuilds_the_data(tmp_path, monkeypatch):
    import ray_ft
    from ray_ft.data.embed_data import embed_config_hash
    from ray_ft.data.prepare import data_config_hash

    cfg = _cfg(tmp_path)
    before, data, embed = stage_hashes(cfg), data_config_hash(cfg), embed_config_hash(cfg)
    monkeypatch.setattr(ray_ft, "__version__", ray_ft.__version__ + ".post1")
    after = stage_hashes(cfg)
    assert all(after[s] != before[s] for s in before)
    # The prepared data's and the triplets' own manifests (what `ray-ft prepare` reuses) too.
    assert data_config_hash(cfg) != data and embed_config_hash(cfg) != embed


def test_stage_log_skips_only_finished_unchanged_stages(tmp_path):
    cfg = _cfg(tmp_path)
    out = tmp_path / "out.txt"
    out.write_text("x")
    log = StageLog(cfg.run_dir, cfg)
    assert log.fresh("prepare") is None
    log.done("prepare", {"n": 1}, [out])
    log.done("train", {"adapter_dir": "a"}, [out])

    again = StageLog(cfg.run_dir, cfg)  # a new invocation reads stages.json
    assert again.fresh("prepare") == {"n": 1} and again.fresh("train") == {"adapter_dir": "a"}
    assert again.fresh("eval") is None  # never finished (e.g. interrupted): runs
    assert StageLog(cfg.run_dir, cfg, force={"prepare"}).fresh("prepare") is None
    changed = StageLog(cfg.run_dir, _cfg(tmp_path, train={"learning_rate": 1e-4}))
    assert changed.fresh("prepare") == {"n": 1} and changed.fresh("train") is None

    upstream_ran = StageLog(cfg.run_dir, cfg)
    upstream_ran.done("prepare", {"n": 2}, [out])
    assert upstream_ran.fresh("train") is None  # new data -> train again, though its config is the same
    out.unlink()
    assert StageLog(cfg.run_dir, cfg).fresh("train") is None  # its output is gone
    with pytest.raises(ValueError, match="unknown stage"):
        StageLog(cfg.run_dir, cfg, force={"serve"})


def _embedder_folder(cfg, content: str) -> None:
    model = cfg.run_dir / "embed" / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "model.safetensors").write_text(content)


def test_an_embed_stage_reruns_only_the_stages_that_read_the_embedder(tmp_path):
    served_only = _cfg(tmp_path, embed={"enabled": True})  # serves it; the training data does not use it
    ra = _cfg(tmp_path, embed={"enabled": True}, data={"retrieval_augment": {"enabled": True}})
    for cfg in (served_only, ra):
        _embedder_folder(cfg, "v1")
        base = stage_hashes(cfg)
        changed = stage_hashes(cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"temperature": 0.05})}))
        assert changed["embed"] != base["embed"] and changed["eval"] != base["eval"]
        # Retrieval-augmented examples are built with the fine-tuned embedder: data and training
        # follow it; otherwise only serving + eval do.
        reads = cfg.data.retrieval_augment.enabled
        assert (changed["prepare"] != base["prepare"], changed["train"] != base["train"]) == (reads, reads)

    out = tmp_path / "out.txt"
    out.write_text("x")
    for cfg, rerun in ((served_only, ["eval"]), (ra, ["prepare", "train", "eval"])):
        log = StageLog(cfg.run_dir, cfg)
        for stage in ("embed", "prepare", "train", "eval"):
            log.done(stage, {}, [out])
        again = StageLog(cfg.run_dir, cfg, force={"embed"})
        assert again.fresh("embed") is None
        _embedder_folder(cfg, "v2")  # the embed stage re-exported the model
        again.done("embed", {}, [out])
        assert [s for s in ("prepare", "train", "eval") if again.fresh(s) is None] == rerun


def test_prepare_hash_follows_the_fine_tuned_embedder_files(tmp_path):
    cfg = _cfg(tmp_path, embed={"enabled": True}, data={"retrieval_augment": {"enabled": True}})
    _embedder_folder(cfg, "v1")
    before = stage_hashes(cfg)["prepare"]
    _embedder_folder(cfg, "v2-longer")  # computed when asked: after the embed stage wrote it
    assert stage_hashes(cfg)["prepare"] != before


def test_eval_hash_follows_the_files_of_adapters_it_serves_from_outside_the_run(tmp_path):
    adapter = tmp_path / "other_adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"v1")
    cfg = _cfg(tmp_path, eval={"adapters": {"other": str(adapter)}})
    before = stage_hashes(cfg)
    assert stage_hashes(cfg) == before
    (adapter / "adapter_model.safetensors").write_bytes(b"v2, re-trained")
    after = stage_hashes(cfg)
    assert after["eval"] != before["eval"] and all(after[s] == before[s] for s in ("prepare", "train"))


def test_one_invocation_hashes_the_data_once_until_a_stage_finishes(tmp_path, monkeypatch):
    import ray_ft.data.prepare as prepare

    cfg = _cfg(tmp_path)
    out = tmp_path / "out.txt"
    out.write_text("x")
    first = StageLog(cfg.run_dir, cfg)
    for stage in ("prepare", "train", "eval"):
        first.done(stage, {}, [out])
    calls = []
    real = prepare.data_config_hash
    monkeypatch.setattr(prepare, "data_config_hash", lambda c: calls.append(1) or real(c))
    assert len(set(stage_hashes(cfg).values())) == 6 and len(calls) == 1  # one per stage; read by train, eval and pairs too
    log = StageLog(cfg.run_dir, cfg)
    assert all(log.fresh(s) == {} for s in ("prepare", "train", "eval")) and len(calls) == 2
    log.done("eval", {}, [out])
    assert log.fresh("train") == {} and len(calls) == 3  # a stage finished: its outputs may feed a hash


def test_train_stage_starts_the_configured_cluster_even_when_the_data_was_reused(tmp_path, monkeypatch):
    # Reused data skips prepare's init_ray; without its own, Ray's auto-init would start a
    # default cluster that ignores ray.address / ray.num_cpus.
    import ray_ft.train.sft as sft
    from ray_ft import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: calls.append(("init_ray", cfg.ray.num_cpus)))
    monkeypatch.setattr(pipeline, "resolve_model", lambda name: tmp_path)
    monkeypatch.setattr(sft, "run_training", lambda *a, **kw: calls.append(("run_training",)))
    pipeline.stage_train(_cfg(tmp_path, ray={"num_cpus": 6}), prepared=None)
    assert calls == [("init_ray", 6), ("run_training",)]


def test_the_rerank_stage_reruns_eval_only_when_eval_serves_its_reranker(tmp_path):
    trained = {"rerank": {"enabled": True}}
    base = stage_hashes(_cfg(tmp_path, **trained))
    lr = stage_hashes(_cfg(tmp_path, rerank={"enabled": True, "learning_rate": 1e-4}))
    # trained but not served: the eval stage does not read it
    assert lr["rerank"] != base["rerank"] and all(lr[s] == base[s] for s in ("prepare", "train", "eval"))
    served = {"rerank": {"enabled": True}, "serve": {"rerank": {"enabled": True}}}
    a = stage_hashes(_cfg(tmp_path, **served))
    b = stage_hashes(_cfg(tmp_path, rerank={"enabled": True, "learning_rate": 1e-4}, serve={"rerank": {"enabled": True}}))
    assert a["eval"] != b["eval"] and a["train"] == b["train"]
    # the first stage that fetches the candidates is the rerank stage's input too
    first = stage_hashes(_cfg(tmp_path, **trained, serve={"embedder": "other-embedder"}))
    assert first["rerank"] != base["rerank"]
    # a reranker served from outside the run: eval depends on its folder, not on the stage
    folder = tmp_path / "ce"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    outside = _cfg(tmp_path, serve={"rerank": {"enabled": True, "model": str(folder)}})
    before = stage_hashes(outside)["eval"]
    (folder / "config.json").write_text('{"changed": 1}')
    assert stage_hashes(outside)["eval"] != before


def test_mining_pairs_is_a_stage_of_its_own_after_eval(tmp_path):
    from ray_ft.run import planned_stages

    cfg = _cfg(tmp_path)
    mining = _cfg(tmp_path, train={"preference": {"mining": {"enabled": True}}})
    assert planned_stages(cfg)[-1] == "eval" and planned_stages(mining)[-2:] == ["eval", "pairs"]
    before, after = stage_hashes(cfg), stage_hashes(mining)
    # Switching mining on reruns nothing before it; its own settings change only the pairs stage.
    assert all(after[s] == before[s] for s in ("prepare", "train", "eval"))
    stricter = stage_hashes(_cfg(tmp_path, train={"preference": {"mining": {"enabled": True, "max_f1": 0.3}}}))
    assert stricter["pairs"] != after["pairs"] and stricter["train"] == after["train"]
    assert stage_hashes(_cfg(tmp_path, train={"learning_rate": 1e-4}))["pairs"] != before["pairs"]


def _job_file(path, name, requires=()):
    import yaml

    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(path.parent / "runs"),
                                    "requires": [dict(r) for r in requires]}))
    return path


def test_required_jobs_run_first_in_order_once_with_their_overrides(tmp_path):
    from ray_ft.config import load_job
    from ray_ft.run import required_jobs

    (tmp_path / "jobs").mkdir()
    _job_file(tmp_path / "jobs" / "sft.yaml", "sft")
    _job_file(tmp_path / "jobs" / "embed.yaml", "embed", [{"job": "sft.yaml"}])
    top = _job_file(tmp_path / "jobs" / "dpo.yaml", "dpo", [
        {"job": "embed.yaml"},  # requires sft.yaml itself: sft comes first, once
        {"job": "sft.yaml", "overrides": ["train.preference.mining.enabled=true"]}])
    chain = required_jobs(load_job(top))
    assert [j.name for j in chain] == ["sft", "embed"]  # paths relative to the requiring job file
    assert not chain[0].train.preference.mining.enabled  # the first mention of a run folder wins

    only = _job_file(tmp_path / "jobs" / "pairs.yaml", "pairs", [
        {"job": "sft.yaml", "overrides": ["train.preference.mining.enabled=true"]}])
    (sft,) = required_jobs(load_job(only))
    assert sft.train.preference.mining.enabled


def test_jobs_that_require_each_other_are_refused(tmp_path):
    from ray_ft.config import load_job
    from ray_ft.errors import RayFTError
    from ray_ft.run import required_jobs

    _job_file(tmp_path / "a.yaml", "a", [{"job": "b.yaml"}])
    _job_file(tmp_path / "b.yaml", "b", [{"job": "a.yaml"}])
    with pytest.raises(RayFTError, match="requires: the jobs require each other"):
        required_jobs(load_job(tmp_path / "a.yaml"))
    with pytest.raises(RayFTError, match="missing.yaml: job file not found"):
        required_jobs(load_job(_job_file(tmp_path / "c.yaml", "c", [{"job": "missing.yaml"}])))


def test_the_resolved_config_read_back_has_the_same_stage_hashes(tmp_path):
    from ray_ft.config import load_job, write_resolved

    import yaml

    _cfg(tmp_path)  # writes the source file
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "runs"),
                                   "data": {"source": "qa.json"}, "train": {"max_steps": 6}}))
    cfg = load_job(job)
    again = load_job(write_resolved(cfg))
    # (an int default of a float field, 2, read back as 2.0 once changed every hash after prepare)
    assert stage_hashes(again) == stage_hashes(cfg)
