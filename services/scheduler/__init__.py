"""The scheduler service: worker registry, admission, placement policies, forwarding to workers."""
