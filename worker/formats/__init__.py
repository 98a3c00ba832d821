"""Model formats: strict header inspection, in the supervisor, before any loader sees a file."""
