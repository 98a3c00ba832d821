"""Sources: local paths confined to their roots; downloads checked, pinned, capped and cached."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from loadwarden.producer.errors import InvalidModel, LoadError, SourceRefused, SourceUnavailable
from loadwarden.worker import sources
from loadwarden.worker._files import ModelFile
from loadwarden.worker.config import Settings, SourcePolicy
from loadwarden.worker.sources import open_source
from loadwarden.worker.sources._cache import PARTIAL_PREFIX
from tests.conftest import eventually

BODY = bytes(range(256)) * 64  # 16 KiB, several reads' worth
BODY_SHA = hashlib.sha256(BODY).hexdigest()
#: The trickling route sends one byte this often (well inside every read timeout).
TRICKLE_GAP_S = 0.2
#: How long any open of a local path may take: it never waits on anything.
QUICK_S = 5.0


def read_all(model: ModelFile) -> bytes:
    return os.pread(model.fd, model.size + 1, 0)


# --- local paths ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` with ``model.bin`` and ``sub/inner.bin``; ``outside/secret.bin`` next to it."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "model.bin").write_bytes(b"model")
    (root / "sub" / "inner.bin").write_bytes(b"inner")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(b"secret")
    return root


@pytest.fixture
def open_quickly(tree: Path) -> Iterator[Callable[..., ModelFile]]:
    """Run open_source in a thread and fail if it does not answer within QUICK_S.

    If an open ever did block on a FIFO, teardown opens every FIFO in the tree for
    writing so the stuck reader returns and the thread can be joined.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def run(source: str, policy: SourcePolicy) -> ModelFile:
        call = open_source(source, expected_sha256=None, policy=policy)
        return pool.submit(asyncio.run, call).result(timeout=QUICK_S)

    yield run
    for folder, _, names in os.walk(tree):
        for name in names:
            path = os.path.join(folder, name)
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                with contextlib.suppress(OSError):  # ENXIO: no reader waits, as it should be
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    pool.shutdown(wait=True)


def _symlink(link: Path, target: str | Path) -> str:
    link.symlink_to(target)
    return link.name


def _fifo(root: Path) -> str:
    os.mkfifo(root / "pipe")
    return "pipe"


def _socket(root: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    return "sock"


def _device(root: Path) -> str:
    try:  # the same device numbers as /dev/zero
        os.mknod(root / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    return "zero"


def _loop(root: Path) -> str:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    return "a"


REFUSED: dict[str, tuple[Callable[[Path], str], str]] = {
    "symlink out of the root": (
        lambda root: _symlink(root / "leak", root.parent / "outside" / "secret.bin"),
        "outside_root",
    ),
    "relative symlink out of the root": (
        lambda root: _symlink(root / "leak", "../outside/secret.bin"),
        "outside_root",
    ),
    "directory symlink out of the root": (
        lambda root: _symlink(root / "away", root.parent / "outside") + "/secret.bin",
        "outside_root",
    ),
    "dot-dot escape": (lambda root: "sub/../../outside/secret.bin", "outside_root"),
    "absolute path outside the roots": (
        lambda root: str(root.parent / "outside" / "secret.bin"),
        "outside_root",
    ),
    "absolute path with dot-dot": (
        lambda root: f"{root}/../outside/secret.bin",
        "outside_root",
    ),
    "fifo": (_fifo, "not_regular_file"),
    "socket": (_socket, "not_regular_file"),
    "character device": (_device, "not_regular_file"),
    "directory": (lambda root: "sub", "not_regular_file"),
    "the root itself": (lambda root: ".", "not_regular_file"),
    "symlink loop": (_loop, "symlink_loop"),
    "/proc/self/environ": (lambda root: "/proc/self/environ", "special_path"),
    "/dev/zero": (lambda root: "/dev/zero", "special_path"),
}


@pytest.mark.parametrize(("make", "code"), REFUSED.values(), ids=list(REFUSED))
def test_hostile_local_paths_are_refused_without_blocking(
    tree: Path, open_quickly: Callable[..., ModelFile], make: Callable[[Path], str], code: str
) -> None:
    """Escapes and non-regular files are refused, with their code, before anything can block."""
    source = make(tree)
    started = time.monotonic()
    with pytest.raises(SourceRefused) as caught:
        open_quickly(source, SourcePolicy(allow_roots=(tree,)))
    assert caught.value.code == code
    assert time.monotonic() - started < QUICK_S


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda root: "/proc/self/environ", id="path"),
        pytest.param(lambda root: _symlink(root / "env", "/proc/self/environ"), id="symlink"),
        pytest.param(lambda root: _symlink(root / "proc", "/proc") + "/self/environ", id="dir"),
    ],
)
def test_special_trees_are_refused_even_inside_a_root(
    tree: Path, open_quickly: Callable[..., ModelFile], make: Callable[[Path], str]
) -> None:
    """With "/" as a root, /proc is still refused, by name or through a symlink."""
    source = make(tree)
    if not source.startswith("/"):
        source = str(tree / source)
    with pytest.raises(SourceRefused) as caught:
        open_quickly(source, SourcePolicy(allow_roots=(Path("/"), tree)))
    assert caught.value.code == "special_path"


GOOD: dict[str, tuple[Callable[[Path], str], str]] = {
    "relative": (lambda root: "model.bin", "model.bin"),
    "nested": (lambda root: "sub/inner.bin", "sub/inner.bin"),
    "dot-dot inside the root": (lambda root: "sub/./../model.bin", "model.bin"),
    "absolute": (lambda root: str(root / "sub" / "inner.bin"), "sub/inner.bin"),
    "relative symlink inside": (
        lambda root: "sub/" + _symlink(root / "sub" / "ln", "../model.bin"),
        "model.bin",
    ),
    "absolute symlink inside": (
        lambda root: _symlink(root / "ln", root / "model.bin"),
        "model.bin",
    ),
    "directory symlink inside": (
        lambda root: _symlink(root / "s", "sub") + "/inner.bin",
        "sub/inner.bin",
    ),
    "chain of symlinks": (
        lambda root: _symlink(root / "one", _symlink(root / "two", "sub/inner.bin")),
        "sub/inner.bin",
    ),
}


@pytest.mark.parametrize(("make", "expected"), GOOD.values(), ids=list(GOOD))
def test_paths_inside_the_root_open_the_file_they_name(
    tree: Path, open_quickly: Callable[..., ModelFile], make: Callable[[Path], str], expected: str
) -> None:
    """Paths and symlinks that stay inside the root open the real file, read-only, by its path."""
    source = make(tree)
    with open_quickly(source, SourcePolicy(allow_roots=(tree,))) as model:
        assert model.path == str(tree / expected)
        assert read_all(model) == (tree / expected).read_bytes()
        assert os.fstat(model.fd).st_ino == (tree / expected).stat().st_ino
        assert os.get_blocking(model.fd)  # O_NONBLOCK cleared for the loader


def test_an_absolute_path_may_use_any_root_and_either_spelling_of_it(
    tree: Path, open_quickly: Callable[..., ModelFile]
) -> None:
    """An absolute path under the second root, spelt through a symlink to it, is allowed."""
    alias = tree.parent / "alias"
    alias.symlink_to(tree / "sub")
    policy = SourcePolicy(allow_roots=(tree.parent / "outside", alias))
    with open_quickly(str(alias / "inner.bin"), policy) as model:
        assert model.path == str(tree / "sub" / "inner.bin")


def test_no_roots_means_the_current_directory(
    tree: Path, open_quickly: Callable[..., ModelFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no roots configured, relative paths resolve in (and stay in) the cwd."""
    monkeypatch.chdir(tree / "sub")
    with open_quickly("inner.bin", SourcePolicy()) as model:
        assert read_all(model) == b"inner"
    with pytest.raises(SourceRefused) as caught:
        open_quickly("../model.bin", SourcePolicy())
    assert caught.value.code == "outside_root"


@pytest.mark.parametrize("source", ["missing.bin", "sub/missing.bin", "model.bin/x", "nodir/x"])
def test_missing_files_are_unavailable(
    tree: Path, open_quickly: Callable[..., ModelFile], source: str
) -> None:
    """A path that names nothing is unavailable (not_found), not refused."""
    with pytest.raises(SourceUnavailable) as caught:
        open_quickly(source, SourcePolicy(allow_roots=(tree,)))
    assert caught.value.code == "not_found"


# --- http(s) -------------------------------------------------------------------------------


class ModelServer(ThreadingHTTPServer):
    """A loopback HTTP server with one route per behaviour; it records what it was asked."""

    # Handler threads are joined by server_close(), so none outlives the test.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str]] = []
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def record(self, path: str, host: str) -> None:
        with self._lock:
            self.seen.append((path, host))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ModelServer
    # A client that vanished cannot hold a handler thread (and the teardown) for long.
    timeout = 10

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.record(self.path, self.headers.get("Host", ""))
        route, _, rest = self.path.lstrip("/").partition("/")
        try:
            getattr(self, f"_route_{route}", self._route_missing)(rest)
        except OSError:  # the client hung up, as it does on a refused or cancelled download
            self.close_connection = True

    def _head(self, status: int, **headers: str | int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), str(value))
        self.end_headers()

    def _route_files(self, rest: str) -> None:
        self._head(200, Content_Length=len(BODY))
        self.wfile.write(BODY)

    def _route_unsized(self, rest: str) -> None:
        # No Content-Length: the body ends when the connection does.
        self._head(200, Connection="close")
        self.close_connection = True
        self.wfile.write(BODY)

    def _route_chunked(self, rest: str) -> None:
        self._head(200, Transfer_Encoding="chunked")
        for start in range(0, len(BODY), 4096):
            piece = BODY[start : start + 4096]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _route_stall(self, rest: str) -> None:
        self._head(200, Content_Length=len(BODY))
        self.wfile.write(BODY[:100])
        self.wfile.flush()
        self.server.stalled.set()
        self.server.release.wait(timeout=30)
        self.wfile.write(BODY[100:])

    def _route_trickle(self, rest: str) -> None:
        # One byte per TRICKLE_GAP_S: never a gap as long as any read timeout.
        self._head(200, Content_Length=len(BODY))
        for start in range(len(BODY)):
            self.wfile.write(BODY[start : start + 1])
            self.wfile.flush()
            self.server.stalled.set()
            if self.server.release.wait(timeout=TRICKLE_GAP_S):
                return

    def _route_flood(self, rest: str) -> None:
        # The whole body in 1-byte chunks, as fast as the socket takes them.
        self._head(200, Transfer_Encoding="chunked")
        self.wfile.write(b"".join(b"1\r\n%s\r\n" % BODY[i : i + 1] for i in range(len(BODY))))
        self.wfile.write(b"0\r\n\r\n")

    def _route_gzip(self, rest: str) -> None:
        self._head(200, Content_Length=len(BODY), Content_Encoding="gzip")
        self.wfile.write(BODY)

    def _route_status(self, rest: str) -> None:
        self._head(int(rest), Content_Length=0)

    def _route_to(self, rest: str) -> None:
        self._head(302, Location="/" + rest, Content_Length=0)

    def _route_away(self, rest: str) -> None:
        self._head(302, Location=self.server.url("/files/m.bin", "localhost"), Content_Length=0)

    def _route_loop(self, rest: str) -> None:
        self._head(302, Location="/loop/", Content_Length=0)

    def _route_missing(self, rest: str) -> None:
        self._head(404, Content_Length=0)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    """A running ModelServer; teardown releases stalled handlers, stops it and joins them."""
    srv = ModelServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        thread.join()
        srv.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def web(cache: Path, **changes: Any) -> SourcePolicy:
    """A policy that allows the loopback server, with small timeouts."""
    fields: dict[str, Any] = {
        "allow_hosts": ("127.0.0.1", "localhost"),
        "allow_networks": ("127.0.0.0/8", "::1/128"),
        "cache_dir": cache,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    return SourcePolicy(**(fields | changes))


def cached_paths(cache: Path) -> list[Path]:
    """Everything under the cache dir, relative to it, sorted."""
    return sorted(p.relative_to(cache) for p in cache.rglob("*"))


def partials(cache: Path) -> list[Path]:
    return [p for p in cached_paths(cache) if p.name.startswith(PARTIAL_PREFIX)]


async def open_and_close(source: str, policy: SourcePolicy, expected_sha256: str | None) -> None:
    model = await open_source(source, expected_sha256=expected_sha256, policy=policy)
    model.close()


async def fail(source: str, policy: SourcePolicy, expected_sha256: str | None = None) -> LoadError:
    """The LoadError opening ``source`` raises; no temp file may be left in the cache."""
    with pytest.raises(LoadError) as caught:
        await open_and_close(source, policy, expected_sha256)
    assert partials(policy.cache_dir) == []
    return caught.value


@pytest.mark.parametrize("expected", [BODY_SHA, None], ids=["with digest", "without digest"])
async def test_a_download_is_verified_and_cached_under_its_digest(
    server: ModelServer, cache: Path, expected: str | None
) -> None:
    """A good file lands in <cache>/<sha256>/<name>, and the ModelFile is opened on it."""
    url = server.url("/files/encoder.safetensors")
    with await open_source(url, expected_sha256=expected, policy=web(cache)) as model:
        assert model.path == str(cache / BODY_SHA / "encoder.safetensors")
        assert read_all(model) == BODY
    assert cached_paths(cache) == [
        Path(BODY_SHA),
        Path(BODY_SHA) / "encoder.safetensors",
    ]


async def test_a_cached_digest_is_served_without_the_network(
    server: ModelServer, cache: Path
) -> None:
    """A second request for the same digest is served from the cache: the server sees one GET."""
    url = server.url("/files/m.bin")
    for _ in range(2):
        with await open_source(url, expected_sha256=BODY_SHA, policy=web(cache)) as model:
            assert read_all(model) == BODY
    assert len(server.seen) == 1


def _cache_entry(cache: Path, content: bytes, name: str, age_s: float) -> Path:
    """A finished cache entry last used ``age_s`` ago."""
    path = cache / hashlib.sha256(content).hexdigest() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    used = time.time() - age_s
    os.utime(path, (used, used))
    return path


async def test_the_cache_evicts_least_recently_used_entries_to_fit_a_download(
    server: ModelServer, cache: Path
) -> None:
    """With cache_max_bytes, the oldest-used entries go before a download; a hit counts as use."""
    old_a = _cache_entry(cache, b"a" * 8192, "m.bin", age_s=300)
    old_b = _cache_entry(cache, b"b" * 8192, "b.bin", age_s=200)
    old_c = _cache_entry(cache, b"c" * 8192, "c.bin", age_s=100)
    # Room for the largest download (16 KiB) plus one 8 KiB entry.
    policy = web(cache, max_download_bytes=len(BODY), cache_max_bytes=len(BODY) + 8192)
    digest_a = hashlib.sha256(b"a" * 8192).hexdigest()
    with await open_source(server.url("/files/m.bin"), expected_sha256=digest_a, policy=policy):
        pass  # a hit: the oldest entry becomes the most recently used one
    assert server.seen == []
    with await open_source(server.url("/files/new.bin"), expected_sha256=None, policy=policy):
        pass
    assert old_a.exists() and not old_b.exists() and not old_c.exists()
    assert (cache / BODY_SHA / "new.bin").exists()
    assert not old_b.parent.exists()  # empty digest folders go too


def test_a_cache_cap_below_one_download_is_a_settings_error(cache: Path) -> None:
    """cache_max_bytes below max_download_bytes could never hold a download: rejected."""
    with pytest.raises(ValidationError, match="cache_max_bytes"):
        web(cache, max_download_bytes=2048, cache_max_bytes=1024)


async def test_the_connection_is_pinned_but_keeps_the_host_name(
    server: ModelServer, cache: Path
) -> None:
    """The request goes to the checked address and still says Host: <name>:<port>."""
    with await open_source(
        server.url("/files/m.bin", "LocalHost"), expected_sha256=None, policy=web(cache)
    ):
        pass
    assert server.seen == [("/files/m.bin", f"localhost:{server.port}")]


async def test_a_wrong_digest_is_invalid_and_leaves_the_cache_empty(
    server: ModelServer, cache: Path
) -> None:
    """A digest mismatch is InvalidModel(sha256_mismatch) and nothing stays in the cache."""
    error = await fail(server.url("/files/m.bin"), web(cache), expected_sha256="0" * 64)
    assert isinstance(error, InvalidModel)
    assert error.code == "sha256_mismatch"
    assert cached_paths(cache) == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/files/m.bin", id="declared Content-Length"),
        pytest.param("/unsized/m.bin", id="no Content-Length"),
        pytest.param("/chunked/m.bin", id="chunked"),
    ],
)
async def test_oversize_downloads_are_refused(server: ModelServer, cache: Path, path: str) -> None:
    """Over max_download_bytes is refused up front by its length, or while it streams."""
    error = await fail(server.url(path), web(cache, max_download_bytes=len(BODY) - 1))
    assert isinstance(error, SourceRefused)
    assert error.code == "too_large"
    assert cached_paths(cache) == []


@pytest.mark.parametrize("path", ["/unsized/m.bin", "/chunked/m.bin"])
async def test_bodies_without_a_length_are_fine_under_the_cap(
    server: ModelServer, cache: Path, path: str
) -> None:
    """Close-delimited and chunked bodies download like any other within the cap."""
    policy = web(cache, max_download_bytes=len(BODY))
    with await open_source(server.url(path), expected_sha256=BODY_SHA, policy=policy) as model:
        assert read_all(model) == BODY


async def test_a_stalled_body_times_out_within_the_read_timeout(
    server: ModelServer, cache: Path
) -> None:
    """A server that stops mid-body gives unavailable(timeout) within read_timeout_s + 1 s."""
    policy = web(cache, read_timeout_s=0.5)
    started = time.monotonic()
    error = await fail(server.url("/stall/m.bin"), policy)
    assert isinstance(error, SourceUnavailable)
    assert error.code == "timeout"
    assert time.monotonic() - started < policy.read_timeout_s + 1
    assert server.stalled.is_set()


async def test_a_flood_of_one_byte_chunks_is_refused(server: ModelServer, cache: Path) -> None:
    """A body sent in 1-byte chunks is refused after a few thousand, leaving no partial file."""
    error = await fail(server.url("/flood/m.bin"), web(cache))
    assert isinstance(error, SourceRefused)
    assert error.code == "tiny_chunks"


async def test_a_cancelled_download_removes_its_temp_file(server: ModelServer, cache: Path) -> None:
    """Cancelling a download mid-body removes the partial file."""
    task = asyncio.create_task(
        open_source(server.url("/stall/m.bin"), expected_sha256=None, policy=web(cache))
    )
    assert await asyncio.to_thread(server.stalled.wait, 5)
    await eventually(lambda: partials(cache), 5, "a partial file appeared")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cached_paths(cache) == []


async def test_hosts_not_allowed_are_refused_before_any_request(
    server: ModelServer, cache: Path
) -> None:
    """A host missing from allow_hosts is refused and never contacted."""
    error = await fail(server.url("/files/m.bin"), web(cache, allow_hosts=("models.example",)))
    assert isinstance(error, SourceRefused)
    assert error.code == "host_not_allowed"
    assert server.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_private_addresses_are_refused_without_allow_networks(
    server: ModelServer, cache: Path, host: str
) -> None:
    """An allowed host that resolves to loopback is refused unless its network is allowed."""
    error = await fail(server.url("/files/m.bin", host), web(cache, allow_networks=()))
    assert isinstance(error, SourceRefused)
    assert error.code == "private_address"
    assert server.seen == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("url", "code"),
    [
        pytest.param(lambda s: s.url("/status/404"), "http_404", id="404"),
        pytest.param(lambda s: s.url("/status/403"), "http_403", id="403"),
        pytest.param(lambda s: s.url("/status/503"), "http_503", id="503"),
        pytest.param(lambda s: s.url("/status/204"), "http_204", id="204"),
        pytest.param(lambda s: f"http://127.0.0.1:{_closed_port()}/m.bin", "connect_failed"),
        pytest.param(lambda s: "http://nothing.invalid/m.bin", "dns_failure", id="dns"),
    ],
)
async def test_unreachable_sources_are_unavailable(
    server: ModelServer, cache: Path, url: Callable[[ModelServer], str], code: str
) -> None:
    """Error statuses, refused connections and unknown hosts are unavailable (retryable)."""
    error = await fail(url(server), web(cache, allow_hosts=("127.0.0.1", "nothing.invalid")))
    assert isinstance(error, SourceUnavailable)
    assert error.code == code
    assert cached_paths(cache) == []


async def test_a_compressed_body_is_refused(server: ModelServer, cache: Path) -> None:
    """We ask for identity; a Content-Encoding we did not ask for is refused, not stored."""
    error = await fail(server.url("/gzip/m.bin"), web(cache))
    assert error.code == "content_encoding"


async def test_redirects_are_followed_and_each_hop_is_checked(
    server: ModelServer, cache: Path
) -> None:
    """A redirect to an allowed host is followed; to another host or in a loop it is refused."""
    with await open_source(
        server.url("/to/files/m.bin"), expected_sha256=BODY_SHA, policy=web(cache)
    ) as model:
        assert model.path == str(cache / BODY_SHA / "m.bin")
    only_ip = web(cache, allow_hosts=("127.0.0.1",))
    assert (await fail(server.url("/away/"), only_ip)).code == "host_not_allowed"
    assert (await fail(server.url("/loop/"), web(cache, max_redirects=3))).code == (
        "too_many_redirects"
    )
    assert len(server.seen) == 2 + 1 + 4


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/files/model.safetensors", "model.safetensors"),
        ("/files/we%20ird%24name.bin?x=1", "we_ird_name.bin"),
        ("/files/", "model"),
        ("/files/.hidden", "hidden"),
        ("/files/..%2F..%2Fescape", "escape"),
    ],
)
async def test_cache_names_come_from_the_last_url_segment_sanitised(
    server: ModelServer, cache: Path, path: str, name: str
) -> None:
    """The cached file's name keeps only [A-Za-z0-9._-] of the URL's last segment."""
    with await open_source(server.url(path), expected_sha256=None, policy=web(cache)) as model:
        assert model.path == str(cache / BODY_SHA / name)


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://127.0.0.1/m.bin", "s3://b/k"])
async def test_other_schemes_are_refused(cache: Path, source: str) -> None:
    """Only http and https URLs are fetched."""
    error = await fail(source, web(cache))
    assert error.code == "unsupported_scheme"


async def test_a_malformed_digest_is_a_programming_error(cache: Path) -> None:
    """expected_sha256 becomes a path: anything but 64 lower-case hex digits is a ValueError."""
    with pytest.raises(ValueError, match="hex"):
        await open_source("http://127.0.0.1/m", expected_sha256="../x", policy=web(cache))


# --- settings ------------------------------------------------------------------------------


def test_policy_tuples_come_from_json_lists_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LOADWARDEN_SOURCES__* take JSON lists; host names are lower-cased."""
    monkeypatch.setenv("LOADWARDEN_SOURCES__ALLOW_ROOTS", '["/models", "/srv/models"]')
    monkeypatch.setenv("LOADWARDEN_SOURCES__ALLOW_HOSTS", '["HuggingFace.co"]')
    monkeypatch.setenv("LOADWARDEN_SOURCES__ALLOW_NETWORKS", '["10.0.0.0/8"]')
    monkeypatch.setenv("LOADWARDEN_SOURCES__READ_TIMEOUT_S", "5")
    policy = Settings().sources
    assert policy.allow_roots == (Path("/models"), Path("/srv/models"))
    assert policy.allow_hosts == ("huggingface.co",)
    assert policy.allow_networks == ("10.0.0.0/8",)
    assert policy.read_timeout_s == 5


def test_comma_separated_lists_are_an_error_not_one_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings JSON-decodes tuples, so "/a,/b" fails loudly instead of naming one root."""
    monkeypatch.setenv("LOADWARDEN_SOURCES__ALLOW_ROOTS", "/models,/srv/models")
    with pytest.raises(SettingsError):
        Settings()


def test_the_cache_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cache_dir defaults to $XDG_CACHE_HOME/loadwarden, else ~/.cache/loadwarden."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Settings().sources.cache_dir == tmp_path / "loadwarden"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert SourcePolicy().cache_dir == Path.home() / ".cache" / "loadwarden"


@pytest.mark.parametrize(
    "fields",
    [
        {"allow_roots": ("models",)},
        {"cache_dir": "cache"},
        {"allow_hosts": ("*.example.com",)},
        {"allow_hosts": ("",)},
        {"allow_networks": ("127.0.0.1/8",)},
        {"allow_networks": ("localhost",)},
        {"max_download_bytes": 0},
        {"unknown": 1},
    ],
)
def test_bad_policies_are_rejected(fields: dict[str, Any]) -> None:
    """Relative roots, wildcard hosts, non-CIDR networks and unknown fields do not validate."""
    with pytest.raises(ValidationError):
        SourcePolicy(**fields)


def test_all_is_sorted() -> None:
    """The public names of loadwarden.worker.sources are listed, sorted."""
    assert sources.__all__ == sorted(sources.__all__)
    assert all(hasattr(sources, name) for name in sources.__all__)


@pytest.mark.parametrize(
    ("source", "url"),
    [
        ("https://example.org/m.safetensors", True),
        ("HTTP://example.org/m.safetensors", True),
        ("hf://org/name", True),
        ("s3+tls://bucket/m", True),
        ("/models/a://b.safetensors", False),  # a path that holds "://" is still a path
        ("models/x://y", False),
        ("1http://x", False),  # a scheme starts with a letter
        ("://x", False),
    ],
)
def test_one_rule_tells_a_url_from_a_path(source: str, url: bool) -> None:
    """The request, the catalog, the CLI and the worker all use RFC 3986's scheme rule."""
    from loadwarden.producer.contract import LoadRequest
    from loadwarden.producer.sources import is_url
    from loadwarden.worker.cli._common import source_arg

    assert is_url(source) is url
    given = source_arg(source)
    assert given == source if url else os.path.isabs(given)
    if not url and not source.startswith("/"):
        with pytest.raises(ValidationError, match="relative path"):
            LoadRequest(source=source)


@pytest.mark.parametrize("variable", ["XDG_CACHE_HOME", "XDG_STATE_HOME"])
def test_a_relative_xdg_base_is_ignored(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every XDG folder follows the specification: absolute bases only, else the home's."""
    from loadwarden.worker.queue.embedded import default_state_dir
    from loadwarden.worker.sources._hf import cache_dir

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    home = {"XDG_CACHE_HOME": tmp_path / ".cache", "XDG_STATE_HOME": tmp_path / ".local/state"}
    folders = {
        "XDG_CACHE_HOME": lambda: [
            SourcePolicy().cache_dir.parent,
            cache_dir(SourcePolicy()).parent.parent,
        ],
        "XDG_STATE_HOME": lambda: [default_state_dir().parent.parent],
    }[variable]
    monkeypatch.setenv(variable, "relative/base")
    assert set(folders()) == {home[variable]}
    monkeypatch.setenv(variable, str(tmp_path / "abs"))
    assert set(folders()) == {tmp_path / "abs"}
