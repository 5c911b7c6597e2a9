"""Names that become folders, files or Serve names cannot leave their root: every name field is
checked on load (one-line error naming the field, exit code 2), and every join of a name to a
root goes through `ray_ft.paths.inside`."""

import os

import pytest
import yaml

from ray_ft.errors import RayFTError
from ray_ft.paths import inside, name_problem
from tests.conftest import make_squad
from tests.test_cli import _assert_one_line, ray_ft

BAD_NAMES = {"traversal": "../../../../var/elsewhere", "absolute": "/etc/x", "empty": "", "too_long": "a" * 129,
             "odd_characters": "my job", "hidden": ".x", "separator": "a/b", "dots_inside": "a..b"}
ENDPOINT = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}


def _with(field: str, value: str) -> dict:
    """A job whose `field` carries `value` as the name."""
    job = {"name": "ok"}
    if field == "name":
        job["name"] = value
    elif field == "serve.models":
        job["serve"] = {"models": {value: "SmolLM2-135M-Instruct"}}
    elif field == "eval.adapters":
        job["eval"] = {"adapters": {value: "some/adapter"}}
    elif field == "eval.endpoints.0.label":
        job["eval"] = {"endpoints": [{"label": value, **ENDPOINT}]}
    elif field == "data.node_groups":
        job["data"] = {"node_groups": {value: {"kind": "passage"}, "passage": {"kind": "passage"}}}
    return job


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
@pytest.mark.parametrize("field", ["name", "serve.models", "eval.adapters", "eval.endpoints.0.label", "data.node_groups"])
def test_every_name_field_refuses_unsafe_names_naming_the_field(tmp_path, field, kind):
    from ray_ft.config import parse_job

    with pytest.raises(RayFTError) as err:
        parse_job(_with(field, BAD_NAMES[kind]), source="job.yaml")
    msg = str(err.value)
    assert msg.startswith(f"job.yaml: field '{field}': ") and "\n" not in msg, msg


def test_the_cli_refuses_a_traversing_job_name_with_exit_code_2_and_writes_nothing(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "../../../../var/elsewhere", "output_dir": str(tmp_path / "runs")}))
    code, _, err = ray_ft("prepare", str(job))
    _assert_one_line(code, err, "job.yaml: field 'name': '../../../../var/elsewhere' may not contain '..'")
    assert sorted(os.listdir(tmp_path)) == ["job.yaml"]


def test_inside_refuses_joins_that_leave_the_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    assert inside(root, "v1.2", "data") == root / "v1.2" / "data"
    for parts in (("..", "x"), ("/etc",), ("a", "..", "..", "x"), ("nodes", "../../x.jsonl")):
        with pytest.raises(RayFTError, match="outside"):
            inside(root, *parts)
    assert name_problem("v1.2-final_B") is None and name_problem("..") and name_problem("a" * 128) is None


@pytest.mark.slow
def test_a_legal_dotted_name_writes_only_under_output_dir_and_the_cache(tmp_path):
    src = make_squad(tmp_path / "qa.json", [(f"第{i}段：答案是词{i}。", [(f"q{i}", f"第{i}段的答案？", f"词{i}")])
                                             for i in range(8)])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "v1.2.x", "output_dir": str(tmp_path / "runs"),
                                   "data": {"source": str(src), "max_samples": 4, "cutoff_len": 256,
                                            "eval_size": 0.25, "num_shards": 1,
                                            "node_groups": {"p.1": {"kind": "passage"}, "passage": {"kind": "passage"}}},
                                   "ray": {"num_cpus": 2, "include_dashboard": False}}))
    before = set(os.listdir(tmp_path))
    code, out, err = ray_ft("prepare", str(job), cwd=tmp_path)
    assert code == 0, err
    assert set(os.listdir(tmp_path)) - before == {"runs"}
    written = [p for p in (tmp_path / "runs").rglob("*")]
    assert all(p.resolve().is_relative_to((tmp_path / "runs" / "v1.2.x").resolve()) for p in written if p.is_file())
    assert (tmp_path / "runs" / "v1.2.x" / "data" / "nodes" / "p.1.jsonl").is_file()
