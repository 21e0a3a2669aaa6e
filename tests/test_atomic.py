"""Single-file writes through a renamed sibling, and the lock of an output (rfreport.atomic)."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from rfreport import atomic
from rfreport.errors import OutputError


def test_a_write_creates_folders_keeps_permissions_and_follows_a_link(tmp_path):
    page = tmp_path / "a" / "b" / "page.html"
    assert atomic.write_file(page, "one") == page and page.read_text() == "one"
    page.chmod(0o600)
    atomic.write_file(page, b"two")
    assert page.read_bytes() == b"two" and page.stat().st_mode & 0o777 == 0o600
    link = tmp_path / "link.html"
    link.symlink_to(page)
    atomic.write_file(link, "three")
    assert link.is_symlink() and page.read_text() == "three"
    assert sorted(p.name for p in page.parent.iterdir()) == ["page.html"]


def test_an_interrupted_write_leaves_the_previous_file_and_no_partial(tmp_path, monkeypatch):
    page = tmp_path / "page.html"
    page.write_text("previous")

    def interrupted(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_file(page, "new")
    monkeypatch.undo()
    assert page.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_a_folder_in_the_way_is_one_line(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match=r"out\.json: cannot write \(Is a directory\); nothing was written$"):
        atomic.write_file(tmp_path / "out.json", "{}")


def test_a_file_where_a_parent_folder_should_be_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"x\.xml: cannot write \(.*afile is a file, not a folder\); nothing was "
                                          r"written$"):
        atomic.write_file(tmp_path / "afile" / "x.xml", "<x/>")


def test_the_lock_holds_on_a_full_disk_where_its_holder_cannot_be_written(tmp_path, monkeypatch):
    """A full disk refuses the holder's line; the lock itself still holds, and nothing is left when released."""
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with atomic.locked(tmp_path / "run"):
        assert (tmp_path / ".run.lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_held_lock_is_refused_naming_its_holder_and_removed_when_released(tmp_path):
    target = tmp_path / "run"
    with atomic.locked(target):
        assert f"pid {os.getpid()} since" in (tmp_path / ".run.lock").read_text()
        with pytest.raises(OutputError, match=rf"^{target}: another rfreport process \(host \S+ pid {os.getpid()} "), \
                atomic.locked(target):
            pass
    assert list(tmp_path.iterdir()) == []
    with atomic.locked(target):   # free again
        pass


def test_a_lock_file_removed_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    target, real, calls = tmp_path / "run", fcntl.flock, []

    def lock_after_the_holder_left(fd, operation):
        if not calls:   # the previous holder removes its file just after we opened it
            (tmp_path / ".run.lock").unlink()
        calls.append(fd)
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", lock_after_the_holder_left)
    with atomic.locked(target):
        assert len(calls) == 2 and (tmp_path / ".run.lock").is_file()
