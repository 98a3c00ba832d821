"""A single local file under a root on a local disk opens on the event loop, with the same
checks; anything that could block or take long still opens in a thread."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from loadwarden.producer.errors import SourceRefused, SourceUnavailable
from loadwarden.worker.config import SourcePolicy
from loadwarden.worker.sources import open_model
from loadwarden.worker.sources._ondisk import local_roots


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
    assert await _open(small_model, root) == (str(small_model), 1)
    assert threads.submitted == 1  # the first open, in a thread, finds the root on a local disk
    for _ in range(3):
        assert await _open(small_model.name, root) == (str(small_model), 1)
    assert threads.submitted == 1


async def test_folders_and_signatures_still_open_in_a_thread(
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


async def test_refusals_on_the_loop_are_the_thread_s(
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
    with pytest.raises(SourceRefused) as caught:
        await _open("out.safetensors", root)
    assert caught.value.code == "outside_root"
    with pytest.raises(SourceUnavailable) as missing:
        await _open("absent.safetensors", root)
    assert missing.value.code == "not_found"
    assert threads.submitted == before


async def test_a_root_on_another_device_than_noted_goes_back_to_a_thread(
    small_model: Path, threads: CountingExecutor
) -> None:
    """A root remounted since it was noted (here: noted with a device it is not on) is opened
    in a thread, which notes it again."""
    root = small_model.parent
    await _open(small_model, root)
    local_roots[str(root)] = -1
    assert await _open(small_model, root) == (str(small_model), 1)
    assert threads.submitted == 2
    assert local_roots[str(root)] == os.stat(root).st_dev
    await _open(small_model, root)
    assert threads.submitted == 2
