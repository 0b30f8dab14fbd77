"""Several nodes and dying ranks: real torchrun processes on 127.0.0.1 (gloo, CPU).

Two "nodes" of one process each (torchrun's static rendezvous, as `make train
NNODES=2 NODE_RANK=i MASTER_ADDR=... MASTER_PORT=...` runs it) must train exactly
what one node with two processes trains; nodes whose settings differ must refuse
to start; a rank killed mid-run must stop the others with a clear message and
`make train` must resume from the last complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from trainutil import PY, REPO, env, make_settings, metrics, run_train

COMMON = dict(MAX_ITERS=6, CKPT_INTERVAL=2, BATCH_SIZE=4, MONITOR="n", EVAL_INTERVAL=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_cmd(settings, node_rank: int, port: int) -> list[str]:
    # the command `make train NNODES=2 NPROC=1 NODE_RANK=.. MASTER_ADDR=127.0.0.1 MASTER_PORT=..` runs
    return [PY, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--nproc_per_node=1",
            "-m", "train", "--settings", str(settings)]


def _run_nodes(settings_0, settings_1, timeout=240):
    port = _free_port()
    nodes = [subprocess.Popen(_node_cmd(s, i, port), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, s in enumerate((settings_0, settings_1))]
    try:
        # (rc, everything the node printed): torchrun interleaves its own lines
        return [(p.wait(timeout=timeout), p.stdout.read() + p.stderr.read()) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    """The reference: one node, two processes."""
    folder = tmp_path_factory.mktemp("single")
    run_train(make_settings(folder, **COMMON), nproc=2)
    return folder / "run"


def test_two_nodes_train_what_one_node_with_two_processes_trains(tmp_path, single_node):
    # each node has its own .config and run folder; only rank 0 (node 0) writes
    node0 = make_settings(tmp_path / "n0", **COMMON)
    node1 = make_settings(tmp_path / "n1", **COMMON)
    results = _run_nodes(node0, node1)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    a = [r["loss"] for r in metrics(single_node)]
    b = [r["loss"] for r in metrics(tmp_path / "n0" / "run")]
    assert len(a) == len(b) == 6 and a == b
    assert metrics(single_node, "val")[-1]["val_loss"] == metrics(tmp_path / "n0" / "run", "val")[-1]["val_loss"]


def test_nodes_with_different_settings_refuse_to_start(tmp_path):
    node0 = make_settings(tmp_path / "n0", **COMMON)
    node1 = make_settings(tmp_path / "n1", **COMMON, LR="3e-3")
    results = _run_nodes(node0, node1)
    assert all(rc != 0 for rc, _ in results)
    message = "error: rank 1 has settings that differ from rank 0's: LR;"
    assert any(message in err for _, err in results), results[0][1][-2000:]
    assert not (tmp_path / "n0" / "run" / "checkpoints").exists()  # nothing trained


def test_a_killed_rank_stops_the_others_and_the_nodes_resume(tmp_path, single_node):
    fault = dict(FAULT_INJECTION="y", FAULT_KILL_STEP=5, FAULT_KILL_RANK=1)
    nodes = [make_settings(tmp_path / f"n{i}", **COMMON, **fault) for i in range(2)]
    started = time.monotonic()
    results = _run_nodes(*nodes, timeout=120)
    assert all(rc != 0 for rc, _ in results) and time.monotonic() - started < 90  # no hang
    assert "error: rank 0 stopped at step" in results[0][1] and "another rank died or hung" in results[0][1]
    run = tmp_path / "n0" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_000000002.pt", "ckpt_000000004.pt"]

    # node 1 has no checkpoint of its own (rank 0 writes them): it resumes from rank 0's
    nodes = [make_settings(tmp_path / f"n{i}", **COMMON, **fault | {"FAULT_KILL_STEP": 0}) for i in range(2)]
    results = _run_nodes(*nodes)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "from ckpt_000000004.pt" in results[0][1]
    # exactly the training of a run that was never interrupted
    assert [x["loss"] for x in metrics(run)] == [x["loss"] for x in metrics(single_node)]


def test_a_hung_rank_stops_the_others_after_dist_timeout(tmp_path):
    # A rank that stops answering without dying (SIGSTOP: its connections stay open)
    # is noticed only by the collective's timeout, DIST_TIMEOUT_S; without it the
    # other ranks would wait forever.
    timeout_s = 10
    nodes = [make_settings(tmp_path / f"n{i}", **{**COMMON, "MAX_ITERS": 400, "CKPT_INTERVAL": 0},
                           DIST_TIMEOUT_S=timeout_s) for i in range(2)]
    port = _free_port()
    procs = [subprocess.Popen(_node_cmd(s, i, port), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, s in enumerate(nodes)]
    log = tmp_path / "n0" / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
            assert procs[0].poll() is None, procs[0].stdout.read()
            time.sleep(0.05)
        rank_1 = int(subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True,
                                    text=True).stdout.split()[0])  # node 1's torchrun runs rank 1
        os.kill(rank_1, signal.SIGSTOP)
        stopped = time.monotonic()
        rc = procs[0].wait(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped
        output = procs[0].stdout.read()
    finally:
        for p in procs:
            for child in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split():
                os.kill(int(child), signal.SIGKILL)
            p.kill()
            p.wait()
    assert rc != 0
    # at least the timeout (not a closed connection), and bounded by it (a loaded machine
    # needs a few seconds more to raise, log and exit)
    assert timeout_s - 1 <= waited <= timeout_s + 20, waited
    assert f"another rank died or hung (DIST_TIMEOUT_S={timeout_s})" in output, output[-2000:]
