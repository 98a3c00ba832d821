"""Messages between supervisor, fork server and load child (stdlib only: it runs in all three).

Control socket (supervisor <-> fork server), SOCK_SEQPACKET, one message per packet:
  supervisor -> server  ``b"S" + token:u64`` with one fd attached: the child's end of its socket
                        ``b"W" + token:u64``, the same, for a child to wait while the machine
                        is idle (it rehearses a load meanwhile: ``_child._rehearse``)
  server -> supervisor  ``b"R"``                               preloading done, ready to fork
                        ``b"P" + token:u64 + pid:i64``          a child was forked
                        ``b"F" + token:u64 + errno:i64``        the fork failed
                        ``b"X" + pid, status, utime_us, stime_us, maxrss_kib (i64 each)``
                                                                a child was reaped (wait4)

Child socket (supervisor <-> one child), SOCK_SEQPACKET, JSON objects, one per packet:
  supervisor -> child   the spec, with the model's fd attached (a checkpoint's shards: the
                        first FDS_PER_MESSAGE fds with the spec, the rest in ``b"fds"`` packets)
  child -> supervisor   ``{"kind": "ready", ...}`` once confined, then
                        ``{"kind": "ok", ...}`` or ``{"kind": "raised", ...}``
Nothing on either socket is pickled: a compromised child can at most send bad JSON.
"""

from __future__ import annotations

import hashlib
import json
import struct

SPAWN = b"S"
SPAWN_IDLE = b"W"
READY = b"R"
FORKED = b"P"
FORK_FAILED = b"F"
REAPED = b"X"

TOKEN = struct.Struct("<Q")
FORKED_MSG = struct.Struct("<Qq")
FORK_FAILED_MSG = struct.Struct("<Qq")
REAPED_MSG = struct.Struct("<qqqqq")

#: Largest control packet.
MAX_CONTROL_BYTES = 64
#: Largest spec the supervisor sends a child: a checkpoint of 1024 shards, each named
#: with its identity, took about 175 KB with a digest each too (there is none now).
MAX_SPEC_BYTES = 256 * 1024
#: Descriptors attached to one packet: the kernel's SCM_MAX_FD is 253.
FDS_PER_MESSAGE = 250
#: Largest message a child may send; anything longer is a protocol violation.
MAX_REPLY_BYTES = 256 * 1024
#: How much of a child's traceback text is kept.
MAX_TRACEBACK_CHARS = 8 * 1024


def manifest_digest(entries: list[tuple[str, str, list[int], int]]) -> str:
    """A digest of a manifest (name, dtype, shape, bytes), independent of order.

    The supervisor computes it from the inspected header and the child from what
    the loader really returned; equal digests mean the loader read what we checked.
    """
    canonical = json.dumps(
        sorted([n, d, list(s), b] for n, d, s, b in entries), separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
