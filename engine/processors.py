"""Attention processors that wrap diffusers' own: the base both cache taps (Flux KV, UNet O) install once per block.

diffusers configures a module's processor by attribute (e.g. the attention backend, or reading
`processor.is_cross_attention`); a wrapper must pass those through to the processor it wraps, or the model
behaves differently with the taps installed. Only the names in `_own` live on the wrapper.
"""
from __future__ import annotations


class WrappingProcessor:
    """`original` (diffusers' processor), the block index it serves and the model that owns it; every other
    attribute read or written goes to `original`."""

    _own = ("original", "block", "owner")

    def __init__(self, original, block: int, owner):
        self.original, self.block, self.owner = original, block, owner

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "original"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.original, name, value)
