"""Preloaded into a fork server: ``os.memfd_create`` fails as a kernel without it (or a
container's seccomp profile) makes it fail, so that the warm-up raises (``_child.warm_up``)."""

import errno
import os


def _refused(name: str, flags: int = 0) -> int:
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


os.memfd_create = _refused
