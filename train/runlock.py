"""One trainer per run folder: an exclusive lock on OUT_DIR/.lock for the whole run.

The lock is fcntl.flock on an open file. The kernel releases a flock when the
file's last descriptor closes, which includes the death of the process by any
signal (SIGKILL too), so a lock left by a killed trainer never blocks the next
one: there is no stale-lock clean-up to get wrong. The file also records the
holder's pid and host, only so that a refused trainer can say who holds it;
the record is never used to decide anything.

flock works between processes of one machine (and on local filesystems); two
machines sharing OUT_DIR over NFS are not guarded by it.

Under torchrun only rank 0 takes the lock (the other ranks write nothing to the
run folder); the trainer does:

    with RunLock(out) if info.is_main else contextlib.nullcontext():
        ... train ...
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(SystemExit):
    """Another live process holds the run folder; the message (one line) names both."""


class RunLock:
    def __init__(self, out_dir):
        self.folder = Path(out_dir)
        self.path = self.folder / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        # "a+": never truncate before we hold the lock, or we would wipe the holder's record
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunFolderBusy(f"error: run folder {self.folder} is in use by {holder}; wait for it to "
                                    "finish or stop it, or set OUT_DIR to another folder") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            # the record stays: an unlocked file means nobody holds the folder
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(record: str) -> str:
    try:
        info = json.loads(record)
        return f"process {int(info['pid'])} on {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"
