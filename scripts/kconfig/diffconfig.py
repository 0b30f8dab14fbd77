"""Differences between two configuration files, in the Linux kernel's diffconfig format.

    -SYM old          removed (only in the first file)
     SYM old -> new   changed
    +SYM new          added (only in the second file)

Values are shown as written in the file (y, n, 42, "quoted text"), with n
for '# CONFIG_SYM is not set'. Each group is sorted by symbol name, and the
groups come in that order, as the kernel's scripts/diffconfig prints them.
This is a comparison of text: symbols unknown to the current Kconfig files
are shown too.
"""

from .strict import read_lines


def read_values(path):
    """name -> value text, the last assignment of each symbol winning."""
    return {ln.name: ("n" if ln.text is None else ln.text) for ln in read_lines(path)}


def diff_lines(old, new):
    removed = sorted(name for name in old if name not in new)
    changed = sorted(name for name in old if name in new and old[name] != new[name])
    added = sorted(name for name in new if name not in old)
    return ([f"-{name} {old[name]}" for name in removed]
            + [f" {name} {old[name]} -> {new[name]}" for name in changed]
            + [f"+{name} {new[name]}" for name in added])


def diffconfig(old_path, new_path):
    return diff_lines(read_values(old_path), read_values(new_path))
