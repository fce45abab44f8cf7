"""Exact resume: a run stopped by SIGTERM or killed by SIGKILL, then resumed,
ends bit-for-bit where an uninterrupted run of the same length ends.

The runs are real `python -m d2v_jax.train` processes on a tiny model; they
share a persistent compilation cache so only the first one compiles.
"""

import json
import os
import random
import signal

import numpy as np
import pytest

from d2v_jax.train import PREEMPTED_EXIT_CODE

from helpers import (checkpoint_steps, env_with_cache, finish, image_folder_run, load_state,
                     logged_steps, losses, make_image_folder, start, wait_for)

NUM_STEPS, EVERY = 60, 10


@pytest.mark.slow  # four `python -m d2v_jax.train` processes
def test_sigterm_then_sigkill_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    data_path = make_image_folder(str(tmp_path / "images"))
    overrides = image_folder_run(data_path, num_steps=NUM_STEPS, checkpoint_every=EVERY)
    env = env_with_cache(str(tmp_path / "jax_cache"))

    # The reference: one uninterrupted run.
    ref = str(tmp_path / "ref")
    assert finish(start(ref, overrides, env)) == 0
    assert checkpoint_steps(ref)[-1] == NUM_STEPS

    run = str(tmp_path / "run")
    # 1. SIGTERM at a random step before the first periodic checkpoint: the run
    #    saves the step it is at and exits with PREEMPTED_EXIT_CODE.
    term_at = rng.randrange(2, EVERY - 1)
    proc = start(run, overrides, env)
    wait_for(lambda: len(logged_steps(run)) >= term_at, proc, f"step {term_at} (seed {seed})")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == PREEMPTED_EXIT_CODE, f"seed {seed}"
    saved = checkpoint_steps(run)[-1]
    assert saved >= term_at, (saved, term_at, seed)
    # No step lost: the last step the run made is the step it saved.
    assert logged_steps(run)[-1] == saved, (logged_steps(run), saved, seed)

    # 2. Resume, then SIGKILL at a random step after the next periodic
    #    checkpoint: the steps since the newest checkpoint are lost and redone.
    kill_ckpt = (saved // EVERY + 1) * EVERY
    kill_at = kill_ckpt + rng.randrange(1, EVERY)
    proc = start(run, overrides, env)
    wait_for(lambda: kill_ckpt in checkpoint_steps(run) and logged_steps(run)[-1] >= kill_at,
             proc, f"checkpoint {kill_ckpt} and step {kill_at} (seed {seed})")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL, f"seed {seed}"
    killed_at = logged_steps(run)[-1]
    assert killed_at >= checkpoint_steps(run)[-1] >= kill_ckpt, (killed_at, checkpoint_steps(run), seed)

    # 3. Resume to the end.
    assert finish(start(run, overrides, env)) == 0, f"seed {seed}"

    a, b = load_state(ref, NUM_STEPS), load_state(run, NUM_STEPS)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("/opt_state") for k in a) and any(k.startswith("/ema_params") for k in a)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"seed {seed}: {different[:5]}"
    # Each step logged once, with the same loss as the uninterrupted run: the
    # data stream, the masks and the RNG resumed exactly.
    assert sorted(logged_steps(run)) == list(range(1, NUM_STEPS + 1))
    assert losses(run) == losses(ref), f"seed {seed}"
    with open(os.path.join(run, "checkpoints", str(NUM_STEPS), "data_iter", "process_0-of-1.json")) as f:
        assert json.load(f) == {"next_index": NUM_STEPS}
