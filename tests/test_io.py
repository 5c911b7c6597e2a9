"""The write helpers never leave a half-written file or folder where readers look."""

import pytest

from ray_ft.io import read_jsonl, staged_dir, write_jsonl_atomic, write_text_atomic


def test_staged_dir_replaces_the_old_folder_only_when_complete(tmp_path):
    out = tmp_path / "data"
    with staged_dir(out) as tmp:
        write_text_atomic(tmp / "a.txt", "first")
        assert not out.exists()  # nothing visible until the block completes
    assert (out / "a.txt").read_text() == "first"

    with staged_dir(out) as tmp:
        write_text_atomic(tmp / "b.txt", "second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged


def test_staged_dir_keeps_the_old_folder_and_cleans_up_when_the_block_fails(tmp_path):
    out = tmp_path / "data"
    with staged_dir(out) as tmp:
        write_text_atomic(tmp / "a.txt", "kept")
    with pytest.raises(ValueError, match="boom"):
        with staged_dir(out) as tmp:
            write_text_atomic(tmp / "partial.txt", "half")
            raise ValueError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folder left behind


def test_jsonl_round_trip_keeps_unicode(tmp_path):
    rows = [{"q": "什么是RAG？", "n": 1}, {"q": "second", "n": 2}]
    write_jsonl_atomic(tmp_path / "r.jsonl", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    assert "什么" in (tmp_path / "r.jsonl").read_text(encoding="utf-8")


def test_jsonl_round_trips_unicode_line_separators_and_names_a_bad_line(tmp_path):
    from ray_ft.data.sources import detect_format
    from ray_ft.errors import RayFTError

    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw; str.splitlines() would cut there.
    rows = [{"context": "one\u2028two\u0085three\x1cfour", "i": 0}, {"context": "plain", "i": 1}]
    path = tmp_path / "kb.jsonl"
    write_jsonl_atomic(path, rows)
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_jsonl(path) == rows

    path.write_text('{"a": 1}\r\n\n{"a": 2,}\n', encoding="utf-8")
    with pytest.raises(RayFTError, match=r"kb\.jsonl: line 3: invalid JSON"):
        read_jsonl(path)
    with pytest.raises(RayFTError, match=r"x\.jsonl: line 3: invalid JSON"):
        detect_format("x.jsonl", "\n\n{oops\n")
