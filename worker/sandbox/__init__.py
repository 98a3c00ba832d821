"""The sandbox: a fork server, confined load children, and the one function that stops them."""
