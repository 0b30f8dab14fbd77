"""Kernel-style configuration: Kconfig files -> .config -> generated/settings.py.

Run as `python -m scripts.kconfig <command>` from the repository root (the
Makefile does). The trainer only needs `scripts.kconfig.settings.load_settings`.
"""
