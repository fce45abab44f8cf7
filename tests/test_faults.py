"""The faults that end long runs (docs/checkpoints.md, "Faults"):

- SIGKILL at many points inside an asynchronous checkpoint write: a restart
  restores the newest *complete* step, bitwise the uninterrupted run's, never
  a partial one, and continues to the same end;
- one process of a 2-process run (`launch/local.sh`) gets SIGTERM: every
  process saves the same step and exits 42, and the relaunch ends bitwise
  where an uninterrupted 2-process run ends; one gets SIGKILL: the other stops
  within `parallel.peer_timeout_s` with exit code 43 and a line naming the lost
  process, and the relaunch resumes from the last complete step;
- the disk fills up during a save: one line naming the checkpoints dir and
  the OS's reason (exit 3), the previous checkpoint kept and restorable.

The runs are real `python -m d2v_jax.train` processes of a tiny model sharing
one persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from d2v_jax.guards import PEER_LOST_EXIT_CODE, PREEMPTED_EXIT_CODE

from helpers import (ROOT, checkpoint_steps, env_with_cache, finish, image_folder_run, load_state,
                     logged_steps, losses, make_image_folder, start)

TMP_MARK = ".orbax-checkpoint-tmp"


def _same_state(a_dir, b_dir, step):
    a, b = load_state(a_dir, step), load_state(b_dir, step)
    assert sorted(a) == sorted(b)
    return [k for k in a if not np.array_equal(a[k], b[k])]


def _tmp_dirs(workdir):
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if TMP_MARK in n] if os.path.isdir(d) else []


@pytest.mark.slow  # six `python -m d2v_jax.train` processes
def test_sigkill_inside_async_saves_restores_the_newest_complete_step(tmp_path):
    """Every step is saved (a 1 MB state: ~10-40 ms of writing in a
    background thread). Each run is killed a different time after a save's
    temporary directory appears; what is left must restore as the newest
    finalized step, equal to the uninterrupted run's state at that step."""
    data = make_image_folder(str(tmp_path / "images"), n=16)
    kw = {**image_folder_run(data, num_steps=10, checkpoint_every=1), "train.keep_checkpoints": 100,
          "model.dim": 96, "model.num_heads": 2, "decoder.dim": 96, "probe.every": 0}
    env = env_with_cache(str(tmp_path / "cache"))
    ref = str(tmp_path / "ref")
    assert finish(start(ref, kw, env)) == 0
    assert checkpoint_steps(ref) == list(range(1, 11))

    delays = (0.0, 0.004, 0.012, 0.03)
    mid_save = 0
    for n, delay in enumerate(delays):
        run = str(tmp_path / f"kill{n}")
        proc = start(run, kw, env)
        t_seen = None
        while proc.poll() is None:  # the 3rd save onwards, `delay` after its tmp dir appears
            tmp = [d for d in _tmp_dirs(run) if int(d.split(".")[0]) >= 3]
            if tmp and t_seen is None:
                t_seen = time.perf_counter()
            if t_seen is not None and time.perf_counter() - t_seen >= delay:
                proc.send_signal(signal.SIGKILL)
                break
        assert finish(proc) == -signal.SIGKILL, f"run {n} ended before the kill"
        mid_save += bool(_tmp_dirs(run))
        steps = checkpoint_steps(run)
        assert steps and all(TMP_MARK not in str(s) for s in steps)
        newest = steps[-1]
        # What a restart restores: the newest finalized step, bitwise the reference's.
        assert not _same_state(ref, run, newest), (n, newest)
        if n == len(delays) - 1:  # restart the last one to the end
            assert finish(start(run, kw, env)) == 0
            assert not _tmp_dirs(run)  # the manager removed the partial save
            assert not _same_state(ref, run, 10)
            assert losses(run) == losses(ref)
    # Most kills landed while a save was being written (its tmp dir left behind).
    assert mid_save >= len(delays) // 2, mid_save


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, kw, env, extra_env=None):
    """launch/local.sh with 2 processes of one CPU device each."""
    argv = ["bash", os.path.join(ROOT, "launch", "local.sh"),
            *[f"--config.{k}={v}" for k, v in kw.items()]]
    e = dict(env, NPROC="2", CPU_DEVICES="1", WORKDIR=workdir, PORT=str(_free_port()),
             **(extra_env or {}))
    log = open(workdir + ".log", "ab")
    return subprocess.Popen(argv, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _pids(launcher):
    """{process id: pid} of the launcher's two trainers."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            if os.getpgid(int(pid)) != os.getpgid(launcher.pid):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"d2v_jax.train" not in f.read():
                    continue
        except (OSError, ProcessLookupError):
            continue
        for item in environ:
            if item.startswith(b"JAX_PROCESS_ID="):
                out[int(item.split(b"=")[1])] = int(pid)
    return out


def _wait_steps(workdir, launcher, n, timeout=180):
    t0 = time.time()
    while len(logged_steps(workdir)) < n:
        assert launcher.poll() is None, f"the run ended before step {n}"
        assert time.time() - t0 < timeout, f"no step {n} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow  # five 2-process launches
def test_two_process_preemption_and_a_lost_process(tmp_path):
    data = make_image_folder(str(tmp_path / "images"), n=16)
    kw = {**image_folder_run(data, num_steps=16, checkpoint_every=6), "probe.every": 0,
          "parallel.peer_timeout_s": 5}
    env = env_with_cache(str(tmp_path / "cache"))
    ref = str(tmp_path / "ref")
    assert finish(_launch(ref, kw, env)) == 0
    assert checkpoint_steps(ref)[-1] == 16

    # SIGTERM to process 1 only: both agree on a step, save it, exit 42.
    run = str(tmp_path / "term")
    launcher = _launch(run, kw, env)
    _wait_steps(run, launcher, 3)
    os.kill(_pids(launcher)[1], signal.SIGTERM)
    assert finish(launcher) == PREEMPTED_EXIT_CODE
    with open(run + ".log") as f:
        log = f.read()
    saved = [line for line in log.splitlines() if "preempted: saved step" in line]
    assert len(saved) == 2 and {s.split("[p")[1][0] for s in saved} == {"0", "1"}, saved
    steps = {s.split("saved step ")[1].split(" ")[0] for s in saved}
    assert len(steps) == 1 and int(steps.pop()) == checkpoint_steps(run)[-1]
    assert finish(_launch(run, kw, env)) == 0  # the relaunch, to the end
    assert not _same_state(ref, run, 16)
    assert losses(run) == losses(ref)

    # SIGKILL to process 1: process 0 stops within the timeout, naming it.
    run = str(tmp_path / "kill")
    launcher = _launch(run, kw, env)
    _wait_steps(run, launcher, 8)  # after the checkpoint at step 6
    pids = _pids(launcher)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    while True:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            break
        assert time.time() - t0 < 60, "process 0 still runs 60 s after losing process 1"
        time.sleep(0.05)
    took = time.time() - t0
    finish(launcher)
    with open(run + ".log") as f:
        log = f.read()
    lost = [line for line in log.splitlines() if "was lost" in line and "error:" in line]
    assert lost and "process 1 of 2 was lost" in lost[0] and f"exit code {PEER_LOST_EXIT_CODE}" in lost[0]
    assert took < 5 + 10, took
    assert checkpoint_steps(run)[-1] >= 6
    assert finish(_launch(run, kw, env)) == 0  # resumes from the last complete step
    assert not _same_state(ref, run, 16)
    assert losses(run) == losses(ref)


def _mount_tmpfs(path, size) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # two `python -m d2v_jax.train` processes
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real ENOSPC: the work dir on a tmpfs with room for one checkpoint and
    a half (root, as in CI). Without the rights to mount, a read-only
    checkpoints dir gives the same failure path (EACCES) as a non-root user."""
    data = make_image_folder(str(tmp_path / "images"), n=16)
    kw = {**image_folder_run(data, num_steps=20, checkpoint_every=5), "probe.every": 0}
    env = env_with_cache(str(tmp_path / "cache"))
    disk = str(tmp_path / "disk")
    mounted = os.geteuid() == 0 and _mount_tmpfs(disk, "4m")
    if os.geteuid() == 0 and not mounted:
        pytest.fail("running as root without the right to mount a tmpfs: the disk-full "
                    "test needs one (or run the suite as a non-root user)")
    try:
        run = os.path.join(disk, "run")
        log = str(tmp_path / "run.log")  # off the full disk
        os.makedirs(disk, exist_ok=True)
        if mounted:  # first: how big one checkpoint is, on a roomy disk
            probe_dir = str(tmp_path / "probe")
            assert finish(start(probe_dir, {**kw, "train.num_steps": 5}, env)) == 0
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                       os.walk(os.path.join(probe_dir, "checkpoints")) for f in fs)
            subprocess.run(["umount", disk], check=True)
            assert _mount_tmpfs(disk, str(int(size * 1.5) + 64 * 1024))
            proc = start(run, kw, env, log=log)
        else:
            proc = start(run, kw, env, log=log)
            while not os.path.isdir(os.path.join(run, "checkpoints", "5")):
                assert proc.poll() is None
                time.sleep(0.005)
            os.chmod(os.path.join(run, "checkpoints"), 0o555)
        code = finish(proc)
        with open(log) as f:
            out = f.read()
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 3 and len(errors) == 1, out[-3000:]
        assert errors[0].startswith(f"error: cannot write checkpoint step 10 to {run}/checkpoints: ")
        assert ("No space left on device" if mounted else "ermission denied") in errors[0]
        assert f"the last complete checkpoint, {run}/checkpoints/5, is kept" in errors[0]
        assert checkpoint_steps(run) == [5]
        # The kept step restores (its state is the one a run of 5 steps saves).
        ok = str(tmp_path / "five")
        assert finish(start(ok, {**kw, "train.num_steps": 5}, env)) == 0
        assert not _same_state(ok, run, 5)
    finally:
        if mounted:
            subprocess.run(["umount", disk], capture_output=True)
        elif os.path.isdir(os.path.join(disk, "run", "checkpoints")):
            os.chmod(os.path.join(disk, "run", "checkpoints"), 0o755)
