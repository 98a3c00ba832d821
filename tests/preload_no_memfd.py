"""Preloaded into a fork server: an interpreter built without ``os.memfd_create`` (old
glibc, musl), so that its warm-up has no file to load (``_child.warm_up``)."""

import os

del os.memfd_create
