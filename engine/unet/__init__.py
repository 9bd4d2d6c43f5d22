"""The UNet family (Stable Diffusion inpainting): presets, O-caching of self-attention outputs, forward."""
