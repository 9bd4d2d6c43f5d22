"""The compute library: models, template caches, mask-aware edits. No RPC or object-store code here."""
