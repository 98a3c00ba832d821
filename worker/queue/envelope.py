"""The job envelope as arq reads it, checked whole before arq acts on any field of it.

arq's worker reads five fields of a job document outside its own error handling
(arq 0.28, ``Worker.run_job``): ``f`` is a dict key (``self.functions[f]``: a list
or an object raises TypeError), ``t`` is compared with an int (a string raises
TypeError; a huge one skips straight to "max retries exceeded"), ``et`` goes through
``datetime.fromtimestamp`` and arithmetic (a string, a float like 1e300 or a
year past 9999 raise), and ``a``/``k`` are splatted into the call of the job
function (a non-list, a non-object, or keys the function does not take raise
TypeError, which arq stores as a failure that is no report). Any of these used to
kill the worker or leave the job without a report.

``job_deserializer`` therefore accepts only the exact shape our producers write
(``{"t": int|null, "f": "load", "a": [], "k": {"request": {...}}, "et": int}``)
and turns anything else into a *marker* envelope that is itself valid: the job
function sees the marker, reports ``invalid`` / ``bad_payload`` and dead-letters
the job. Nothing but ``wire.loads`` ever decodes the bytes (no pickle).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loadwarden.producer import wire
from loadwarden.producer.errors import describe
from loadwarden.producer.keys import FUNCTION_NAME

#: The key of the marker request a payload that is not our JSON is rewritten to.
UNDECODABLE = "__undecodable__"
#: Largest job try a producer may set (arq's own default max_tries is 5; ours allow
#: 100 attempts plus lost workers, so anything past this is not one of our jobs).
MAX_JOB_TRY = 1000
#: Latest enqueue time: 9999-12-31T23:59:59.999Z in ms, the last instant a datetime holds.
MAX_ENQUEUE_MS = 253_402_300_799_999
#: How much of a refused payload a dead letter keeps (enough to recognise it).
PREVIEW_BYTES = 64
#: Largest job document decoded. A LoadRequest is bounded by its own fields (a 4 KiB
#: source, 64 labels of 128 + 256 characters, a few numbers): about 30 KiB at the very
#: most. 1 MiB leaves room for growth while a planted 60 MiB payload, which cost the
#: worker 1.9 GB and 6 s to parse, is refused before any parsing.
MAX_JOB_BYTES = 1024 * 1024

Millis = Annotated[int, Field(strict=True, ge=0, le=MAX_ENQUEUE_MS)]
JobTry = Annotated[int, Field(strict=True, ge=0, le=MAX_JOB_TRY)]


class _Kwargs(BaseModel):
    """The job function's keyword arguments: the request, and nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request: dict[str, Any]


class Envelope(BaseModel):
    """An arq job document as our producers write it; arq's other keys are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    t: JobTry | None
    f: Literal["load"]
    a: Annotated[list[Any], Field(max_length=0)]
    k: _Kwargs
    et: Millis


def _marker(reason: str) -> dict[str, Any]:
    return {
        "f": FUNCTION_NAME,
        "a": [],
        "k": {"request": {UNDECODABLE: reason}},
        "t": None,
        "et": 0,
    }


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    where = ".".join(str(p) for p in errors[0]["loc"]) or "envelope"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"field {where!r}: {errors[0]['msg']}{more}"


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's job deserializer: our strict JSON in our envelope, or a marker job that is refused.

    Never raises: whatever ``data`` holds (a planted pickle, JSON nested a million
    deep, an envelope with a field of the wrong type or range), arq gets a valid
    envelope whose job ends ``invalid`` with a report.
    """
    if len(data) > MAX_JOB_BYTES:
        reason = f"job document of {len(data)} bytes exceeds {MAX_JOB_BYTES}"
        return _marker(f"{reason}; first bytes: {bytes(data[:PREVIEW_BYTES])!r}")
    try:
        document = wire.loads(data)
        Envelope.model_validate(document)
        return document
    except ValidationError as exc:
        reason = f"not a loadwarden job envelope: {_first_error(exc)}"
    except Exception as exc:  # the trust boundary: nothing a payload holds may escape it
        reason = describe(exc)
    return _marker(f"{reason}; first bytes: {bytes(data[:PREVIEW_BYTES])!r}")
