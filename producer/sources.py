"""Source names a producer can check without a worker: URLs and ``hf://ORG/NAME[@REVISION]``.

The rules are huggingface_hub's (``validate_repo_id``, ``REGEX_COMMIT_HASH``), narrowed:
a repository id here always has its organisation (the hub moved its old unscoped
models under one), and a revision is a 40-hex commit, a branch or tag name that is
one ``refs/`` file name, or a pull request's ``refs/pr/N``.
"""

from __future__ import annotations

import re

#: A URL's scheme (RFC 3986: a letter, then letters, digits, "+", "." or "-") and "://",
#: at the start: anything else, "/models/a://b" included, is a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HF_SCHEME = "hf://"
# [\w.-] parts of at most 96 characters, not starting or ending with "-" or ".".
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$", re.ASCII)
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|refs/pr/[0-9]{1,10})$", re.ASCII)


def url_scheme(source: str) -> str | None:
    """The scheme of ``source`` as written when it is a URL, else None (a path)."""
    found = _SCHEME.match(source)
    return found[1] if found else None


def is_url(source: str) -> bool:
    """Whether ``source`` is a URL (``hf://`` included) rather than a path."""
    return _SCHEME.match(source) is not None


def is_hf(source: str) -> bool:
    """Whether ``source`` names a model in the Hugging Face cache."""
    return source.startswith(HF_SCHEME)


def parse_hf(source: str) -> tuple[str, str]:
    """``(repo_id, revision)`` of ``hf://ORG/NAME[@REVISION]`` (revision ``main`` when
    none is given); ``ValueError`` saying what is wrong."""
    rest = source.removeprefix(HF_SCHEME)
    repo_id, at, revision = rest.partition("@")
    if (
        not _REPO_ID.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
    ):
        raise ValueError(
            f"{repo_id!r} is not a Hugging Face repository id: ORG/NAME, each of letters, "
            "digits, '.', '_', '-' (no '--' or '..')"
        )
    if at and not (COMMIT.match(revision) or (_REF.match(revision) and ".." not in revision)):
        raise ValueError(f"{revision!r} is not a revision: a 40-hex commit, a branch or a tag name")
    return repo_id, revision or "main"
