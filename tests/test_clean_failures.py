"""Clean failures: every bad input to a command line ends in one
`error:` line (and at most one `hint:` line) on stderr, exit code 2, no
traceback; the work dir is byte-for-byte as it was and every checkpoint in
it still loads. The CLIs' `main(argv)` run in-process (fast); one real
`python -m d2v_jax.train` proves the subprocess path.
"""

import hashlib
import logging
import os
import re

import jax
import numpy as np
import pytest

from d2v_jax import checkpoint, errors, modalities, optim, train
from d2v_jax.config import load_config, set_field
from d2v_jax.convert.__main__ import main as convert_main
from d2v_jax.finetune.__main__ import main as finetune_main

from helpers import (AUDIO, FINETUNE, IMAGE, MOLECULES, TEXT, TINY_AUDIO, TINY_TEXT,
                     image_folder_run, make_image_folder, run_cli, tiny_config, write_text,
                     write_text_corpus, write_wav_class_folders)


# --- fixtures: one prior run and the bad inputs, made once -------------------------------
def _hash_tree(path: str):
    """sha256 over every path and file's bytes under `path` (None if absent)."""
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(d, name)
            h.update(os.path.relpath(full, path).encode())
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _random_state(abstract):
    """A TrainState of the abstract one's shapes with random values, made
    without compiling the model's init (the checks read shapes; the restore
    test compares values)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                        if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype),
                        abstract)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prior image run (a step-1 checkpoint of the tiny model and its
    config.json) and every bad input of the table."""
    root = tmp_path_factory.mktemp("clean")
    w = {"root": str(root)}
    w["images"] = make_image_folder(root / "images", n=4)
    config = tiny_config("image", **image_folder_run(w["images"]))
    model = modalities.build_model(config)
    tx, _ = optim.make_optimizer(config)
    w["abstract"] = train.abstract_train_state(config, model, tx)
    w["config"], w["state"] = config, _random_state(w["abstract"])
    state = w["state"]
    w["run"] = str(root / "run")
    manager = checkpoint.make_manager(w["run"], config)
    checkpoint.save(manager, 1, state, config)
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(w["run"], "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    w["params"] = jax.device_get(state.params)

    # The run reads one batch before it writes anything: these folders hold only
    # the bad file, so that batch has it. (A bad file met later stops the run with
    # the same one-line error; its checkpoints are kept.)
    w["truncated"] = make_image_folder(root / "truncated", n=4)
    for i in range(4):
        with open(os.path.join(w["truncated"], "a", f"{i:03d}.png"), "r+b") as f:
            f.truncate(20)
    w["fake_jpg"] = str(root / "fake_jpg")
    os.makedirs(os.path.join(w["fake_jpg"], "a"))
    for i in range(4):
        write_text(os.path.join(w["fake_jpg"], "a", f"notes{i}.jpg"), "this is text, not a JPEG")
    os.makedirs(root / "empty_class" / "cats")
    w["empty_class"] = str(root / "empty_class")
    w["corpus"] = write_text_corpus(root / "corpus.txt", copies=20)
    w["latin1"] = write_text(root / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 3)
    w["no_smiles"] = write_text(root / "mols.csv", "name,target\nethanol,1.0\nbenzene,2.0\n")
    w["bad_smiles"] = write_text(root / "bad.csv", "smiles\nCCO\nC1=CC=CC=C1\nCC$$O\n")
    clips = root / "clips"
    write_wav_class_folders(clips, sizes={"go": 2})
    write_text(clips / "go" / "broken.wav", "RIFF? no, just text")
    w["clips"] = str(clips)
    w["tsv"] = write_text(root / "labels.tsv", "text\ttopic\nhello there\ta\nbye now\tb\n")
    return w


def _overrides(d: dict) -> list[str]:
    """{"model.dim": 32, ...} -> ["--config.model.dim=32", ...] (tuples without spaces)."""
    def fmt(v):
        return "(" + ",".join(map(str, v)) + ",)" if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={fmt(v)}" for k, v in d.items()]


def _train(w, spec, workdir, **overrides):
    return ["train", f"--config={spec}", f"--workdir={workdir}", *_overrides(overrides)]


def _image(w, workdir=None, **overrides):
    run = image_folder_run(w["images"])
    run.pop("data.path")
    return _train(w, f"{IMAGE}:tiny_v2", workdir or w["run"],
                  **{**run, "data.path": w["images"], **overrides})


def _text(w, **overrides):
    return _train(w, f"{TEXT}:tiny_v2", w["run"], **{**TINY_TEXT, "data.source": "text",
                                                     "data.batch_size": 2, **overrides})


def _smiles(w, **overrides):
    return _train(w, f"{MOLECULES}:tiny_v2", w["run"],
                  **{**TINY_TEXT, "data.source": "smiles", "data.batch_size": 2, **overrides})


def _audio(w, **overrides):
    return _train(w, f"{AUDIO}:tiny_v2", w["run"],
                  **{**TINY_AUDIO, "data.source": "audio_folder", "data.path": w["clips"],
                     "data.batch_size": 2, **overrides})


# (name, argv builder, text the error line must contain, text the hint must contain or None)
CASES = [
    ("misspelt override", lambda w: _image(w, **{"model.dimm": 48}),
     "config has no field 'model.dimm'", "'model.dim'"),
    ("misspelt section", lambda w: _image(w, **{"modle.dim": 48}), "no field 'modle.dim'",
     "'model.dim'"),
    ("override of the wrong type", lambda w: _image(w, **{"model.dim": "wide"}),
     "--config.model.dim=wide", None),
    ("zero batch size", lambda w: _image(w, **{"data.batch_size": 0}),
     "config.data.batch_size: 0 < 1", None),
    ("unknown optimizer schedule", lambda w: _image(w, **{"optim.schedule": "cosin"}),
     "optim.schedule='cosin'", None),
    ("unknown experiment arg", lambda w: ["train", f"--config={IMAGE}:huge_v2",
                                          f"--workdir={w['run']}"], "bad config arg 'huge_v2'", None),
    ("missing experiment file", lambda w: ["train", "--config=experiments/imgae.py:tiny_v2",
                                           f"--workdir={w['run']}"], "'experiments/imgae.py' does not exist", None),
    ("missing --workdir", lambda w: ["train", f"--config={IMAGE}:tiny_v2"], "--workdir", "--help"),
    ("unknown flag", lambda w: _image(w) + ["--wokdir=x"], "Unknown command line flag 'wokdir'", None),
    ("work dir is a file", lambda w: _image(w, workdir=w["tsv"]), "is a file, not a folder", None),
    ("image: truncated PNG", lambda w: _image(w, **{"data.path": w["truncated"]}),
     "cannot decode image file", None),
    ("image: text file named .jpg", lambda w: _image(w, **{"data.path": w["fake_jpg"]}),
     "cannot identify image file", None),
    ("image: empty class folder", lambda w: _image(w, **{"data.path": w["empty_class"]}),
     "no images with extensions", "one folder per class"),
    ("image: no such folder", lambda w: _image(w, **{"data.path": w["root"] + "/nope"}),
     "/nope' does not exist", "one folder per class"),
    ("image: checkpoint of another model size", lambda w: _image(w, **{"model.dim": 48}),
     "does not fit the current config", "config.json"),
    ("image: --init_from of another size", lambda w: _image(
        w, workdir=os.path.join(w["root"], "fresh"), **{"model.dim": 48}) + [f"--init_from={w['run']}"],
     "does not fit the current config", "--init_from"),
    ("text: corpus glob matching nothing", lambda w: _text(w, **{"data.path": w["root"] + "/*.md"}),
     "no file matches", None),
    ("text: corpus not UTF-8", lambda w: _text(w, **{"data.path": w["latin1"]}),
     "latin1.txt:1: not valid UTF-8", None),
    ("text: good corpus, image checkpoint in the work dir", lambda w: _text(
        w, **{"data.path": w["corpus"]}), "does not fit the current config", "config.json"),
    ("smiles: CSV without the SMILES column", lambda w: _smiles(w, **{"data.path": w["no_smiles"]}),
     "no column 'smiles'", None),
    ("smiles: invalid SMILES", lambda w: _smiles(w, **{"data.path": w["bad_smiles"],
                                                      "data.on_invalid": "error"}), "CC$$O", None),
    ("audio: .wav that is not audio", lambda w: _audio(w), "broken.wav", None),
    ("audio: misspelt holdout_fraction", lambda w: _audio(w, **{"data.holdout_fractoin": 0.2}),
     "config has no field 'data.holdout_fractoin'", "'data.holdout_fraction'"),
    ("audio: holdout_fraction of an unlabeled manifest", lambda w: _audio(
        w, **{"data.source": "manifest", "data.path": w["root"], "data.holdout_fraction": 0.2}),
     "config.data.holdout_fraction: 0.2 with data.source='manifest'", None),
    ("text: holdout_fraction of an unlabeled corpus", lambda w: _text(
        w, **{"data.path": w["corpus"], "data.holdout_fraction": 0.2}),
     "config.data.holdout_fraction: 0.2 with data.source='text'", None),
    ("finetune: text scratch without --config.backbone", lambda w: [
        "finetune", f"--config={FINETUNE}:text_tsv", f"--workdir={w['run']}",
        f"--config.data.path={w['tsv']}"], "config.backbone is empty", "--config.backbone"),
    ("finetune: TSV without the label column", lambda w: [
        "finetune", f"--config={FINETUNE}:text_tsv", f"--workdir={w['run']}",
        f"--config.data.path={w['tsv']}", f"--config.backbone={TEXT}:tiny_v2"],
     "no column 'label'", None),
    ("finetune: --init_from of another modality", lambda w: [
        "finetune", f"--config={FINETUNE}:text_tsv", f"--workdir={w['run']}",
        f"--config.data.path={w['tsv']}", f"--init_from={w['run']}"],
     "holds a 'image' model", None),
    ("convert: no checkpoint", lambda w: [
        "convert", "jax-to-hf", "--workdir", w["root"] + "/nope", "--out", w["run"] + "/hf"],
     "does not exist", None),
    ("convert: missing argument", lambda w: ["convert", "jax-to-hf", "--out", w["run"] + "/hf"],
     "required: --workdir", "--help"),
]

MAINS = {"train": train.main, "finetune": finetune_main, "convert": convert_main}


def _call(argv):
    """(exit code, stdout, stderr) of a CLI's main(argv), in-process."""
    cli, *args = argv
    if cli == "convert":
        return MAINS[cli](args)
    return MAINS[cli]([f"d2v_jax.{cli}", *args])


@pytest.mark.parametrize("name, argv, message, hint", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(world, capsys, name, argv, message, hint):
    argv = argv(world)
    workdirs = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")] + [world["run"]]
    before = {d: _hash_tree(d) for d in workdirs}
    code = _call(argv)
    out, err = capsys.readouterr()
    assert code == errors.EXIT_USER_ERROR, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, err
    i = starts[0]
    assert message in lines[i], lines[i]
    rest = lines[i + 1:]
    assert rest == [] or (len(rest) == 1 and rest[0].startswith("hint: ")), err
    if hint is not None:
        assert rest and hint in rest[0], err
    # The work dir, and any other it names, byte-for-byte as before; a new one not created.
    assert {d: _hash_tree(d) for d in workdirs} == before
    params, _ = checkpoint.restore_params(world["run"])
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(world["params"])))


def test_there_are_enough_cases_over_every_modality():
    names = [c[0] for c in CASES]
    assert len(names) >= 15
    for modality in ("image", "text", "smiles", "audio"):
        assert any(n.startswith(modality + ":") for n in names), modality


def test_debug_shows_the_traceback(world, monkeypatch):
    argv = _image(world, **{"model.dimm": 48})
    with pytest.raises(errors.ConfigKeyError, match="model.dimm"):
        _call(argv + ["--debug"])
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(errors.ConfigKeyError):
        _call(argv)


def test_programming_errors_keep_their_traceback(monkeypatch):
    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        errors.run(bug)
    # Wrapped user errors (a loader thread's `raise ... from`) are found; others are not.
    try:
        try:
            raise errors.DataError("bad file x.png")
        except errors.DataError as e:
            raise RuntimeError("worker failed") from e
    except RuntimeError as wrapped:
        assert str(errors.find_user_error(wrapped)) == "bad file x.png"
    assert errors.find_user_error(ValueError("plain")) is None


def test_a_run_stopped_by_a_guard_exits_3(capsys):
    def explode():
        raise train.NonFiniteError("non-finite training at step 3: loss=nan")
    assert errors.run(explode, stopped=(train.NonFiniteError, train.CollapseError)) == 3
    assert capsys.readouterr().err == "error: non-finite training at step 3: loss=nan\n"


def test_convert_reports_its_devices_first(world, capsys):
    assert convert_main(["jax-to-hf", "--workdir", world["root"] + "/nope", "--out", "x"]) == 2
    first = capsys.readouterr().err.split("\n")[0]
    assert first == f"convert jax-to-hf: {jax.device_count()} {jax.default_backend()} device" + \
        ("s" if jax.device_count() > 1 else "") + " (the conversion runs on the host)", first


def test_python_api_names_the_key_and_its_neighbours():
    config = load_config(f"{IMAGE}:tiny_v2")
    with pytest.raises(KeyError) as e:  # a ConfigKeyError is a KeyError (and a ValueError)
        set_field(config, "train.num_stpes", 3)
    assert str(e.value) == "config has no field 'train.num_stpes'"  # no repr quoting
    assert "'train.num_steps'" in e.value.hint
    with pytest.raises(errors.ConfigKeyError, match="data.holdout_fractio'"):
        load_config(f"{AUDIO}:tiny_v2", {"data.holdout_fractio": 0.2})
    assert errors.nearest("model.dimm", errors.config_keys(config))[0] == "model.dim"


@pytest.mark.slow  # a subprocess that imports jax (~5 s); the table above runs main() in-process
def test_subprocess_prints_two_lines_and_no_traceback():
    proc = run_cli("train", f"--config={IMAGE}:tiny_v2", "--workdir=/nonexistent/never",
                   "--config.model.dimm=3")
    assert proc.returncode == 2, proc.output
    assert proc.stderr.strip().split("\n") == ["error: config has no field 'model.dimm'",
                                               "hint: did you mean 'model.dim'?"], proc.stderr
    assert not os.path.exists("/nonexistent/never")


@pytest.mark.parametrize("victim", ["metadata", "data"])
def test_corrupt_checkpoint_fallback_names_step_and_file(tmp_path, world, caplog, victim):
    config, state = world["config"], world["state"]
    manager = checkpoint.make_manager(str(tmp_path), config)
    checkpoint.save(manager, 1, state, config)
    checkpoint.save(manager, 2, state, config)
    manager.wait_until_finished()
    manager.close()
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    if victim == "data":
        files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir / "ocdbt.process_0") for f in fs]
        path = max(files, key=os.path.getsize)
    else:
        path = state_dir / "_METADATA"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    manager = checkpoint.make_manager(str(tmp_path), config)
    with caplog.at_level(logging.ERROR):
        _, step = checkpoint.restore_latest(manager, world["abstract"])
    manager.close()
    assert step == 1
    msg = next(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert msg.startswith("checkpoint step 2 is unreadable: "), msg
    assert msg.endswith("; restoring step 1 instead"), msg
    assert "<bound method" not in msg and "TensorStore(" not in msg, msg
    if victim == "metadata":
        assert f"{state_dir}/_METADATA: JSONDecodeError" in msg, msg
    else:  # TensorStore names the array whose bytes are cut
        assert re.search(rf"{state_dir}, array (params|ema_params|opt_state)/\S+: .*byte range",
                         msg), msg


def test_undo_additions_leaves_the_tree_as_it_was(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    before = _hash_tree(str(tmp_path))
    with pytest.raises(errors.DataError):
        with errors.undo_additions(str(tmp_path)):
            (tmp_path / "keep" / "new.txt").write_text("b")
            (tmp_path / "tokenizer").mkdir()
            (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
            raise errors.DataError("refused")
    assert _hash_tree(str(tmp_path)) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(errors.DataError):
        with errors.undo_additions(str(fresh)):
            fresh.mkdir()
            raise errors.DataError("refused")
    assert not fresh.exists()
