"""How long a download holds the event loop: a flood of 1-byte chunks vs. 64 KiB chunks.

A loopback HTTP server sends the same body (``--kib``) two ways, with chunked
transfer encoding: 64 KiB chunks (the baseline) and 1-byte chunks (the flood of
issue #11, finding 4). While ``open_source`` downloads it, a ticker task asks the
loop for a 1 ms sleep over and over and records how late each wake-up is: the
lag any other job on this worker would see. Prints p50 / p99 / max lag and the
download time for both (for the flood: until it is refused, ``tiny_chunks``),
and the flood / baseline ratio of p99 lag.

Run: ``python bench/download_flood.py [--kib 256] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from loadwarden.producer.errors import SourceRefused
from loadwarden.worker.config import SourcePolicy
from loadwarden.worker.sources import open_source

BODY: bytes = b""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        size = 1 if self.path.startswith("/flood") else 64 * 1024
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        parts = (BODY[i : i + size] for i in range(0, len(BODY), size))
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        try:
            self.wfile.write(body)
        except OSError:  # the client refused the flood and hung up
            self.close_connection = True


async def _measure(url: str, policy: SourcePolicy) -> tuple[list[float], float]:
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - before - 0.001)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    try:
        with await open_source(url, expected_sha256=None, policy=policy):
            pass
    except SourceRefused as exc:  # since the flood is refused: the time is its cost
        print(f"refused: {exc.code}")
    elapsed = time.perf_counter() - started
    done.set()
    await ticker
    return lags, elapsed


def _row(name: str, lags: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(lags)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    row = {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3}
    row |= {"max_ms": ordered[-1] * 1e3, "download_s": elapsed}
    print(
        f"{name:9} lag p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
        f"max {row['max_ms']:7.2f} ms  download {elapsed:6.2f} s"
    )
    return row


async def main(kib: int, repeat: int) -> None:
    global BODY
    BODY = bytes(range(256)) * (kib * 4)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    rows: dict[str, list[dict[str, float]]] = {"baseline": [], "flood": []}
    try:
        for n in range(repeat):
            for name, runs in rows.items():
                with tempfile.TemporaryDirectory() as cache:
                    policy = SourcePolicy(
                        allow_hosts=("127.0.0.1",),
                        allow_networks=("127.0.0.0/8",),
                        cache_dir=Path(cache),
                    )
                    url = f"http://127.0.0.1:{port}/{name}/{n}.bin"
                    runs.append(_row(name, *await _measure(url, policy)))
    finally:
        server.shutdown()
        server.server_close()
    p99 = {name: statistics.median(r["p99_ms"] for r in runs) for name, runs in rows.items()}
    print(f"{kib} KiB body: flood / baseline p99 loop lag = {p99['flood'] / p99['baseline']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kib", type=int, default=256, help="body size in KiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side")
    args = parser.parse_args()
    asyncio.run(main(args.kib, args.repeat))
