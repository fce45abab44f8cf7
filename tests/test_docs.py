"""The docs say only what exists: every command in a ```bash block of
README.md and docs/*.md names modules, scripts, experiment files and args,
config fields and flags that exist (parsed and checked, not run), and every
relative link resolves, anchors included.

`python tests/test_docs.py` prints the counts (commands, links).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Repository folders: a path argument under one of them must exist.
REPO_DIRS = ("experiments/", "benchmarks/", "launch/", "tests/", "docs/", "d2v_jax/", "notebooks/")
# Commands that are not ours (install, shell, other tools): skipped, not checked.
FOREIGN = {"pip", "git", "cd", "export", "echo", "cat", "tensorboard", "scontrol", "sbatch",
           "gcloud", "[", "for", "done", "do", "if", "then", "fi", "wait", "mkdir", "rm", "ls",
           "source", "nvidia-smi", "apt-get", "du", "df", "time", "curl", "wget", "kill",
           "sleep", "jupyter", "unzip", "tar", "head", "tail", "python3", "test"}


def bash_blocks(path: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the file's ```bash blocks:
    continuation lines joined, comments dropped."""
    out, block, start = [], None, 0
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        fence = line.strip()
        if block is None and re.fullmatch(r"```(bash|sh|shell)", fence):
            block = []
            continue
        if block is not None and fence == "```":
            text = "\n".join(block).replace("\\\n", " ")
            for j, cmd in enumerate(text.splitlines()):
                cmd = cmd.split(" #")[0].strip() if not cmd.lstrip().startswith("#") else ""
                if cmd:
                    out.append((start, cmd))
            block = None
            continue
        if block is not None:
            if not block:
                start = i
            block.append(line)
    return out


def _words(cmd: str) -> list[str]:
    try:
        return shlex.split(cmd, comments=True)
    except ValueError:
        return cmd.split()


def _flags_of(source: str) -> set[str]:
    """Flag names a CLI's source defines (absl DEFINE_*, argparse add_argument)."""
    with open(source) as f:
        text = f.read()
    names = set(re.findall(r"DEFINE_\w+\(\s*['\"]([\w-]+)['\"]", text))
    names |= {n.lstrip("-").replace("-", "_") for n in
              re.findall(r"add_argument\(\s*['\"](--?[\w-]+)['\"]", text)}
    names |= set(re.findall(r"DEFINE_config_file\(\s*['\"](\w+)['\"]", text))
    return names | {"help", "debug", "helpfull"}


def _module_source(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    if spec.submodule_search_locations:  # a package run with -m: its __main__
        main = os.path.join(os.path.dirname(spec.origin), "__main__.py")
        return main if os.path.exists(main) else None
    return spec.origin


_CONFIGS: dict[str, object] = {}


def _config(spec: str):
    from d2v_jax.config import load_config
    if spec not in _CONFIGS:
        _CONFIGS[spec] = load_config(spec if ":" in spec else spec)
    return _CONFIGS[spec]


def check_command(cmd: str) -> list[str]:
    """What is wrong with one documented command (empty: nothing)."""
    words = _words(cmd)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words or words[0] in FOREIGN or words[0].startswith(("$", "#", "(")):
        return []
    problems = []
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            module, args = words[2], words[3:]
            if module in ("pytest", "pip", "venv", "http.server", "jupyter", "torch.utils.bottleneck"):
                return _paths(args)
            source = _module_source(module)
            if source is None:
                return [f"no module {module!r} (python -m)"]
        elif words[1] in ("-c", "-"):  # inline code, or a script on stdin
            return []
        else:
            source, args = os.path.join(ROOT, words[1]), words[2:]
            if not os.path.exists(source):
                return [f"no script {words[1]!r}"]
    elif words[0].endswith(".sh") or words[0] in ("bash", "sh"):
        script = words[1] if words[0] in ("bash", "sh") else words[0]
        source = os.path.join(ROOT, script)
        if not os.path.exists(source):
            return [f"no script {script!r}"]
        args = words[2:] if words[0] in ("bash", "sh") else words[1:]
        if script.startswith("launch/"):  # the launchers pass the rest to the train CLI
            source = os.path.join(ROOT, "d2v_jax", "train.py")
    else:
        return []
    flags = _flags_of(source) if source.endswith(".py") else None
    config = None
    overrides = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value, i = a[2:], args[i + 1], i + 2
        elif a.startswith("--"):
            name, _, value = a[2:].partition("=")
            i += 1
        else:
            problems += _paths([a])
            i += 1
            continue
        if name.startswith("config.") or name.startswith("pretrain_overrides"):
            if name.startswith("config."):
                overrides[name[len("config."):]] = value
            continue
        base = name.split(".")[0]
        if flags is not None and base not in flags and not base.startswith("no"):
            problems.append(f"{os.path.relpath(source, ROOT)} has no flag --{name}")
        if name in ("config", "pretrain", "finetune") and ":" in value and value.startswith("experiments/"):
            try:
                config = _config(value) if name == "config" else None
                if name != "config":
                    _config(value)
            except Exception as e:  # noqa: BLE001 - reported
                problems.append(f"--{name}={value}: {type(e).__name__}: {str(e).splitlines()[0]}")
        problems += _paths([value])
    if overrides and config is not None:
        from d2v_jax.errors import missing_key_error
        for key in overrides:
            err = missing_key_error(config, key)
            if err is not None:
                problems.append(f"--config.{key}: {err}")
    return problems


def _paths(values) -> list[str]:
    out = []
    for v in values:
        path = v.split(":")[0]
        if path.startswith(REPO_DIRS) and not any(c in path for c in "*<>{}$"):
            if not os.path.exists(os.path.join(ROOT, path)):
                out.append(f"no file {path!r}")
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def links(path: str) -> list[tuple[str, str]]:
    """(link, problem or '') of every relative link in a markdown file."""
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(full):
            out.append((target, f"no file {file!r}"))
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            out.append((target, f"no heading #{anchor} in {os.path.relpath(full, ROOT)}"))
        else:
            out.append((target, ""))
    return out


def report() -> tuple[int, int, list[str]]:
    commands = link_count = 0
    problems = []
    for doc in DOCS:
        name = os.path.relpath(doc, ROOT)
        for line, cmd in bash_blocks(doc):
            commands += 1
            problems += [f"{name}:{line}: {p}  [{cmd[:100]}]" for p in check_command(cmd)]
        for target, problem in links(doc):
            link_count += 1
            if problem:
                problems.append(f"{name}: link ({target}): {problem}")
    return commands, link_count, problems


def test_every_documented_command_and_link_exists():
    commands, link_count, problems = report()
    assert commands > 50 and link_count > 20, (commands, link_count)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should():
    assert check_command("python -m d2v_jax.train --config experiments/image.py:tiny_v2 "
                         "--workdir runs/x --config.optim.lr=1e-3") == []
    assert check_command("python -m d2v_jax.trian --workdir x") == ["no module 'd2v_jax.trian' (python -m)"]
    assert "has no flag --wrkdir" in check_command(
        "python -m d2v_jax.train --config experiments/image.py:tiny_v2 --wrkdir x")[0]
    assert "model.dimm" in check_command(
        "python -m d2v_jax.train --config experiments/image.py:tiny_v2 --config.model.dimm=3")[0]
    assert check_command("python benchmarks/nope.py") == ["no script 'benchmarks/nope.py'"]
    assert "does not exist" in check_command(
        "python -m d2v_jax.train --config experiments/nope.py:tiny_v2 --workdir x")[0]
    assert "no file 'benchmarks/nope.csv'" in check_command(
        "python benchmarks/baselines.py --data benchmarks/nope.csv")
    assert _slug("Checking a mesh: `parallel.check_collectives` and `python -m d2v_jax.collectives`") == (
        "checking-a-mesh-parallelcheck_collectives-and-python--m-d2v_jaxcollectives")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    n, m, bad = report()
    print(f"{n} commands checked in {len(DOCS)} files, {m} relative links; {len(bad)} problems")
    for p in bad:
        print(" ", p)
