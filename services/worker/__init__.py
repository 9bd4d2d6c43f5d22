"""The worker service: one process per accelerator hosting one engine loop and the host cache tier."""
