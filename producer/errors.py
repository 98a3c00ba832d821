"""The one error tree of loadwarden, shared by producers and workers.

::

    LoadwardenError
    ├── ContractError            a payload that is not our wire format (bad JSON, wrong version)
    ├── CatalogError             a catalog file with defects (all of them listed in ``defects``)
    ├── ClientError              the producer side could not do what was asked
    │   ├── RedisUnavailable     Redis did not answer
    │   ├── JobNotFound          no job with that id is queued, running or finished
    │   ├── ReportTimeout        the report did not arrive in time (also a TimeoutError)
    │   └── EmbeddedWorkerDied   the in-process worker of an embedded command stopped
    └── LoadError                a load ended in an outcome other than ``ok``
        ├── InvalidModel         outcome ``invalid``: bad file, header defect or digest mismatch
        ├── SourceRefused        outcome ``refused``: policy forbids this source or format
        ├── LoadTimeout          outcome ``timeout``: the wall-clock deadline passed
        ├── MemoryExceeded       outcome ``memory_exceeded``: the memory limit was hit
        ├── CpuExceeded          outcome ``cpu_exceeded``: the CPU-time limit was hit
        ├── ChildCrashed         outcome ``crashed``: the child died any other way
        ├── SourceUnavailable    outcome ``unavailable``: the source could not be reached or read
        └── LoadCancelled        outcome ``cancelled``: somebody cancelled the job

Every ``Outcome`` except ``ok`` maps to exactly one ``LoadError`` subclass
(``error_class_for``); a timeout is never a cancellation. Errors keep their
arguments through ``__reduce__`` so they survive a process boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from loadwarden.producer.contract import LoadReport, Outcome


class LoadwardenError(Exception):
    """Base of every error loadwarden raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class ContractError(LoadwardenError):
    """A payload is not a valid loadwarden wire document."""


class CatalogError(LoadwardenError):
    """A catalog is refused whole; ``defects`` lists every problem by entry and field."""

    def __init__(self, message: str, defects: list[str] | None = None) -> None:
        super().__init__(message)
        self.defects = list(defects or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.defects))


class ClientError(LoadwardenError):
    """The producer side could not do what was asked."""


class RedisUnavailable(ClientError):
    """Redis could not be reached, or stopped answering."""


class JobNotFound(ClientError):
    """No job with this id is queued, running, or has a stored report."""


class ReportTimeout(ClientError, TimeoutError):
    """The job's report did not arrive within the wait."""


class EmbeddedWorkerDied(ClientError):
    """The in-process worker of an embedded command stopped: nothing would answer the wait."""


#: Each failed outcome's error class, filled as the classes are defined (LoadError below).
_BY_OUTCOME: dict[str, type[LoadError]] = {}


class LoadError(LoadwardenError):
    """A load ended in an outcome other than ``ok``.

    ``code`` names the defect in a stable, machine-readable way (for example
    ``header_too_large``); ``report`` is attached when the error is raised from a
    finished report.
    """

    outcome_value: ClassVar[str] = ""

    def __init_subclass__(cls, outcome: str = "", **kwargs: Any) -> None:
        """``class InvalidModel(LoadError, outcome="invalid")``: the class of that outcome."""
        super().__init_subclass__(**kwargs)
        if outcome:
            if outcome in _BY_OUTCOME:
                raise TypeError(f"outcome {outcome!r} has a class already: {_BY_OUTCOME[outcome]}")
            cls.outcome_value = outcome
            _BY_OUTCOME[outcome] = cls

    def __init__(self, message: str, *, code: str = "", report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.code = code or type(self).__name__
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_load_error, (type(self), self.message, self.code))

    @property
    def outcome(self) -> Outcome:
        from loadwarden.producer.contract import Outcome

        return Outcome(self.outcome_value)


def _rebuild_load_error(cls: type[LoadError], message: str, code: str) -> LoadError:
    return cls(message, code=code)


class InvalidModel(LoadError, outcome="invalid"):
    """The file is not a valid model: a header defect, a bad size, a digest mismatch."""


class SourceRefused(LoadError, outcome="refused"):
    """Policy forbids loading this source or format."""


class LoadTimeout(LoadError, outcome="timeout"):
    """The load overran its wall-clock deadline and was killed."""


class MemoryExceeded(LoadError, outcome="memory_exceeded"):
    """The load hit its memory limit."""


class CpuExceeded(LoadError, outcome="cpu_exceeded"):
    """The load used up its CPU-time limit."""


class ChildCrashed(LoadError, outcome="crashed"):
    """The child process died by a signal or exit that no limit explains."""


class SourceUnavailable(LoadError, outcome="unavailable"):
    """The source could not be reached or read (worth retrying)."""


class LoadCancelled(LoadError, outcome="cancelled"):
    """The job was cancelled before or while it ran."""


def error_class_for(outcome: Outcome | str) -> type[LoadError]:
    """The ``LoadError`` subclass for a failed outcome (``KeyError`` for ``ok``)."""
    return _BY_OUTCOME[str(outcome)]


#: Longest exception text a report carries for an error we did not expect.
DESCRIBE_CHARS = 500


def describe(exc: BaseException) -> str:
    """``Type: message`` of any exception, never raising (``str()`` itself can raise: a huge
    integer past ``sys.int_info``'s digit limit in its arguments), cut to a readable length."""
    try:
        text = str(exc)
    except Exception:
        text = "(the message could not be rendered)"
    name = type(exc).__name__
    full = f"{name}: {text}" if text else name
    return full if len(full) <= DESCRIBE_CHARS else full[: DESCRIBE_CHARS - 3] + "..."
