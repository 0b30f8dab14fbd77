"""The command line of `python -m train` and `python -m train.sample`: a settings path, nothing else."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.kconfig.settings import SettingsError, load_settings


def settings_from_argv(prog: str, description: str, argv=None):
    """The settings named by --settings (default generated/settings.py), or None after
    printing why they cannot be used (missing, malformed, older than .config)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--settings", type=Path, default=Path("generated/settings.py"),
                        help="generated settings file (default: generated/settings.py, from `make settings`)")
    args = parser.parse_args(argv)
    try:
        return load_settings(args.settings), args.settings
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, args.settings
