"""Forward passes over a diffusers Flux transformer: dense reference (with cache capture) and mask-aware sparse."""
