"""`ray-ft … JOB.yaml key=value`: overrides are validated like the file, name themselves in errors,
change the stage hashes and land in run_dir/config.resolved.yaml."""

import pytest
import yaml

from ray_ft.config import RESOLVED_FILE, load_job, write_resolved
from ray_ft.config.overrides import apply_overrides
from ray_ft.errors import RayFTError
from ray_ft.stages import stage_hashes
from tests.conftest import make_squad
from tests.test_cli import _assert_one_line, ray_ft


@pytest.fixture
def job(tmp_path):
    src = tmp_path / "qa.json"
    make_squad(src, [("Paris is in France.", [("q1", "Where is Paris?", "France")])])
    path = tmp_path / "job.yaml"
    path.write_text(f"name: o\noutput_dir: {tmp_path / 'runs'}\ndata:\n  source: qa.json\n"
                    "train:\n  learning_rate: 2.0e-4\n")
    return path


def test_an_override_sets_the_field_with_yaml_typed_values(job):
    cfg = load_job(job, ["train.learning_rate=1e-4", "eval.max_samples=20", "eval.modes=[gold]",
                         "serve.rerank.enabled=false", "model.system_prompt=Answer briefly."])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.eval.max_samples == 20 and cfg.eval.modes == ["gold"]
    assert cfg.model.system_prompt == "Answer briefly."
    assert load_job(job).train.learning_rate == pytest.approx(2e-4)  # the file itself is untouched
    # later overrides win
    assert load_job(job, ["eval.max_samples=3", "eval.max_samples=5"]).eval.max_samples == 5


@pytest.mark.parametrize("override, fragments", [
    ("train.lerning_rate=1e-4", ["override 'train.lerning_rate=1e-4'", "field 'train.lerning_rate': unknown key"]),
    ("train.learning_rate=fast", ["override 'train.learning_rate=fast'", "field 'train.learning_rate'",
                                  "valid number"]),
    ("eval.max_samples=-3", ["override 'eval.max_samples=-3'", "field 'eval.max_samples'"]),
    ("train.learning_rate.x=1", ["override 'train.learning_rate.x=1'", "'train.learning_rate' is a value"]),
    ("train.learning_rate", ["override 'train.learning_rate'", "expected dotted.key=value"]),
    ("eval.modes=[a", ["override 'eval.modes=[a'", "not valid YAML"]),
])
def test_a_bad_override_is_one_error_naming_it(job, override, fragments):
    with pytest.raises(RayFTError) as err:
        load_job(job, [override])
    for f in fragments:
        assert f in str(err.value)


def test_an_override_changes_the_hashes_of_its_stage_and_the_ones_after(job):
    base = stage_hashes(load_job(job))
    lr = stage_hashes(load_job(job, ["train.learning_rate=1e-4"]))
    assert lr["prepare"] == base["prepare"] and lr["train"] != base["train"] and lr["eval"] != base["eval"]
    same = stage_hashes(load_job(job, ["train.learning_rate=2.0e-4"]))  # the file's own value
    assert same == base


def test_the_resolved_config_reloads_to_the_same_config(job):
    cfg = load_job(job, ["eval.max_samples=7"])
    path = write_resolved(cfg)
    assert path == cfg.run_dir / RESOLVED_FILE
    assert yaml.safe_load(path.read_text())["eval"]["max_samples"] == 7
    assert load_job(path) == cfg


def test_apply_overrides_copies_the_parsed_file():
    data = {"train": {"learning_rate": 1.0}}
    assert apply_overrides(data, ["train.learning_rate=2"]) == {"train": {"learning_rate": 2}}
    assert data == {"train": {"learning_rate": 1.0}}
    assert apply_overrides({"eval": None}, ["eval.max_samples=3"]) == {"eval": {"max_samples": 3}}  # `eval:` left empty


def test_the_cli_takes_overrides_and_writes_the_resolved_config(job):
    code, _, err = ray_ft("prepare", str(job), "eval.max_samples=oops")
    _assert_one_line(code, err, "override 'eval.max_samples=oops'", "field 'eval.max_samples'")
    code, out, err = ray_ft("prepare", str(job), "data.dev_size=0", "eval.max_samples=4")
    assert code == 0, err
    resolved = yaml.safe_load((job.parent / "runs" / "o" / RESOLVED_FILE).read_text())
    assert resolved["data"]["dev_size"] == 0 and resolved["eval"]["max_samples"] == 4
