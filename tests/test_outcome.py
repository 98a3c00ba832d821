"""Every outcome from one function: decide() over how a run or a job ended (pure, no processes)."""

from __future__ import annotations

import signal

import pytest

from loadwarden.producer.contract import LimitOverrides, Outcome
from loadwarden.producer.errors import InvalidModel
from loadwarden.worker.config import LimitPolicy
from loadwarden.worker.load._outcome import (
    STAGE_ENDS,
    Early,
    EarlyEnd,
    Loaded,
    LoadedModel,
    Raised,
    RunEnd,
    Stop,
    decide,
    failure,
)
from loadwarden.worker.load.limits import derive_limits
from loadwarden.worker.sandbox.children import ChildExit

LIMITS = derive_limits(100 * 1024 * 1024, LimitOverrides(), LimitPolicy())
DIGEST = "a" * 64


def _exit(sig: int | None = None, code: int | None = None, cpu: float = 0.0) -> ChildExit:
    return ChildExit(
        pid=1, exit_code=code, signal=sig, cpu_user_s=cpu, cpu_system_s=0.0, maxrss_bytes=0
    )


def _raised(type_: str, message: str = "", module: str = "m") -> Raised:
    return Raised(kind="raised", type=type_, module=module, message=message, traceback="", rchar=0)


def _loaded(digest: str = DIGEST) -> Loaded:
    return Loaded(
        kind="ok",
        rchar=0,
        result=LoadedModel(tensors=1, bytes=1, manifest_digest=digest, sha256=None),
    )


KILLED = _exit(sig=signal.SIGKILL)
EXITED = _exit(code=1)
DIGEST_MISMATCH = InvalidModel("the file's sha256 is not the pinned one", code="sha256_mismatch")

#: id -> (how the run ended, expected outcome, expected code); "" is no error.
RUNS: dict[str, tuple[RunEnd, str, str]] = {
    "ok": (RunEnd(LIMITS, _exit(code=0), DIGEST, final=_loaded()), "ok", ""),
    "ok-despite-cgroup-oom-after-answer": (
        RunEnd(LIMITS, KILLED, DIGEST, final=_loaded(), cgroup_oom=True),
        "ok",
        "",
    ),
    "cancel": (RunEnd(LIMITS, KILLED, DIGEST, stopped=Stop.CANCEL), "cancelled", "cancelled"),
    "cancel-wins-over-cgroup-oom-and-protocol": (
        RunEnd(LIMITS, KILLED, DIGEST, stopped=Stop.CANCEL, cgroup_oom=True, protocol_error="x"),
        "cancelled",
        "cancelled",
    ),
    "timeout": (RunEnd(LIMITS, KILLED, DIGEST, stopped=Stop.DEADLINE), "timeout", "deadline"),
    "timeout-after-answer": (
        RunEnd(LIMITS, KILLED, DIGEST, final=_loaded(), stopped=Stop.DEADLINE),
        "timeout",
        "deadline",
    ),
    "timeout-wins-over-cgroup-oom": (
        RunEnd(LIMITS, KILLED, DIGEST, stopped=Stop.DEADLINE, cgroup_oom=True),
        "timeout",
        "deadline",
    ),
    "cgroup-oom": (
        RunEnd(LIMITS, KILLED, DIGEST, cgroup_oom=True),
        "memory_exceeded",
        "cgroup_oom",
    ),
    "cgroup-oom-wins-over-what-the-child-raised": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("ZeroDivisionError"), cgroup_oom=True),
        "memory_exceeded",
        "cgroup_oom",
    ),
    "cgroup-oom-wins-over-a-broken-protocol": (
        RunEnd(LIMITS, KILLED, DIGEST, protocol_error="lost contact", cgroup_oom=True),
        "memory_exceeded",
        "cgroup_oom",
    ),
    "protocol-violation": (
        RunEnd(LIMITS, EXITED, DIGEST, protocol_error="the child sent messages out of order"),
        "crashed",
        "protocol_violation",
    ),
    "manifest-mismatch": (
        RunEnd(LIMITS, _exit(code=0), DIGEST, final=_loaded("b" * 64)),
        "invalid",
        "manifest_mismatch",
    ),
    "manifest-mismatch-before-the-digest-check": (
        RunEnd(LIMITS, _exit(code=0), DIGEST, final=_loaded("b" * 64), checked=DIGEST_MISMATCH),
        "invalid",
        "manifest_mismatch",
    ),
    "digest-or-signature-check-failed": (
        RunEnd(LIMITS, _exit(code=0), DIGEST, final=_loaded(), checked=DIGEST_MISMATCH),
        "invalid",
        "sha256_mismatch",
    ),
    "checks-ignored-without-an-answer": (
        RunEnd(LIMITS, _exit(code=3), DIGEST, checked=DIGEST_MISMATCH),
        "crashed",
        "exited",
    ),
    "memory-error": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("MemoryError")),
        "memory_exceeded",
        "memory_limit",
    ),
    "rust-alloc-panic": (
        RunEnd(
            LIMITS,
            EXITED,
            DIGEST,
            final=_raised("PanicException", "memory allocation of 8 bytes failed"),
        ),
        "memory_exceeded",
        "memory_limit",
    ),
    "other-panic": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("PanicException", "index out of bounds")),
        "crashed",
        "loader_error",
    ),
    "sandbox-denied": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("PermissionError")),
        "refused",
        "sandbox_denied",
    ),
    "child-could-not-confine-itself": (
        RunEnd(
            LIMITS,
            EXITED,
            DIGEST,
            final=_raised("SandboxFailed", module="loadwarden.worker.sandbox._child"),
        ),
        "crashed",
        "sandbox",
    ),
    "a-loaders-own-sandboxfailed-is-its-error": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("SandboxFailed")),
        "crashed",
        "loader_error",
    ),
    "loader-rejected": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("SafetensorError")),
        "invalid",
        "loader_rejected",
    ),
    "child-saw-manifest-mismatch": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("ManifestMismatch")),
        "invalid",
        "manifest_mismatch",
    ),
    "file-changed": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("FileChanged")),
        "invalid",
        "file_changed",
    ),
    "other-exception": (
        RunEnd(LIMITS, EXITED, DIGEST, final=_raised("ZeroDivisionError")),
        "crashed",
        "loader_error",
    ),
    "sigxcpu": (RunEnd(LIMITS, _exit(sig=signal.SIGXCPU), DIGEST), "cpu_exceeded", "cpu_limit"),
    "sigkill-at-cpu-limit": (
        RunEnd(LIMITS, _exit(sig=signal.SIGKILL, cpu=LIMITS.cpu_seconds + 1), DIGEST),
        "cpu_exceeded",
        "cpu_limit",
    ),
    "sigkill-near-memory-limit": (
        RunEnd(LIMITS, KILLED, DIGEST, peak_rss_bytes=LIMITS.memory_bytes),
        "memory_exceeded",
        "oom_killed",
    ),
    "sigkill-far-from-limits": (
        RunEnd(LIMITS, KILLED, DIGEST, peak_rss_bytes=1),
        "crashed",
        "signal",
    ),
    "segv": (RunEnd(LIMITS, _exit(sig=signal.SIGSEGV), DIGEST), "crashed", "signal"),
    "exit": (RunEnd(LIMITS, _exit(code=3), DIGEST), "crashed", "exited"),
}

#: Every early end: (expected outcome, expected code), written out, not read from the module.
EARLY: dict[Early, tuple[str, str]] = {
    Early.CANCELLED: ("cancelled", "cancelled"),
    Early.DEADLINE: ("timeout", "deadline"),
    Early.SOURCE_ERROR: ("unavailable", "source_error"),
    Early.SIGNATURE_INVALID: ("refused", "signature_invalid"),
    Early.INSPECTION_ERROR: ("invalid", "inspection_error"),
    Early.SANDBOX: ("crashed", "sandbox"),
    Early.CGROUP_FAILED: ("crashed", "cgroup_failed"),
    Early.INTERNAL_ERROR: ("crashed", "internal_error"),
    Early.BAD_PAYLOAD: ("invalid", "bad_payload"),
    Early.BAD_REQUEST: ("invalid", "bad_request"),
    Early.ATTEMPTS_EXHAUSTED: ("crashed", "attempts_exhausted"),
    Early.JOB_EXPIRED: ("invalid", "job_expired"),
    Early.JOB_TIMEOUT: ("timeout", "job_timeout"),
    Early.WORKER_LOST: ("crashed", "worker_lost"),
}


@pytest.mark.parametrize(("end", "outcome", "code"), list(RUNS.values()), ids=list(RUNS))
def test_a_child_run_ends_in_one_outcome(end: RunEnd, outcome: str, code: str) -> None:
    """How a child run ended gives one outcome and code, by the documented precedence."""
    decision = decide(end)
    assert str(decision.outcome) == outcome
    assert (decision.error.code if decision.error else "") == code
    assert (decision.error is None) is (decision.outcome is Outcome.OK)


@pytest.mark.parametrize(("why", "expected"), list(EARLY.items()), ids=[str(e) for e in EARLY])
def test_an_early_end_has_its_outcome_and_keeps_its_words(
    why: Early, expected: tuple[str, str]
) -> None:
    """A job that ended with no child answer to judge gets its row's outcome and code, and the
    words that say what happened."""
    decision = decide(EarlyEnd(why, "what happened"))
    assert decision.error is not None
    assert (str(decision.outcome), decision.error.code) == expected
    assert decision.error.message == "what happened"
    assert failure(why, "what happened").code == expected[1]


def test_the_table_names_every_early_end() -> None:
    """No early end escapes the table above (a new one must be added to it)."""
    assert set(EARLY) == set(Early)


@pytest.mark.parametrize(
    ("stage", "outcome"),
    [
        ("source", "unavailable"),
        ("signature", "refused"),
        ("inspect", "invalid"),
        ("limits", "crashed"),
        ("admit", "crashed"),
        ("child", "crashed"),
        ("classify", "crashed"),
    ],
)
def test_an_unexpected_error_is_judged_by_its_stage(stage: str, outcome: str) -> None:
    """What escaped a stage of the load becomes that stage's outcome (a report, never a crash)."""
    assert str(decide(EarlyEnd(STAGE_ENDS[stage], "boom")).outcome) == outcome
    assert set(STAGE_ENDS) == {
        "source",
        "signature",
        "inspect",
        "limits",
        "admit",
        "child",
        "classify",
    }
