"""Atomic file replacement: a reader sees the old file or the new one, never a mix.

Every output of the configuration tools (.config, .config.old, defconfigs,
generated/settings.py) goes through here, so that a failed or interrupted
command leaves the previous file intact.
"""

import os
import tempfile


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_atomically(path, write):
    """Create `path` by calling write(temp_path), then rename it into place.

    The temporary file lives in the same folder as `path` (so os.replace is an
    atomic rename) and is synced to disk before the rename. If write() raises,
    the temporary file is removed and `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_current_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    write_atomically(path, write)


def write_bytes_atomically(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(path, write)


def read_bytes_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
