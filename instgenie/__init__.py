"""InstGenIE: serving masked image editing with mask-aware activation caching."""
__version__ = "0.1.0"
