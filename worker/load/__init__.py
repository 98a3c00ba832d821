"""One load from source to report: supervisor, signature, failure memory, child, limits."""
