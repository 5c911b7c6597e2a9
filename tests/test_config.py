from pathlib import Path

import pytest

from ray_ft.config import JobConfig, load_job, parse_job
from ray_ft.errors import RayFTError

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_job_loads_with_recipe_defaults():
    cfg = load_job(ROOT / "jobs" / "cmrc_lora_smoke.yaml")
    assert (cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_dropout) == (8, 16, 0.0)
    assert cfg.train.lora_target == "all"
    assert cfg.data.max_samples == 64 and cfg.eval.max_samples >= 50
    # The relative data path resolves against the job file's folder.
    assert Path(cfg.data.source).is_absolute() and Path(cfg.data.source).name == "cmrc2018_dev.json"
    assert cfg.run_dir == Path("runs/cmrc_lora_smoke")


def test_unknown_key_names_the_field_path(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\ntrain:\n  lora_rnk: 8\n")
    with pytest.raises(RayFTError) as err:
        load_job(job)
    assert str(err.value) == f"{job}: field 'train.lora_rnk': unknown key"


def test_bad_value_names_field_and_reason():
    with pytest.raises(RayFTError, match=r"field 'data.val_size': Input should be less than 1"):
        parse_job({"name": "x", "data": {"val_size": 1.5}})
    with pytest.raises(RayFTError, match=r"field 'train.learning_rate'"):
        parse_job({"name": "x", "train": {"learning_rate": "fast"}})
    with pytest.raises(RayFTError, match=r"field 'name': Field required"):
        parse_job({})


def test_combinations_are_checked():
    with pytest.raises(RayFTError, match="lora_rank=32 exceeds serve.vllm.max_lora_rank=16"):
        parse_job({"name": "x", "train": {"lora_rank": 32}})
    with pytest.raises(RayFTError, match="num_shards=1 < train.num_workers=2"):
        parse_job({"name": "x", "train": {"num_workers": 2}, "data": {"num_shards": 1}})
    with pytest.raises(RayFTError, match="exceeds serve.vllm.max_model_len"):
        parse_job({"name": "x", "data": {"cutoff_len": 4096}})


def test_eval_labels_and_judge_are_checked():
    ep = {"label": "gpt", "base_url": "https://api.example.com/v1", "model": "gpt-x", "api_key_env": "K"}
    cfg = parse_job({"name": "x", "eval": {"endpoints": [ep], "judge": {"enabled": True, "model": "gpt"}}})
    assert cfg.eval.endpoints[0].model == "gpt-x" and cfg.eval.judge.n_questions == 3
    with pytest.raises(RayFTError, match=r"field 'eval': model labels must be unique; repeated: \['base'\]"):
        parse_job({"name": "x", "eval": {"endpoints": [{**ep, "label": "base"}]}})
    with pytest.raises(RayFTError, match=r"repeated: \['gpt'\]"):
        parse_job({"name": "x", "eval": {"endpoints": [ep], "adapters": {"gpt": "/a"}}})
    with pytest.raises(RayFTError, match=r"eval.adapters label \['x'\] is already the served name"):
        parse_job({"name": "x", "eval": {"adapters": {"x": "/a"}}})
    with pytest.raises(RayFTError, match="judge.model 'finetuned' is not one of the compared models"):
        parse_job({"name": "x", "eval": {"models": ["base"], "judge": {"enabled": True, "model": "finetuned"}}})
    with pytest.raises(RayFTError, match=r"field 'eval.endpoints.0.base_url': String should match"):
        parse_job({"name": "x", "eval": {"endpoints": [{**ep, "base_url": "api.example.com"}]}})


def test_invalid_yaml_and_missing_file(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text("name: [unclosed\n")
    with pytest.raises(RayFTError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_job(job)
    with pytest.raises(RayFTError, match="nope.yaml: job file not found"):
        load_job(tmp_path / "nope.yaml")
    job.write_text("- a list\n")
    with pytest.raises(RayFTError, match="must be a YAML mapping"):
        load_job(job)


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, JobConfig.__base__):
                yield from walk(field.annotation)
            else:
                yield model.__name__, name, field.description

    undocumented = [(m, n) for m, n, d in walk(JobConfig) if not d]
    assert undocumented == []


def test_data_stage_combinations_are_checked(tmp_path):
    with pytest.raises(RayFTError, match=r"field 'data': prompt_template must use exactly \{context\} and "
                                         r"\{question\}; it uses \['context', 'query'\]"):
        parse_job({"name": "x", "data": {"prompt_template": "{context} {query}"}})
    assert parse_job({"name": "x", "data": {"prompt_template": "Q: {question}\n{context}"}}).data.prompt_template
    with pytest.raises(RayFTError, match="retrieval_augment needs a QA source"):
        parse_job({"name": "x", "data": {"format": "alpaca", "retrieval_augment": {"enabled": True}}})
    with pytest.raises(RayFTError, match=r"serve.node_group 'para' is not one of data.node_groups "
                                         r"\['chunk', 'line', 'passage', 'sentence'\]"):
        parse_job({"name": "x", "serve": {"node_group": "para"}})
    cfg = parse_job({"name": "x", "data": {"node_groups": {"para": {"kind": "chunk", "chunk_size": 64}}},
                     "serve": {"node_group": "para"}})
    assert list(cfg.data.node_groups) == ["para"] and cfg.data.node_groups["para"].chunk_overlap == 32
    with pytest.raises(RayFTError, match=r"field 'embed.hard_negatives': .*range_for_sampling must be 0 <= lo < hi"):
        parse_job({"name": "x", "embed": {"hard_negatives": {"range_for_sampling": [5, 5]}}})
    # Shards default to one per training worker; kb_sources resolve against the job file.
    assert parse_job({"name": "x", "train": {"num_workers": 3}}).num_shards == 3
    (tmp_path / "kb").mkdir()
    job = tmp_path / "j.yaml"
    job.write_text("name: x\ndata:\n  kb_sources: [kb]\n")
    assert load_job(job).data.kb_sources == [str(tmp_path / "kb")]


def test_every_job_file_loads():
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert {j.stem for j in jobs} >= {"cmrc_lora_smoke", "cmrc_lora_gpu", "financial_embed", "radit", "rag_eval"}
    for job in jobs:
        cfg = load_job(job)
        assert cfg.name == job.stem, job
    gpu = load_job(ROOT / "jobs" / "cmrc_lora_gpu.yaml")
    assert gpu.train.use_gpu and gpu.train.num_workers == 8 and gpu.ray.address == "auto"
    assert gpu.data.source == "hf://cmrc2018:validation"
    # rag_eval scores the smoke run's adapter: the same data config, so the same held-out questions.
    rag, smoke = load_job(ROOT / "jobs" / "rag_eval.yaml"), load_job(ROOT / "jobs" / "cmrc_lora_smoke.yaml")
    assert rag.data == smoke.data and rag.model == smoke.model and rag.num_shards == smoke.num_shards
    assert rag.eval.adapter == "runs/cmrc_lora_smoke/train/adapter" and rag.eval.judge.enabled
    radit = load_job(ROOT / "jobs" / "radit.yaml")
    assert radit.data.retrieval_augment.enabled and radit.data.format == "qa_rows"
    assert Path(radit.data.source).is_absolute() and radit.data.source.endswith("financial_qa_10k.csv")
