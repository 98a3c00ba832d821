"""How jobs arrive through arq, run once, retry and end; where the queue lives."""
