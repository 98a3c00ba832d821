"""Source policy beyond paths: disguised addresses, pseudo-filesystems, hard links, roots."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadwarden.producer.errors import SourceRefused
from loadwarden.worker.config import Settings, SourcePolicy
from loadwarden.worker.sources import open_model, open_source
from loadwarden.worker.sources._fstype import pseudo_filesystem
from loadwarden.worker.sources._http import _check_address


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("2002:7f00:1::", id="6to4 of 127.0.0.1"),
        pytest.param("2002:a9fe:a9fe::1", id="6to4 of 169.254.169.254 (cloud metadata)"),
        pytest.param("2002:a00:1::", id="6to4 of 10.0.0.1"),
        pytest.param("fec0::1", id="site-local"),
        pytest.param("64:ff9b::7f00:1", id="NAT64 of 127.0.0.1"),
        pytest.param("::ffff:169.254.169.254", id="IPv4-mapped metadata"),
    ],
)
def test_disguised_private_addresses_are_refused(address: str) -> None:
    """An IPv6 address that embeds a private IPv4 address, or is site-local, is not public."""
    with pytest.raises(SourceRefused) as caught:
        _check_address("models.example", address, [])
    assert caught.value.code == "private_address"


@pytest.mark.parametrize("address", ["2606:4700::1111", "2002:808:808::", "8.8.8.8"])
def test_public_addresses_still_pass(address: str) -> None:
    """Global addresses, a 6to4 of a public IPv4 among them, are allowed."""
    _check_address("models.example", address, [])


async def test_a_6to4_url_is_refused_before_any_connection(tmp_path: Path) -> None:
    """A URL naming a 6to4 address of loopback is refused by the policy, not connected to."""
    policy = SourcePolicy(allow_hosts=("2002:7f00:1::",), cache_dir=tmp_path)
    with pytest.raises(SourceRefused) as caught:
        await open_source("http://[2002:7f00:1::]:8080/m.bin", expected_sha256=None, policy=policy)
    assert caught.value.code == "private_address"


def test_pseudo_filesystems_are_named_by_their_type() -> None:
    """fstatfs tells proc and sysfs from a real filesystem, whatever the path says."""
    for path, kind in (("/proc", "proc"), ("/sys", "sysfs"), (os.getcwd(), None)):
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        try:
            assert pseudo_filesystem(fd) == kind
        finally:
            os.close(fd)


@contextlib.contextmanager
def _bind_mounted(source: str, target: Path) -> Iterator[None]:
    target.mkdir()
    made = subprocess.run(
        ["mount", "--bind", source, str(target)], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"needs permission to bind-mount (root): {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


async def test_proc_under_an_innocent_path_is_refused_by_type(tmp_path: Path) -> None:
    """/proc bind-mounted inside an allowed root is refused: its f_type, not its path, tells."""
    root = tmp_path / "models"
    root.mkdir()
    with _bind_mounted("/proc", root / "p"), pytest.raises(SourceRefused) as caught:
        await open_source(
            str(root / "p" / "self" / "environ"),
            expected_sha256=None,
            policy=SourcePolicy(allow_roots=(root,)),
        )
    assert caught.value.code == "special_path"
    assert "proc filesystem" in caught.value.message


async def test_hard_links_are_refused_when_the_setting_says_so(tmp_path: Path) -> None:
    """With refuse_hard_links a file with two links is refused; by default it opens."""
    (tmp_path / "model.bin").write_bytes(b"model")
    os.link(tmp_path / "model.bin", tmp_path / "linked.bin")
    source = str(tmp_path / "linked.bin")
    with await open_source(
        source, expected_sha256=None, policy=SourcePolicy(allow_roots=(tmp_path,))
    ):
        pass
    strict = SourcePolicy(allow_roots=(tmp_path,), refuse_hard_links=True)
    with pytest.raises(SourceRefused) as caught:
        await open_source(source, expected_sha256=None, policy=strict)
    assert caught.value.code == "hard_link"


def test_allow_roots_path_list_is_one_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOADWARDEN_ALLOW_ROOTS=/a:/b sets sources.allow_roots for every user of Settings."""
    monkeypatch.setenv("LOADWARDEN_ALLOW_ROOTS", "/srv/a:/srv/b")
    monkeypatch.setenv("LOADWARDEN_SOURCES__ALLOW_ROOTS", '["/elsewhere"]')
    assert Settings().sources.allow_roots == (Path("/srv/a"), Path("/srv/b"))


SCRIPT = """
import asyncio, sys
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.load.supervisor import Supervisor
async def main():
    async with Supervisor() as sup:
        report = await sup.load(LoadRequest(source=sys.argv[1]))
    print(report.outcome)
asyncio.run(main())
"""


def test_in_process_supervisor_honours_allow_roots_and_logs_to_stderr(small_model: Path) -> None:
    """A library Supervisor reads LOADWARDEN_ALLOW_ROOTS and logs info+ to stderr only."""
    env = {**os.environ, "LOADWARDEN_ALLOW_ROOTS": str(small_model.parent)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(small_model)],
        capture_output=True,
        text=True,
        cwd="/",  # the default root would be "/": only the setting allows the model's folder
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"  # the program's own output, nothing else
    assert "job_finished" in done.stderr
    assert '"level": "debug"' not in done.stderr  # no debug lines by default
    refused = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(small_model)],
        capture_output=True,
        text=True,
        cwd="/",
        env={**env, "LOADWARDEN_ALLOW_ROOTS": "/nonexistent-root"},
        timeout=120,
        check=False,
    )
    assert refused.stdout == "refused\n"


async def test_hard_links_are_refused_in_a_checkpoint_folder(tmp_path: Path) -> None:
    """refuse_hard_links checks every shard of a folder checkpoint, not only single files."""
    from tests.checkpoints import save_pretrained, state_dict

    folder = tmp_path / "ckpt"
    shards = save_pretrained(folder, state_dict(), 40_000)
    os.link(folder / shards[-1], tmp_path / "elsewhere.safetensors")
    with await open_model(
        str(folder), expected_sha256=None, policy=SourcePolicy(allow_roots=(tmp_path,))
    ) as opened:
        assert len(opened.files) == len(shards)
    strict = SourcePolicy(allow_roots=(tmp_path,), refuse_hard_links=True)
    with pytest.raises(SourceRefused) as caught:
        await open_model(str(folder), expected_sha256=None, policy=strict)
    assert caught.value.code == "hard_link"
    assert shards[-1] in caught.value.message
