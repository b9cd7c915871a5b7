"""``atomic.replace_folder``: a complete folder under the final name, or back under it, whatever happens."""

from __future__ import annotations

import os

import pytest

from deltatune import atomic


def folder(path, text: str):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def test_a_new_folder_goes_in_place_and_an_old_one_is_replaced(tmp_path):
    final, aside = tmp_path / "out", tmp_path / ".out.old"
    atomic.replace_folder(folder(tmp_path / "one", "1"), final, aside)
    assert (final / "file.txt").read_text() == "1"
    atomic.replace_folder(folder(tmp_path / "two", "2"), final, aside)
    assert (final / "file.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_aside_from_a_killed_swap_does_not_stop_the_next(tmp_path):
    final, aside = folder(tmp_path / "out", "old"), folder(tmp_path / ".out.old", "older")
    atomic.replace_folder(folder(tmp_path / "new", "new"), final, aside)
    assert (final / "file.txt").read_text() == "new" and not aside.exists()


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyboardInterrupt()])
def test_a_swap_that_fails_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch, error):
    final, aside, new = folder(tmp_path / "out", "old"), tmp_path / ".out.old", folder(tmp_path / "new", "new")
    real, calls = os.replace, []

    def replace(source, target):
        calls.append((source, target))
        if len(calls) == 2:
            raise error
        real(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(type(error)):
        atomic.replace_folder(new, final, aside)
    assert (final / "file.txt").read_text() == "old" and not aside.exists()
    assert (new / "file.txt").read_text() == "new"  # the caller still holds what it wrote
