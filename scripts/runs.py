"""Training many configurations, each in its own process and run folder: the runner behind
`make compare`, `make sweep` and `make check-presets`.

A job is (name, settings overrides, seed). The name is a configuration --
a defconfig, optionally followed by fragments merged in order
(`gpt2-tiny+spam-paper+spikes`) -- optionally followed by `/<label>` that tells
apart jobs of one configuration with different overrides
(`gpt2-tiny/LR=1e-3,SPAM_THETA=50`). Job (name, overrides, seed) trains in
OUT/<name>/seed<seed>/, whose .config is built with the ordinary config tool
(defconfig + fragments, then setconfig OUT_DIR, SEED, the common settings and
the job's overrides, then settings), so every run is one a user could have
started by hand.

Finished runs are reused and unfinished ones resume from their checkpoint, so an
interrupted batch of jobs is continued by running the same command again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

DEFCONFIG_DIR = Path("defconfigs")
FRAGMENT_DIR = DEFCONFIG_DIR / "fragments"

# The trainer, as `make train` runs it; tests replace it with a stand-in to exercise failures.
TRAIN_COMMAND = [sys.executable, "-m", "train"]
KCONFIG_COMMAND = [sys.executable, "-m", "scripts.kconfig"]


class CompareError(Exception):
    """A user error: bad configuration name, invalid setting. The message is one line."""


# --------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Entry:
    """One configuration: a defconfig and the fragments merged onto it."""
    name: str
    defconfig: Path
    fragments: tuple[Path, ...]


_NAME_PART = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_entry(name: str) -> Entry:
    """"gpt2-tiny+spam-paper" -> defconfigs/gpt2-tiny + defconfigs/fragments/spam-paper.config."""
    parts = name.split("+")
    if not all(_NAME_PART.match(p) for p in parts):
        raise CompareError(f"{name!r} is not a configuration name (<defconfig>[+<fragment>...])")
    defconfig = DEFCONFIG_DIR / parts[0]
    if not defconfig.is_file():
        known = sorted(p.name for p in DEFCONFIG_DIR.iterdir() if p.is_file()) if DEFCONFIG_DIR.is_dir() else []
        raise CompareError(f"{name}: no defconfig {defconfig} (available: {', '.join(known) or 'none'})")
    fragments = []
    for part in parts[1:]:
        path = FRAGMENT_DIR / f"{part}.config"
        if not path.is_file():
            known = sorted(p.stem for p in FRAGMENT_DIR.glob("*.config"))
            raise CompareError(f"{name}: no fragment {path} (available: {', '.join(known) or 'none'})")
        fragments.append(path)
    return Entry(name, defconfig, tuple(fragments))


def entry_of(job_name: str) -> Entry:
    """The configuration of a job name "<configuration>[/<label>]"."""
    configuration, _, label = job_name.partition("/")
    if "/" in label or label in (".", ".."):
        raise CompareError(f"{job_name!r}: a job name is <configuration>[/<label>], the label one folder name")
    return parse_entry(configuration)


def kconfig(args: list[str], config_path: Path) -> str:
    """Run the config tool on `config_path`; its one-line error becomes a CompareError."""
    env = dict(os.environ, KCONFIG_CONFIG=str(config_path))
    proc = subprocess.run(KCONFIG_COMMAND + args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CompareError(lines[-1] if lines else f"config tool failed: {' '.join(args)}")
    return proc.stdout


def build_config(entry: Entry, config_path: Path, assignments: list[str]) -> None:
    """defconfig (+ fragments, in order), then the validated setter for `assignments`."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    fragment_args = [arg for f in entry.fragments for arg in ("--fragment", str(f))]
    kconfig(["defconfig", str(entry.defconfig), *fragment_args], config_path)
    if assignments:
        kconfig(["setconfig", *assignments], config_path)


# --------------------------------------------------------------------------- jobs

@dataclass
class Job:
    name: str  # "<configuration>[/<label>]": the report groups seeds by it
    entry: Entry
    sets: tuple[str, ...]  # this job's own settings, applied after the common ones
    seed: int
    run_dir: Path
    number: int  # 1-based, for progress lines
    status: str = "pending"  # done | reused | failed | interrupted | not started | pending
    error: str = ""
    seconds: float = 0.0
    resumed: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} seed{self.seed}"


def plan_jobs(specs, out: Path) -> list[Job]:
    """(name, overrides, seed) tuples -> Jobs in OUT/<name>/seed<seed>/. A bad name raises CompareError."""
    jobs = []
    for number, (name, sets, seed) in enumerate(specs, 1):
        jobs.append(Job(name, entry_of(name), tuple(sets), int(seed), out / name / f"seed{seed}", number))
    keys = [(j.name, j.seed) for j in jobs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CompareError(f"job {dup[0]} seed {dup[1]} is listed twice")
    return jobs


def run_is_finished(run_dir: Path) -> bool:
    """summary.json says every step ran, with the .config we just built (not an older one)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if summary.get("steps") is None or summary.get("steps") != summary.get("total_iters"):
        return False
    kept = run_dir / "config"  # the trainer's copy of the .config it ran with
    return not kept.is_file() or kept.read_bytes() == (run_dir / ".config").read_bytes()


_TQDM_BAR = re.compile(r"\d+/\d+ \[[^\]]*\]\s*$")


def last_error_line(stderr_tail: str) -> str:
    """The last line of a run's stderr that is not a progress bar."""
    for line in reversed(re.split(r"[\r\n]+", stderr_tail)):
        line = line.strip()
        if line and not _TQDM_BAR.search(line):
            return line
    return "no error message (see train.log)"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Runner:
    """Runs jobs, JOBS at a time, each trainer in its own session so that Ctrl-C reaches
    only us; we then ask every running trainer to checkpoint and stop (one SIGTERM)."""

    def __init__(self, jobs: int, common: list[str], say, *, threads: int | None = None,
                 train_command: list[str] | None = None):
        self.jobs = jobs
        self.common = list(common)
        self.say = say
        self.threads = threads or max(1, available_cores() // jobs)
        self.train_command = list(train_command or TRAIN_COMMAND)
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.total = 0
        self._started = time.perf_counter()
        self._ended = 0  # jobs finished, failed or reused

    def _tag(self, job: Job) -> str:
        return f"[{job.number}/{self.total}] {job.label}"

    def _eta(self) -> str:
        """Progress and the time left, from the mean time per job so far (reused jobs count as free)."""
        with self._lock:
            self._ended += 1
            ended = self._ended
        left = self.total - ended
        elapsed = time.perf_counter() - self._started
        if not left:
            return f"{ended}/{self.total} ended"
        return f"{ended}/{self.total} ended, about {elapsed / ended * left / 60:.0f} min left"

    def run_all(self, todo: list[Job]) -> None:
        self.total = len(todo)
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = {pool.submit(self._run_guarded, job) for job in todo}
        try:
            while futures:
                _, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            self.stopping.set()
            self.say("interrupted: asking the running trainers to checkpoint and stop "
                     "(run the same command again to resume)")
            with self._lock:
                for proc in self._procs:
                    proc.send_signal(signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            for job in todo:
                if job.status == "pending":
                    job.status = "not started"
            raise
        pool.shutdown(wait=True)

    def _run_guarded(self, job: Job) -> None:
        try:
            self._run_one(job)
        except Exception as e:  # e.g. a full disk: report it with the run, keep the others going
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            self.say(f"{self._tag(job)}: FAILED: {job.error}")

    def _run_one(self, job: Job) -> None:
        if self.stopping.is_set():
            job.status = "not started"
            return
        t0 = time.perf_counter()
        run_dir = job.run_dir
        try:
            build_config(job.entry, run_dir / ".config",
                         [f"OUT_DIR={run_dir}", f"SEED={job.seed}", *self.common, *job.sets])
            kconfig(["settings", str(run_dir / "settings.py")], run_dir / ".config")
        except CompareError as e:
            job.status, job.error = "failed", str(e)
            self.say(f"{self._tag(job)}: FAILED to configure: {e}")
            return
        if self.stopping.is_set():
            job.status = "not started"
            return
        if run_is_finished(run_dir):
            job.status = "reused"
            self.say(f"{self._tag(job)}: skipped (done); {self._eta()}")
            return
        ckpts = run_dir / "checkpoints"
        # a checkpoint file, or the folder of a sharded (FSDP) one; not a leftover (.tmp, .old)
        job.resumed = ckpts.is_dir() and any(not p.name.endswith((".tmp", ".old")) for p in ckpts.glob("ckpt_*"))
        self.say(f"{self._tag(job)}: started{' (resuming from checkpoint)' if job.resumed else ''}"
                 f" -> {run_dir}/train.log")
        rc, tail = self._train(run_dir)
        job.seconds = time.perf_counter() - t0
        if rc == 0 and run_is_finished(run_dir):
            job.status = "done"
            self.say(f"{self._tag(job)}: finished in {job.seconds:.1f} s; {self._eta()}")
        elif self.stopping.is_set():
            job.status = "interrupted"
            self.say(f"{self._tag(job)}: stopped after {job.seconds:.1f} s (checkpoint kept)")
        else:
            job.status = "failed"
            job.error = last_error_line(tail) if rc != 0 else "trainer exited without finishing its run"
            kept = run_dir / "config"
            if kept.is_file() and kept.read_bytes() != (run_dir / ".config").read_bytes():
                job.error += " (for a comparison: OUT=<another folder>, or delete this run folder)"
            self.say(f"{self._tag(job)}: FAILED after {job.seconds:.1f} s: {job.error}; {self._eta()}")

    def _train(self, run_dir: Path) -> tuple[int, str]:
        """Trainer stdout and stderr (its tqdm bar) go to train.log; returns (exit code, stderr tail)."""
        threads = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        with open(run_dir / "train.log", "ab", buffering=0) as log:
            log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"{' '.join(self.train_command[1:])} --settings {run_dir / 'settings.py'}\n".encode())
            proc = subprocess.Popen([*self.train_command, "--settings", str(run_dir / "settings.py")],
                                    stdout=log, stderr=subprocess.PIPE, env=env, start_new_session=True)
            with self._lock:
                self._procs.add(proc)
            if self.stopping.is_set():  # Ctrl-C came while we were starting it
                proc.send_signal(signal.SIGTERM)
            tail = b""
            while chunk := proc.stderr.read1(65536):
                log.write(chunk)
                tail = (tail + chunk)[-8192:]
            rc = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        return rc, tail.decode("utf-8", "replace")


def run_jobs(jobs: list[Job], *, parallel: int = 1, common=(), say=print, threads: int | None = None,
             train_command: list[str] | None = None) -> bool:
    """Train `jobs` (from plan_jobs), `parallel` at a time; True when interrupted (Ctrl-C, SIGTERM).

    Each job's status and error say what happened; nothing is raised for a failed run.
    """
    runner = Runner(parallel, list(common), say, threads=threads, train_command=train_command)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runner.run_all(jobs)
    except KeyboardInterrupt:
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def read_jsonl_records(path: Path) -> list[dict]:
    """The records of a .jsonl log; a line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
