"""Project tools run with `python -m scripts.<tool>` from the repository root."""
