"""Pieces every service shares: object store access and a local S3 server for tests and `make run`."""
