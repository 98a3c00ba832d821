"""Helpers the format inspectors share: bounded reads, errors, summaries, pickle detection."""

from __future__ import annotations

import contextlib
import io
import pickletools
from collections.abc import Iterable, Iterator
from typing import Protocol, cast

from loadwarden.producer.contract import ModelFormat, ModelSummary, TensorInfo
from loadwarden.producer.errors import InvalidModel, SourceRefused, SourceUnavailable
from loadwarden.worker.binary.pread import pread_into

# Values quoted from a hostile file are cut so a message stays readable and small.
_SHOW_CHARS = 80
#: First opcodes of protocol 0 and 1 pickles, which have no PROTO header: MARK,
#: GLOBAL, empty containers, scalars and persistent ids.
_UNFRAMED_PICKLE_STARTS = frozenset(b"(c}])NILFSVPKJMXUTGi")
#: Opcodes a prefix must parse as before we call an unframed file a pickle.
_MIN_PICKLE_OPCODES = 2
#: What to do instead of loading a code-bearing file.
CONVERT_HINT = (
    "convert it to safetensors in a trusted environment "
    "(e.g. safetensors.torch.save_file / safetensors.numpy.save_file)"
)


def show(value: object) -> str:
    """``repr(value)``, cut to a readable length."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.int_info's digit limit: say how big, not what
        if isinstance(value, int):
            text = f"<an integer of {value.bit_length()} bits>"
        elif isinstance(value, (tuple, list)):
            text = "(" + ", ".join(show(item) for item in value[:8]) + ")"
        else:
            text = f"<a {type(value).__name__}>"
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def invalid(where: str, code: str, message: str) -> InvalidModel:
    """An ``InvalidModel`` whose message starts with the format (and member) it is about."""
    return InvalidModel(f"{where}: {message}", code=code)


class _Defect(Protocol):
    code: str
    message: str


@contextlib.contextmanager
def defects_as_invalid(where: str, defect: type[Exception]) -> Iterator[None]:
    """Turn a stdlib parser's ``defect`` (with ``code`` and ``message``) into ``InvalidModel``
    and a failed read into ``SourceUnavailable``."""
    try:
        yield
    except defect as exc:
        found = cast(_Defect, exc)
        raise invalid(where, found.code, found.message) from None
    except OSError as exc:
        raise SourceUnavailable(f"read failed: {exc.strerror}", code="unreadable") from exc


def read_at(fd: int, count: int, offset: int) -> bytes:
    """Up to ``count`` bytes from ``offset``; fewer only at the end of the file."""
    buffer = bytearray(count)
    try:
        got = pread_into(fd, memoryview(buffer), offset)
    except OSError as exc:
        raise SourceUnavailable(f"read failed: {exc.strerror}", code="unreadable") from exc
    return bytes(buffer[:got])


class Cursor:
    """Sequential reads from a descriptor by pread (the descriptor's offset never moves)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def read(self, count: int) -> bytes:
        data = read_at(self.fd, count, self.pos)
        self.pos += len(data)
        return data


def pickle_protocol(prefix: bytes, last_byte: bytes) -> int | None:
    """The protocol of a pickle that starts with ``prefix`` and ends with ``last_byte``, or None.

    Protocols 2-5 start with PROTO (``\\x80`` + version). Protocols 0 and 1 have no
    header: we call a file one when it starts with an opcode they start with, its
    first opcodes parse (pickletools only decodes, it never builds objects), and it
    ends with STOP.
    """
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return prefix[1]
    if last_byte != b"." or not prefix or prefix[0] not in _UNFRAMED_PICKLE_STARTS:
        return None
    parsed = 0
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(prefix)):
            parsed += 1
            if opcode.name == "STOP" or parsed >= _MIN_PICKLE_OPCODES:
                break
    except (ValueError, UnicodeDecodeError):  # the prefix ends mid-opcode, or is no pickle
        pass
    return 0 if parsed >= _MIN_PICKLE_OPCODES else None


def file_pickle_protocol(fd: int, size: int, prefix: bytes) -> int | None:
    """``pickle_protocol`` of the file on ``fd``, whose first bytes are ``prefix``."""
    last = read_at(fd, 1, size - 1) if size else b""
    return pickle_protocol(prefix, last)


def refuse_pickle(where: str, protocol: int) -> SourceRefused:
    """The refusal of a pickle found where a tensor format was expected."""
    return SourceRefused(
        f"{where} is a Python pickle (protocol {protocol}): unpickling runs arbitrary code, "
        f"and pickle scanners have a history of bypasses; {CONVERT_HINT}",
        code="code_bearing_format",
    )


def summarize(
    fmt: ModelFormat,
    tensors: Iterable[tuple[str, str, list[int], int, int]],
    file_size: int,
    metadata: dict[str, str] | None = None,
) -> ModelSummary:
    """A summary of ``(name, dtype, shape, bytes, parameters)`` tensors, in the given order."""
    infos: list[TensorInfo] = []
    dtypes: dict[str, int] = {}
    for name, dtype, shape, nbytes, parameters in tensors:
        infos.append(TensorInfo(name=name, dtype=dtype, shape=shape, bytes=nbytes))
        dtypes[dtype] = dtypes.get(dtype, 0) + parameters
    return ModelSummary(
        format=fmt,
        file_bytes=file_size,
        bytes=sum(info.bytes for info in infos),
        parameters=sum(dtypes.values()),
        dtypes=dict(sorted(dtypes.items())),
        tensors=infos,
        metadata=metadata or {},
    )


def over_budget(
    where: str, total: int, budget: int, what: str = "bytes of tensor data"
) -> SourceRefused:
    """The refusal of a model that would not fit this worker's memory budget."""
    return SourceRefused(
        f"{where}: {total} {what}, over this worker's budget of {budget} bytes",
        code="over_budget",
    )
