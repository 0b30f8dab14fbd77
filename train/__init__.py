"""The trainer: one loop for every model family, configured only by the generated settings."""
