"""The local mesh: every service on one machine, for `make run`, `instgenie up` and end-to-end tests."""
