"""Model families and presets the engine can load."""
