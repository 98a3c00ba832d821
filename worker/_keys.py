"""Redis keys only the worker reads and writes; what producers share is in producer/keys.py."""

#: The attempts of a job so far, as a JSON list of Attempt, until it ends.
ATTEMPTS_KEY_PREFIX = "loadwarden:attempts:"
#: Per-model load history (see loadwarden.worker.load.history).
HISTORY_KEY_PREFIX = "loadwarden:history:"
#: A catalog preload run by ``serve`` (its progress as JSON), ``<prefix><preload id>``.
PRELOAD_KEY_PREFIX = "loadwarden:preload:"
#: The cap on the recent-loads stream (``producer.keys.RECENT_STREAM``, which readers share):
#: 1000 entries of a few hundred bytes each: a screenful of history many times over for
#: about 0.5 MB of Redis; older loads stay reachable by id while their reports are kept.
RECENT_MAXLEN = 1000
