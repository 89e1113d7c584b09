"""slimsd.io: a failed or killed writer never leaves half a file or folder under the final name."""

from __future__ import annotations

import pytest

from slimsd.io import atomic_dir, atomic_path, atomic_write_text


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_a_failed_writer_keeps_the_old_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    d = tmp_path / "pipe"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
        assert not d.exists()  # nothing under the final name until the block succeeds
    assert (d / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(x.name for x in d.iterdir()) == ["a"] and [x.name for x in tmp_path.iterdir()] == ["pipe"]
    with atomic_dir(d) as tmp:  # a second successful write replaces the folder whole
        (tmp / "c").write_text("3")
    assert sorted(x.name for x in d.iterdir()) == ["c"]
