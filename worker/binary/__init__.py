"""Stdlib-only readers of model files' bytes, shared by the inspector and the load child.

``formats/`` (in the supervisor) and ``sandbox/`` (in the child) both read these
layouts, so they live here, beside neither: each module imports the stdlib and
this package only, since every load child's memory starts from the fork server's.
"""
