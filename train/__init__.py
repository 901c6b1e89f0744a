"""Training the built-in default model (see train/README.md)."""
