"""atomic_path / atomic_write: the whole new content or the old one, never half, and no temporary left."""

import pytest

from finetune_recipes.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    atomic_write(target, "new")
    atomic_write(tmp_path / "image.png", b"\x89PNG")
    assert target.read_text() == "new"
    assert (tmp_path / "image.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "results.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "cache") as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_folder_another_process_wrote_first_stays(tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    (folder / "vectors.safetensors").write_text("first")
    with atomic_path(folder, per_process=True) as tmp:
        tmp.mkdir()
        (tmp / "vectors.safetensors").write_text("second")
    assert (folder / "vectors.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors"]
    with pytest.raises(OSError), atomic_path(folder) as tmp:  # not a cache: the clash is an error
        tmp.mkdir()
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors"]
