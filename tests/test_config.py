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


def test_the_renamed_eval_share_names_its_new_field():
    with pytest.raises(RayFTError, match=r"field 'data': data.val_size is now data.eval_size"):
        parse_job({"name": "x", "data": {"val_size": 0.2}})
    assert parse_job({"name": "x", "data": {"eval_size": 0.3}}).data.eval_size == 0.3
    assert parse_job({"name": "x", "embed": {"val_size": 0.1}}).embed.val_size == 0.1  # the embedder's dev split


def test_bad_value_names_field_and_reason():
    with pytest.raises(RayFTError, match=r"field 'data.eval_size': Input should be less than 1"):
        parse_job({"name": "x", "data": {"eval_size": 1.5}})
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
    with pytest.raises(RayFTError, match=r"metric_for_best=val_f1 needs a dev split \(data.dev_size > 0\)"):
        parse_job({"name": "x", "train": {"metric_for_best": "val_f1"}})
    with pytest.raises(RayFTError, match=r"early_stopping_patience needs a dev split"):
        parse_job({"name": "x", "train": {"early_stopping_patience": 2, "eval_every_n_steps": 5}})
    ok = parse_job({"name": "x", "data": {"dev_size": 0.1},
                    "train": {"metric_for_best": "val_f1", "early_stopping_patience": 2, "eval_every_n_steps": 5}})
    assert ok.train.metric_for_best == "val_f1"
    assert parse_job({"name": "x", "task": "embedding", "train": {"metric_for_best": "val_f1"}}).task == "embedding"
    with pytest.raises(RayFTError, match=r"serve.models name \['base'\] repeats an eval label"):
        parse_job({"name": "x", "serve": {"models": {"base": "/m"}}})
    ep = {"label": "m", "base_url": "https://api.example.com/v1", "model": "gpt-x", "api_key_env": "K"}
    with pytest.raises(RayFTError, match=r"serve.models name \['m'\] repeats an eval label"):
        parse_job({"name": "x", "serve": {"models": {"m": "/m"}}, "eval": {"endpoints": [ep]}})
    assert list(parse_job({"name": "x", "serve": {"models": {"merged": "/m"}}}).serve.models) == ["merged"]


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
    with pytest.raises(RayFTError, match=r"field 'data': packing_len=256 < cutoff_len=512: an example of cutoff_len"):
        parse_job({"name": "x", "data": {"cutoff_len": 512, "packing": True, "packing_len": 256}})
    # The retriever's default follows the data's language: no Chinese job retrieves with an English embedder.
    zh, en = parse_job({"name": "x"}), parse_job({"name": "x", "data": {"language": "en"}})
    assert zh.serve.retrieval.mode == en.serve.retrieval.mode == "auto"
    assert (zh.serve.retrieval_for("zh").mode, en.serve.retrieval_for("en").mode) == ("bm25", "dense")
    hybrid = parse_job({"name": "x", "serve": {"retrieval": {"mode": "hybrid"}}})
    assert hybrid.serve.retrieval_for("zh").mode == "hybrid"  # an explicit mode is kept
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
    assert {j.stem for j in jobs} >= {"cmrc_lora_smoke", "cmrc_lora", "financial_embed", "radit", "rag_eval"}
    for job in jobs:
        cfg = load_job(job)
        assert cfg.name == job.stem, job
    # The seed recipe: a 7B chat model, CMRC2018 train -> test, LLaMA-Factory's LoRA settings, ZeRO-2 on 8 GPUs.
    gpu = load_job(ROOT / "jobs" / "cmrc_lora.yaml")
    assert gpu.train.use_gpu and gpu.train.num_workers == 8 and gpu.ray.address == "auto"
    assert gpu.model.name == "Qwen/Qwen2.5-7B-Instruct" and gpu.train.deepspeed.stage == 2
    assert (gpu.data.source, gpu.eval.source) == ("hf://cmrc2018:train", "hf://cmrc2018:test")
    t, d = gpu.train, gpu.data
    assert (t.learning_rate, d.cutoff_len, d.max_samples, d.dev_size, t.per_device_train_batch_size,
            t.num_train_epochs, t.lora_rank, t.lora_alpha, t.lora_target) == (1e-4, 5120, 20000, 0.01, 2, 2, 8, 16, "all")
    from ray_ft.served import finetuned_served_as

    assert finetuned_served_as(gpu) == "unmerged" and gpu.serve.retrieval_for(d.language).mode == "bm25"
    # The same experiment sized for 2 CPU cores: every training question, all 652 held-out ones.
    full = load_job(ROOT / "jobs" / "cmrc_full_cpu.yaml")
    assert full.data.max_samples is None and full.eval.max_samples == 652 and full.eval.source is None
    assert full.data.eval_size == 0.2 and full.data.seed == 42 and full.data.packing_len == 2048 and full.data.cutoff_len == 448
    assert finetuned_served_as(full) == "merged" and full.serve.retrieval_for(full.data.language).mode == "bm25"
    # rag_eval scores the smoke run's adapter: the same data config, so the same held-out questions.
    rag, smoke = load_job(ROOT / "jobs" / "rag_eval.yaml"), load_job(ROOT / "jobs" / "cmrc_lora_smoke.yaml")
    assert rag.data == smoke.data and rag.model == smoke.model and rag.num_shards == smoke.num_shards
    assert rag.eval.adapter == "runs/cmrc_lora_smoke/train/adapter" and rag.eval.judge.enabled
    # docs_radit: the shipped documents, written into QA pairs by the packaged 0.5B writer.
    docs = load_job(ROOT / "jobs" / "docs_radit.yaml")
    assert docs.data.documents == [str(ROOT / "jobs" / "documents")] and docs.data.retrieval_augment.enabled
    assert docs.data.qa_generation.model == "Qwen2.5-Coder-0.5B-Instruct" and docs.data.max_samples is None
    # radit: one job fine-tunes the embedder, then builds its SFT data and serves with it.
    radit = load_job(ROOT / "jobs" / "radit.yaml")
    assert radit.data.retrieval_augment.enabled and radit.data.format == "qa_rows" and radit.embed.enabled
    assert Path(radit.data.source).is_absolute() and radit.data.source.endswith("financial_qa_10k.csv")
    assert radit.data.retrieval_augment.embedder == radit.serve.embedder == "runs/radit/embed/model"
    assert radit.serve.retrieval.query_instruction == radit.embed.query_instruction != ""
    # cmrc_dpo tunes the smoke job's merged SFT on the pairs `ray-ft pairs` writes from it, and is
    # evaluated on the smoke job's held-out questions.
    dpo = load_job(ROOT / "jobs" / "cmrc_dpo.yaml")
    assert dpo.train.method == "dpo" and smoke.train.export_merged
    assert dpo.model.name == f"runs/{smoke.name}/train/merged"
    assert dpo.train.preference.source == str(ROOT / "runs" / smoke.name / "pairs" / "pairs.jsonl")
    assert {k: getattr(dpo.data, k) for k in ("source", "eval_size", "seed", "language")} == \
        {k: getattr(smoke.data, k) for k in ("source", "eval_size", "seed", "language")}
    # financial_embed's embedder recipe is the one radit runs as its first stage.
    fin = load_job(ROOT / "jobs" / "financial_embed.yaml").embed
    keys = {"model", "source", "seed", "test_size", "neg_num", "query_instruction", "learning_rate", "max_steps"}
    assert {k: getattr(radit.embed, k) for k in keys} == {k: getattr(fin, k) for k in keys}
    # financial_lsr and radit_full run that recipe, then LSR from it; radit_full serves the LSR
    # embedder and its own reranker and evaluates with and without it.
    lsr = load_job(ROOT / "jobs" / "financial_lsr.yaml")
    assert {k: getattr(lsr.embed, k) for k in keys} == {k: getattr(fin, k) for k in keys}
    assert lsr.embed.lsr.enabled and lsr.embed.lsr.start_from == "contrastive" and lsr.task == "embedding"
    full = load_job(ROOT / "jobs" / "radit_full.yaml")
    assert {k: getattr(full.embed, k) for k in keys} == {k: getattr(fin, k) for k in keys}
    assert full.serve.embedder == full.data.retrieval_augment.embedder == "runs/radit_full/embed/lsr/model"
    assert full.served_reranker == full.finetuned_reranker_dir and "reranked" in full.eval.modes


def test_lsr_runs_in_the_embed_stage_only():
    with pytest.raises(RayFTError, match="embed.lsr.enabled runs in the embed stage"):
        parse_job({"name": "x", "embed": {"lsr": {"enabled": True}}})
    with pytest.raises(RayFTError, match="embed.lsr.lm_temperature"):
        parse_job({"name": "x", "task": "embedding", "embed": {"lsr": {"enabled": True, "lm_temperature": 0}}})
    cfg = parse_job({"name": "x", "task": "embedding", "output_dir": "o", "embed": {"lsr": {"enabled": True}}})
    assert cfg.finetuned_embedder_dir == str(Path("o") / "x" / "embed" / "lsr" / "model")


def test_embed_enabled_wires_the_fine_tuned_embedder_into_serving_and_retrieval_data():
    cfg = parse_job({"name": "x", "output_dir": "out", "embed": {"enabled": True, "query_instruction": "Q: "},
                     "data": {"retrieval_augment": {"enabled": True}}})
    own = str(Path("out") / "x" / "embed" / "model")
    assert cfg.finetuned_embedder_dir == own
    assert cfg.serve.embedder == own and cfg.data.retrieval_augment.embedder == own
    assert cfg.serve.retrieval.query_instruction == "Q: " and cfg.data.retrieval_augment.query_instruction == "Q: "
    # An instruction given where it is used wins; the worker's re-validation of the dump agrees.
    given = parse_job({"name": "x", "output_dir": "out", "embed": {"enabled": True},
                       "serve": {"retrieval": {"query_instruction": ""}}})
    assert given.serve.retrieval.query_instruction == "" and given.serve.embedder == own
    assert JobConfig.model_validate(given.model_dump()) == given
    # Without embed.enabled nothing moves.
    plain = parse_job({"name": "x"})
    assert plain.serve.embedder == "all-MiniLM-L6-v2" and plain.serve.retrieval.query_instruction == ""


@pytest.mark.parametrize("job, message", [
    ({"serve": {"embedder": "all-MiniLM-L6-v2"}}, r"serve.embedder=all-MiniLM-L6-v2: with embed.enabled the job uses "
                                                  r"the embedder it fine-tunes \(out/x/embed/model\); remove serve.embedder"),
    ({"data": {"retrieval_augment": {"enabled": True, "embedder": "m"}}}, r"remove data.retrieval_augment.embedder"),
    ({"task": "embedding"}, r"embed.enabled is for task: sft"),
])
def test_embed_enabled_refuses_a_second_embedder(job, message):
    with pytest.raises(RayFTError, match=message):
        parse_job({"name": "x", "output_dir": "out", "embed": {"enabled": True}, **job})


def test_serve_models_names_must_be_free():
    with pytest.raises(RayFTError, match=r"serve.models name \['x'\] is already the served name"):
        parse_job({"name": "x", "serve": {"models": {"x": "some/folder"}}})
    with pytest.raises(RayFTError, match=r"serve.models name \['SmolLM2-135M-Instruct'\]"):
        parse_job({"name": "x", "serve": {"models": {"SmolLM2-135M-Instruct": "f"}}})
    assert parse_job({"name": "x", "serve": {"models": {"merged": "f"}}}).serve.models == {"merged": "f"}


def test_documents_replace_the_source_and_survive_a_round_trip(tmp_path):
    (tmp_path / "docs").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text("name: d\ndata:\n  documents: [docs]\n  qa_generation: {questions_per_node: 3}\n")
    cfg = load_job(job)
    assert cfg.data.documents == [str(tmp_path / "docs")]
    # a Ray Train worker re-validates the dumped config: every field is "set" there
    assert JobConfig.model_validate(cfg.model_dump()).data.documents == cfg.data.documents
    for data, message in (({"documents": ["d"], "source": "x.csv"}, "data.source and data.documents"),
                          ({"documents": ["d"], "format": "alpaca"}, "data.format must be auto or qa_rows"),
                          ({"qa_generation": {"question_prompt": "{context}"}}, "question_prompt must use exactly")):
        with pytest.raises(RayFTError, match=message):
            parse_job({"name": "d", "data": data})


def test_serving_reads_its_own_use_gpu_and_falls_back_to_trainings():
    from ray_ft.served import finetuned_served_as

    assert parse_job({"name": "x", "train": {"use_gpu": True}}).serve_on_gpu
    cpu_serving = parse_job({"name": "x", "train": {"use_gpu": True}, "serve": {"use_gpu": False}})
    assert not cpu_serving.serve_on_gpu and finetuned_served_as(cpu_serving) == "merged"
    gpu_serving = parse_job({"name": "x", "serve": {"use_gpu": True}})
    assert gpu_serving.serve_on_gpu and not gpu_serving.train.use_gpu and finetuned_served_as(gpu_serving) == "unmerged"


def test_serving_a_reranker_needs_one_to_serve(tmp_path):
    from ray_ft.errors import RayFTError
    from ray_ft.served import served_reranker

    with pytest.raises(RayFTError, match="serve.rerank.enabled: give serve.rerank.model, or set rerank.enabled"):
        parse_job({"name": "r", "serve": {"rerank": {"enabled": True}}})
    own = parse_job({"name": "r", "output_dir": str(tmp_path), "rerank": {"enabled": True},
                     "serve": {"rerank": {"enabled": True}}})
    assert own.served_reranker == str(tmp_path / "r" / "rerank" / "model") and own.trains_reranker
    with pytest.raises(RayFTError, match="is not trained yet"):  # before anything is deployed
        served_reranker(own)
    (tmp_path / "r" / "rerank" / "model").mkdir(parents=True)
    (tmp_path / "r" / "rerank" / "model" / "config.json").write_text("{}")
    assert served_reranker(own) == str((tmp_path / "r" / "rerank" / "model").resolve())
    assert served_reranker(parse_job({"name": "r", "rerank": {"enabled": True}})) is None  # trained, not served
    assert parse_job({"name": "r", "task": "rerank"}).trains_reranker


def test_the_configuration_reference_is_generated_from_the_config_tree():
    """docs/CONFIG.md is what `python -m ray_ft.config.reference` prints: every field of every
    section, with its type, default and description (regenerate it after changing a field)."""
    from ray_ft.config.reference import markdown, sections

    text = markdown()
    assert (ROOT / "docs" / "CONFIG.md").read_text() == text, "run: python -m ray_ft.config.reference > docs/CONFIG.md"
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    leaves = {f"{path}{name}" for path, model in sections(JobConfig) for name, field in model.model_fields.items()
              if not (isinstance(field.annotation, type) and issubclass(field.annotation, JobConfig.__base__))}
    assert leaves <= rows and len(rows) > 300
    assert "| `serve.knowledge_base.fts_tokenizer` | `auto` \\| `words` \\| `cjk` \\| `ngram` | `\"auto\"` |" in text
    assert "| `train.lora_rank` | int | `8` |" in text
