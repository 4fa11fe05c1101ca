"""Folders the project writes are recognised by its marker; nothing else is ever deleted or replaced, and one
job at a time holds an output folder (a kernel lock, released however the holder ends)."""

import os
import signal
import subprocess
import sys

import pytest

from megatron_moca import ownership
from megatron_moca.errors import UserError
from megatron_moca.run_lock import exclusive, lock_path


def user_file(folder, name="notes.txt", text="mine"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_claim_takes_new_empty_and_own_folders_and_refuses_anything_else(tmp_path):
    new, empty, other = str(tmp_path / "new"), str(tmp_path / "empty"), str(tmp_path / "other")
    os.makedirs(empty)
    assert ownership.claim(new, "moca test") is False and ownership.is_ours(new)
    assert ownership.claim(empty, "moca test") is False and ownership.is_ours(empty)
    assert ownership.claim(new, "moca test") is True  # ours already: taken as it is
    mine = user_file(other)
    with pytest.raises(UserError, match=r"--output .*/other: holds files megatron_moca did not write \('notes.txt'\)"):
        ownership.claim(other, "moca test")
    assert sorted(os.listdir(other)) == ["notes.txt"] and open(mine).read() == "mine"
    with pytest.raises(UserError, match="exists and is not a directory"):
        ownership.claim(mine, "moca test")
    # a folder holding only our (stale) lock file is still empty
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ownership.LOCK).write_text("{}")
    assert ownership.claim(str(stale), "moca test") is False
    # create=False checks without writing
    fresh = str(tmp_path / "fresh")
    assert ownership.claim(fresh, "moca test", create=False) is False and not os.path.exists(fresh)
    with pytest.raises(UserError):
        ownership.claim(other, "moca test", create=False)


def test_legacy_folders_are_recognised_by_their_content_only(tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "latest_checkpointed_iteration.txt").write_text("2")
    assert ownership.claim(str(old), "moca pretrain",
                           legacy=lambda f: os.path.isfile(os.path.join(f, "latest_checkpointed_iteration.txt")))
    assert ownership.is_ours(str(old))


def test_publish_replaces_only_a_folder_of_ours_with_nothing_foreign_in_it(tmp_path):
    final = str(tmp_path / "out")
    staging = ownership.staging(final, "moca test")
    user_file(staging, "results.json", "1")
    ownership.publish(staging, final)
    assert ownership.read_marker(final)["entries"] == ["results.json"] and not os.path.exists(staging)
    again = ownership.staging(final, "moca test")  # a rerun replaces our own output
    user_file(again, "results.json", "2")
    ownership.publish(again, final)
    assert open(os.path.join(final, "results.json")).read() == "2"
    mine = user_file(final, "my_notes.md")  # a file the user put into our folder afterwards
    third = ownership.staging(final, "moca test")
    with pytest.raises(UserError, match="holds 'my_notes.md', which megatron_moca did not write there"):
        ownership.publish(third, final)
    assert open(mine).read() == "mine" and open(os.path.join(final, "results.json")).read() == "2"
    with pytest.raises(UserError, match="holds 'my_notes.md'"):
        ownership.remove_ours(final)
    assert os.path.isfile(mine)


def test_a_staging_folder_of_someone_else_is_never_cleared(tmp_path):
    final = str(tmp_path / "out")
    theirs = str(tmp_path / ".out.partial")  # a user's folder that happens to have the staging name
    mine = user_file(theirs)
    with pytest.raises(UserError, match="was not written by megatron_moca"):
        ownership.staging(final, "moca test")
    assert open(mine).read() == "mine"
    link = str(tmp_path / "link")
    os.symlink(theirs, link)
    with pytest.raises(UserError):
        ownership.remove_ours(link)  # a symbolic link is never followed
    assert os.path.isfile(mine)


def test_staged_block_publishes_on_success_and_cleans_up_on_failure(tmp_path):
    final = str(tmp_path / "set")
    with pytest.raises(RuntimeError):
        with ownership.staged(final, "moca test") as folder:
            user_file(folder, "half.txt")
            raise RuntimeError("cut short")
    assert sorted(os.listdir(tmp_path)) == []  # no staging folder, no output, no lock file left
    with ownership.staged(final, "moca test") as folder:
        user_file(folder, "whole.txt")
    assert sorted(os.listdir(tmp_path)) == ["set"]
    assert sorted(os.listdir(final)) == sorted([ownership.MARKER, "whole.txt"])


HOLDER = """
import sys, time
from megatron_moca.run_lock import acquire
acquire(sys.argv[1], "moca holder")
print("held", flush=True)
time.sleep(120)
"""


def test_one_writer_per_folder_and_a_killed_holder_leaves_no_obstacle(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            with exclusive(folder, "moca pretrain"):
                pass
        assert f"{folder} is in use by moca holder (pid {holder.pid} on " in str(err.value)
        assert "one job writes a folder at a time" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert os.path.isfile(lock_path(folder))  # the killed holder's file is still there ...
    with exclusive(folder, "moca pretrain"):  # ... but the kernel released its lock: taken at once
        assert "moca pretrain" in open(lock_path(folder)).read()
    assert os.listdir(folder) == []  # the lock file is removed on release
    fresh = str(tmp_path / "fresh")
    with exclusive(fresh, "moca pretrain"):
        assert os.path.isdir(fresh)
    assert not os.path.exists(fresh)  # the lock made the folder and nothing was written in it: removed again


def test_a_beside_lock_leaves_the_parent_as_it_was(tmp_path):
    before = sorted(os.listdir(tmp_path))
    with exclusive(str(tmp_path / "out"), "moca eval", beside=True):
        assert os.path.isfile(lock_path(str(tmp_path / "out"), beside=True))
        with pytest.raises(UserError, match="in use by moca eval"):
            with exclusive(str(tmp_path / "out"), "moca eval", beside=True):
                pass
    assert sorted(os.listdir(tmp_path)) == before
