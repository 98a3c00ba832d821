"""A single local file under a root on a local disk opens on the event loop, with the same
checks; anything that could block or take long still opens in a thread."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from loadwarden.producer.errors import SourceRefused, SourceUnavailable
from loadwarden.worker.config import SourcePolicy
from loadwarden.worker.sources import open_model
from loadwarden.worker.sources._ondisk import _roots
from tests.hung_mount import can_mount, hung_mount, tmpfs_mount

ROOT = Path(__file__).resolve().parent.parent


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to its threads."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
async def threads() -> AsyncIterator[CountingExecutor]:
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    yield executor
    executor.shutdown(wait=True)


def _copy(model: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.read_bytes())
    return path


def _signed_copy(model: Path, path: Path) -> Path:
    """A copy of ``model`` with a signature file beside it (its content is not read here)."""
    path.write_bytes(model.read_bytes())
    path.with_name(path.name + ".sig").write_bytes(b"{}")
    return path


async def _open(source: Path | str, root: Path, **policy: Any) -> tuple[str, int]:
    opened = await open_model(
        str(source), expected_sha256=None, policy=SourcePolicy(allow_roots=(root,), **policy)
    )
    with opened:
        return opened.first.path, len(opened.files)


async def test_a_file_under_a_local_root_opens_on_the_loop(
    small_model: Path, threads: CountingExecutor
) -> None:
    root = small_model.parent
    nested = _copy(small_model, root / "sub" / "nested.safetensors")
    assert await _open(small_model, root) == (str(small_model), 1)
    assert threads.submitted == 1  # the first open, in a thread, finds the root on a local disk
    for _ in range(3):
        assert await _open(small_model.name, root) == (str(small_model), 1)
    assert await _open("sub/nested.safetensors", root) == (str(nested), 1)
    assert threads.submitted == 1


async def test_folders_signatures_and_symlinks_still_open_in_a_thread(
    tmp_path: Path, small_model: Path, threads: CountingExecutor
) -> None:
    from tests.checkpoints import save_pretrained, state_dict

    root = small_model.parent
    await _open(small_model, root)
    folder = root / "ckpt"
    shards = save_pretrained(folder, state_dict(), 40_000)
    before = threads.submitted
    assert (await _open(folder, root))[1] == len(shards)
    assert threads.submitted == before + 1
    signed = _signed_copy(small_model, root / "signed.safetensors")
    opened = await open_model(
        str(signed), expected_sha256=None, policy=SourcePolicy(allow_roots=(root,))
    )
    with opened:
        assert opened.signature is not None  # read, in the thread
    assert threads.submitted == before + 2
    (root / "inside.safetensors").symlink_to(small_model.name)
    assert await _open("inside.safetensors", root) == (str(small_model), 1)
    assert threads.submitted == before + 3  # followed by the walk, which keeps it inside


async def test_refusals_are_the_thread_s(
    tmp_path: Path, small_model: Path, threads: CountingExecutor
) -> None:
    root = small_model.parent
    await _open(small_model, root)
    os.link(small_model, root / "linked.safetensors")
    (root / "out.safetensors").symlink_to(tmp_path.parent)
    before = threads.submitted
    with pytest.raises(SourceRefused) as caught:
        await _open(root / "linked.safetensors", root, refuse_hard_links=True)
    assert caught.value.code == "hard_link"
    with pytest.raises(SourceUnavailable) as missing:
        await _open("absent.safetensors", root)
    assert missing.value.code == "not_found"
    with pytest.raises(SourceRefused) as caught:
        await _open("/elsewhere/x.safetensors", root)
    assert caught.value.code == "outside_root"
    assert threads.submitted == before  # all three judged on the loop
    with pytest.raises(SourceRefused) as caught:
        await _open("out.safetensors", root)
    assert caught.value.code == "outside_root"
    with pytest.raises(SourceRefused) as caught:
        await _open("../x.safetensors", root)
    assert caught.value.code == "outside_root"
    assert threads.submitted == before + 2  # a symlink and a climb: the walk's


async def test_a_stale_root_or_a_changed_mount_table_goes_back_to_a_thread(
    tmp_path: Path, small_model: Path, threads: CountingExecutor
) -> None:
    """A root is learnt again once FRESH_S has passed (here: its time moved back), and every
    root is forgotten when anything is mounted or unmounted."""
    root = small_model.parent
    await _open(small_model, root)
    given = str(root)
    learnt = _roots.learnt[given]
    assert learnt is not None
    _roots.learnt[given] = dataclasses.replace(learnt, until=0.0)
    assert await _open(small_model, root) == (str(small_model), 1)
    assert threads.submitted == 2
    await _open(small_model, root)
    assert threads.submitted == 2
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs_mount(_copy(small_model, tmp_path / "mnt" / "x").parent):
        await _open(small_model, root)
        assert threads.submitted == 3
        await _open(small_model, root)
        assert threads.submitted == 3


def test_a_hung_mount_below_a_root_never_blocks_an_open_on_the_loop(tmp_path: Path) -> None:
    """A FUSE mount no daemon serves, as a folder on the path and as the signature beside a
    file: the open on the loop hands both to a thread without looking below the mount (where
    a look-up would wait for ever: shown first)."""
    if (why := can_mount()) is not None:
        pytest.skip(why)
    root = tmp_path / "models"
    (root / "hung").mkdir(parents=True)
    (root / "plain.safetensors").write_bytes(b"x")
    (root / "signed.safetensors").write_bytes(b"x")
    (root / "signed.safetensors.sig").write_bytes(b"")
    sources = ["hung/x.safetensors", "hung", "signed.safetensors", "plain.safetensors"]
    with hung_mount(root / "hung"), hung_mount(root / "signed.safetensors.sig", directory=False):
        stat_below = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.stat({str(root / 'hung' / 'x')!r})"]
        )
        with pytest.raises(subprocess.TimeoutExpired):
            stat_below.wait(timeout=1.0)  # the mount hangs: a plain look-up below it waits
        stat_below.kill()
        opener = subprocess.Popen(
            [sys.executable, "-m", "tests.hung_mount", str(root), *sources],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            out, _ = opener.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            opener.kill()
            opener.communicate()
            pytest.fail("an open on the loop waited on the hung mount")
    stat_below.wait(timeout=30)
    assert opener.returncode == 0
    assert out.splitlines() == [
        "hung/x.safetensors: thread",
        "hung: thread",
        "signed.safetensors: thread",
        "plain.safetensors: opened",
    ]
