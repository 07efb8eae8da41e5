import pytest

from lmforge.weights.atomic import atomic_dir, staging_dir


def _files(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_new_directory_appears_whole_and_the_staging_one_is_gone(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_dir(out, durable=True) as tmp:
        (tmp / "x").write_text("1")
        assert not out.exists()
    assert _files(out) == {"x": "1"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_replace_swaps_the_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("0")
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert _files(out) == {"x": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_update_replaces_files_one_by_one_and_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("0")
    (out / "README").write_text("mine")
    with atomic_dir(out, existing="update") as tmp:
        (tmp / "x").write_text("1")
    assert _files(out) == {"x": "1", "README": "mine"}


def test_keep_leaves_a_directory_another_process_finished_first(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, existing="keep") as tmp:
        (tmp / "x").write_text("mine")
        out.mkdir()
        (out / "x").write_text("theirs")
    assert _files(out) == {"x": "theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("keep_on_error", [False, True])
def test_an_error_leaves_the_target_as_it_was(tmp_path, keep_on_error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("0")
    with pytest.raises(OSError, match="disk full"), atomic_dir(out, keep_on_error=keep_on_error) as tmp:
        (tmp / "x").write_text("half")
        raise OSError("disk full")
    assert _files(out) == {"x": "0"}
    assert staging_dir(out).exists() == keep_on_error
    with atomic_dir(out) as tmp:  # a leftover staging directory is started afresh
        assert list(tmp.iterdir()) == []


def test_shared_staging_name_is_the_same_in_every_process(tmp_path):
    assert staging_dir(tmp_path / "step-1", shared=True).name == ".step-1.tmp"
    assert staging_dir(tmp_path / "step-1").name.startswith(".step-1.tmp-")
