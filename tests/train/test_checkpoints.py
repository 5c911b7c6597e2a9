"""A checkpoint's files are checked against the hashes written with them."""

import json

from ray_ft.train.checkpoints import FILES_PREFIX, checkpoint_problems, write_file_hashes


def _checkpoint(folder):
    (folder / "export").mkdir(parents=True)
    (folder / "export" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "loop_state.json").write_text(json.dumps({"step": 4}))
    write_file_hashes(folder, 0)
    return folder


def test_a_whole_checkpoint_has_no_problems_and_lists_every_file(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    table = json.loads((ckpt / f"{FILES_PREFIX}0.json").read_text())
    assert sorted(table) == ["export/adapter_model.safetensors", "loop_state.json"]
    assert table["export/adapter_model.safetensors"][0] == 10240
    assert checkpoint_problems(ckpt) == []
    assert checkpoint_problems(tmp_path) == []  # no hashes recorded (older ray_ft): trusted


def test_truncated_changed_and_missing_files_are_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "a")
    weights = ckpt / "export" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert checkpoint_problems(ckpt) == ["export/adapter_model.safetensors: 5000 bytes, 10240 written"]

    ckpt = _checkpoint(tmp_path / "b")
    weights = ckpt / "export" / "adapter_model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[100] ^= 1
    weights.write_bytes(bytes(flipped))
    (ckpt / "loop_state.json").unlink()
    assert checkpoint_problems(ckpt) == ["export/adapter_model.safetensors: sha256 differs from the one written",
                                         "loop_state.json: missing"]

    ckpt = _checkpoint(tmp_path / "c")
    (ckpt / f"{FILES_PREFIX}0.json").write_text('{"export/adapter_model.safet')
    (problem,) = checkpoint_problems(ckpt)
    assert problem.startswith(f"{FILES_PREFIX}0.json: unreadable")
