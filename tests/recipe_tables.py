"""Recipe tables: official values held by a test, checked against an
experiment file and rendered into docs/recipes.md.

A table is `{experiment: [(config key or None, official value, source), ...]}`
with `{(experiment or "*", key): reason}` deviations. tests/test_recipes.py
(pretraining) and tests/test_finetune_recipes.py (fine-tuning protocols) hold
their rows; this module compares, formats and writes them.
"""

from __future__ import annotations

import math
from typing import Callable


def derive(base, sources, overrides):
    """A larger model's rows: `base` in order, sources rewritten by `sources`
    (old -> new), rows whose key is in `overrides` replaced by its (value, source)."""
    rows = []
    for key, value, source in base:
        for a, b in sources.items():
            source = source.replace(a, b)
        if key in overrides:
            value, source = overrides[key]
        rows.append((key, value, source))
    return rows


def ours(config, key):
    value = config
    for part in key.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, (list, tuple)) else value


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return (a is not None and b is not None and not isinstance(a, str)
                and not isinstance(b, str) and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def deviation(deviations: dict, experiment: str, key: str | None, official=None) -> str | None:
    """The reason a row deviates (None: it must equal the official value).
    A row without a config field is looked up as `doc:<official>`."""
    if key is None:
        key = f"doc:{official}"
    for k in ((experiment, key), ("*", key)):
        if k in deviations:
            return deviations[k]
    return None


def wrong_values(rows, config, deviations: dict, experiment: str,
                 doc_rows_need_notes: bool = False) -> list[str]:
    """The rows whose value differs from the official one without a listed
    deviation; raises AssertionError for a key listed twice, a deviation
    that no longer deviates, or (optionally) a doc row without a note."""
    keys = [k for k, _, _ in rows if k is not None]
    assert len(keys) == len(set(keys)), "a key listed twice"
    wrong = []
    for key, official, source in rows:
        if key is None:
            if doc_rows_need_notes:
                assert deviation(deviations, experiment, None, official), (
                    f"doc row {official!r} has no note")
            continue
        value = ours(config, key)
        if deviation(deviations, experiment, key) is not None:
            assert not same(value, official), (
                f"{key} now equals the official value: drop its deviation")
        elif not same(value, official):
            wrong.append(f"{key}: ours {value!r} != official {official!r} ({source})")
    return wrong


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v).replace("|", "\\|")


def render(recipes: dict, titles: dict, deviations: dict, load: Callable, heading: Callable,
           order=None) -> str:
    """One markdown table per experiment: key, ours, official, source, difference."""
    out = []
    for experiment in order or recipes:
        config = load(experiment)
        out += [f"### {heading(experiment)}: {titles[experiment]}", "",
                "| key | ours | official | source | difference |", "|---|---|---|---|---|"]
        for key, official, source in recipes[experiment]:
            reason = deviation(deviations, experiment, key, official)
            if key is None:
                note = (reason if reason and reason.startswith("as official")
                        else f"**deviation**: {reason}" if reason
                        else "as official (fixed in the model)")
                out.append(f"| (no field) | - | {fmt(official)} | {source} | {note} |")
                continue
            mark = f"**deviation**: {reason}" if reason else ""
            out.append(f"| `{key}` | {fmt(ours(config, key))} | {fmt(official)} | {source} | "
                       f"{mark} |")
        out.append("")
    return "\n".join(out)


def generated_part(doc: str, begin: str, end: str) -> str:
    with open(doc) as f:
        text = f.read()
    assert begin in text and end in text, f"{doc} lacks the markers {begin!r} / {end!r}"
    return text[text.index(begin) + len(begin):text.index(end)].strip()


def rewrite(doc: str, begin: str, end: str, body: str) -> None:
    with open(doc) as f:
        text = f.read()
    head, tail = text[:text.index(begin) + len(begin)], text[text.index(end):]
    with open(doc, "w") as f:
        f.write(head + "\n\n" + body.strip() + "\n\n" + tail)
