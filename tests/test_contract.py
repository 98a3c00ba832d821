"""The job contract, the wire format, the error tree and the public surface."""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import pkgutil
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from pydantic import ValidationError

import loadwarden.producer
import loadwarden.worker
import loadwarden.worker.config
from loadwarden.producer import BlockingClient, BlockingJobHandle, Client, JobHandle, wire
from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.producer.errors import (
    ContractError,
    LoadCancelled,
    LoadError,
    LoadTimeout,
    LoadwardenError,
    ReportTimeout,
    error_class_for,
)
from loadwarden.producer.schemas import HERE, render


def test_committed_schemas_are_current() -> None:
    """The JSON Schema files in producer/schemas match the models (regenerate if this fails)."""
    for name, text in render().items():
        assert (HERE / name).read_text() == text, (
            f"{name} is stale: python -m loadwarden.producer.schemas"
        )


@pytest.mark.parametrize(
    "module",
    [
        loadwarden.producer,
        loadwarden.producer.contract,
        loadwarden.worker,
        loadwarden.worker.config,
    ],
)
def test_all_is_sorted_and_complete(module: object) -> None:
    """Each package's __all__ is sorted (constants, classes, functions) and every name resolves."""
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    for name in names:
        assert getattr(module, name) is not None


def test_what_the_documented_client_methods_return_is_public() -> None:
    """Every loadwarden class that a Client or JobHandle method named in README's "Python
    API" returns (directly or in a list) is a name of ``loadwarden.producer``."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("\n## Python API\n") : readme.index("\n## Command line\n")]
    named = set(re.findall(r"\b(?:client|handle)\.(\w+)\(", section))
    assert {"dead_letters", "preload", "failing_models", "report", "cancel"} <= named
    namespace: dict[str, object] = {}  # names the client's modules import for type checking only
    for module in pkgutil.iter_modules(loadwarden.producer.__path__, "loadwarden.producer."):
        namespace.update(vars(importlib.import_module(module.name)))
    returned: set[type] = set()
    for cls in (Client, JobHandle):
        for name in named & set(vars(cls)):
            hint = get_type_hints(getattr(cls, name), globalns=namespace)["return"]
            returned.update(t for t in (hint, *get_args(hint)) if isinstance(t, type))
    public = {getattr(loadwarden.producer, name) for name in loadwarden.producer.__all__}
    ours = {t for t in returned if t.__module__.startswith("loadwarden.")}
    assert ours and ours <= public, sorted(t.__name__ for t in ours - public)


@pytest.mark.parametrize(
    ("blocking", "twin", "own"),
    [(BlockingClient, Client, {"enqueue", "close"}), (BlockingJobHandle, JobHandle, set())],
)
def test_blocking_twins_take_what_their_async_twins_take(
    blocking: type, twin: type, own: set[str]
) -> None:
    """Every method of a blocking class but its own has its async twin's parameters and
    docstring, so the two cannot drift apart (enqueue wraps its handle; close is its own)."""
    methods = {n for n, v in vars(blocking).items() if not n.startswith("_") and callable(v)}
    assert own <= methods and methods - own, "no shared methods found"
    for name in sorted(methods - own):
        ours, theirs = (
            inspect.signature(getattr(blocking, name)),
            inspect.signature(getattr(twin, name)),
        )
        assert list(ours.parameters)[1:] == list(theirs.parameters)[1:], name
        assert [p.kind for p in ours.parameters.values()] == [
            p.kind for p in theirs.parameters.values()
        ], name
        assert getattr(blocking, name).__doc__ == getattr(twin, name).__doc__, name


def test_every_failed_outcome_has_one_error_class() -> None:
    """Each outcome but ok maps to exactly one LoadError subclass, and back."""
    classes = {o: error_class_for(o) for o in Outcome if o is not Outcome.OK}
    assert len(set(classes.values())) == len(classes)
    for outcome, cls in classes.items():
        assert issubclass(cls, LoadError) and cls("x").outcome is outcome
    with pytest.raises(KeyError):
        error_class_for(Outcome.OK)
    assert LoadTimeout is not LoadCancelled and not issubclass(LoadTimeout, LoadCancelled)


def test_errors_survive_a_process_boundary() -> None:
    """Errors keep their message and code through __reduce__ (as when sent between processes)."""
    err = LoadTimeout("too slow", code="deadline")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.message, back.code) == (LoadTimeout, "too slow", "deadline")
    assert isinstance(pickle.loads(pickle.dumps(ReportTimeout("late"))), TimeoutError)
    assert issubclass(ContractError, LoadwardenError)


def test_request_is_strict() -> None:
    """A request rejects unknown fields, bad digests and infinite limits; lower-cases a digest."""
    assert LoadRequest(source="/m", sha256="AB" * 32).sha256 == "ab" * 32
    with pytest.raises(ValidationError):
        LoadRequest.model_validate({"source": "m", "surprise": 1})
    with pytest.raises(ValidationError):
        LoadRequest(source="/m", sha256="xyz")
    with pytest.raises(ValidationError):
        LoadRequest.model_validate({"source": "m", "wire_version": 2})
    with pytest.raises(ValidationError):
        LoadRequest.model_validate({"source": "m", "limits": {"timeout_seconds": float("inf")}})


def test_request_round_trips_through_the_wire() -> None:
    """A request survives dumps/loads unchanged."""
    req = LoadRequest(source="/models/a.safetensors", labels={"team": "search"})
    doc = wire.loads(wire.dumps({"k": {"request": req}}))
    assert LoadRequest.model_validate(doc["k"]["request"]) == req


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (pickle.dumps({"f": "load"}), "not UTF-8 JSON"),
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b'{"a": NaN}', "NaN"),
        ('{"a": 1}'.encode("utf-16"), "UTF-8"),
        (b"[1, 2]", "object"),
        (b"{", "JSON"),
    ],
    ids=["pickle", "duplicate-key", "nan", "utf16", "not-object", "truncated"],
)
def test_wire_rejects_anything_but_strict_json(payload: bytes, why: str) -> None:
    """The deserializer refuses pickle, duplicate keys, NaN, UTF-16 and non-objects."""
    with pytest.raises(ContractError, match=why):
        wire.loads(payload)


def test_wire_writes_exceptions_as_data() -> None:
    """An exception arq stores as a result is written as plain JSON, never pickled."""
    doc = json.loads(wire.dumps({"r": RuntimeError("boom")}))
    assert doc == {"r": {"__error__": {"type": "RuntimeError", "message": "boom"}}}
