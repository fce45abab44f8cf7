r"""The baselines a practitioner would try first, on a fine-tune's exact splits.

For a text / SMILES fine-tune experiment, every (label fraction, seed) point
uses exactly the rows that fine-tune trains and tests on: the task's rows
(`modalities/text/labeled.read_task`) and its splits (`data.labeled.labeled_data`:
the test split from `data.split_seed`, the label subset from
`data.label_fraction` and `seed`), so the numbers sit beside the fine-tunes'.

  SMILES regression (solubility, freesolv, smiles_csv): Morgan fingerprints
    (ECFP4: radius 2, 2048 bits, RDKit) + a random forest (sklearn
    RandomForestRegressor, 500 trees, seeded) and + ridge regression (RidgeCV:
    the penalty chosen by leave-one-out on the training subset); RMSE and MAE.
  text classification (stdlib_docs, text_tsv): TF-IDF of word 1-2 grams +
    logistic regression; accuracy and macro-F1.
  peptide / protein classification (amp): amino-acid composition and dipeptide
    composition (the 20 + 400 frequencies of residues and residue pairs, the
    usual AAC + DPC features of antimicrobial-peptide predictors) + a random
    forest (500 trees, seeded) and + logistic regression (standardized features);
    also for a text_tsv of protein sequences with `--sequences=protein` (which
    benchmarks/label_efficiency.py sets when the pretraining run's tokenizer is
    the protein one).
  and for scale, the constant predictor: the training subset's mean target
    (`train_mean`) or its most frequent class (`majority`).

  python benchmarks/baselines.py --finetune experiments/finetune.py:solubility \
      --fractions 0.05 --seeds 0,1,2 [--overrides data.path=mols.csv,...] [--out b.json]

Prints a markdown table (mean +- sample std over seeds) and writes every run
and the summary as JSON. benchmarks/label_efficiency.py adds the same rows to
its table (`--baselines`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _ROOT)

from d2v_jax import errors
from d2v_jax.config import load_config, parse_overrides
from d2v_jax.data.labeled import ArraySource, labeled_data
from d2v_jax.errors import ConfigError
from d2v_jax.finetune.steps import macro_f1, regression_metrics

HEADLINE = {"classification": "accuracy", "regression": "rmse"}


@dataclasses.dataclass
class Options:
    """The baselines' settings (each a flag of the command line)."""

    morgan_radius: int = 2  # ECFP4
    morgan_bits: int = 2048
    rf_trees: int = 500
    rf_jobs: int = 2  # the machine has 2 cores
    ridge_alphas: tuple = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # RidgeCV's candidates
    tfidf_ngrams: int = 2  # word n-grams 1..n
    tfidf_min_df: int = 1
    lr_c: float = 10.0  # inverse L2 strength of the logistic regression
    lr_max_iter: int = 2000
    kmer_max: int = 2  # peptides: residue k-mer frequencies for k = 1..kmer_max (AAC, DPC)
    # What the rows of a text classification task are: auto (by task: amp is
    # peptides, text_tsv / stdlib_docs English) | protein (your text_tsv holds
    # protein / peptide sequences: the k-mer baselines, not TF-IDF of words).
    sequences: str = "auto"


SEQUENCES = ("auto", "protein")


def models_for(config, sequences: str = "auto") -> tuple[str, ...]:
    """The baselines of a fine-tune config's task; () when it has none (images, speech).
    `sequences='protein'`: a text task's rows are protein sequences (`Options.sequences`)."""
    if sequences not in SEQUENCES:
        raise ConfigError(f"--sequences={sequences!r}; expected one of {SEQUENCES}")
    if config.modality != "text" or config.task not in HEADLINE:
        return ()
    from d2v_jax.modalities.text.labeled import PROTEIN_SOURCES, SMILES_SOURCES
    if config.data.source in SMILES_SOURCES:
        return ("rf_morgan", "ridge_morgan", "train_mean") if config.task == "regression" else ()
    if config.data.source in PROTEIN_SOURCES or sequences == "protein":
        return ("rf_kmer", "lr_kmer", "majority") if config.task == "classification" else ()
    return ("tfidf_lr", "majority") if config.task == "classification" else ()


def morgan_fingerprints(smiles, radius: int, bits: int) -> np.ndarray:
    """uint8 [N, bits]: RDKit Morgan (ECFP-like) bit vectors."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=int(radius), fpSize=int(bits))
    return np.stack([gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in smiles]
                    ).astype(np.uint8)


AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard residues


def kmer_composition(sequences, k_max: int) -> np.ndarray:
    """float32 [N, 20 + 20^2 + ... + 20^k_max]: for each k, the frequency of
    every k-mer of standard residues among the sequence's k-mers (k = 1: amino-
    acid composition, 2: dipeptide composition). K-mers with a non-standard
    residue (X, B, U, ...) are not counted; a sequence shorter than k has zeros."""
    index = {a: i for i, a in enumerate(AMINO_ACIDS)}
    blocks = []
    for k in range(1, int(k_max) + 1):
        x = np.zeros((len(sequences), 20 ** k), np.float32)
        for row, seq in enumerate(sequences):
            codes = [index.get(a, -1) for a in seq]
            n = len(codes) - k + 1
            for start in range(max(n, 0)):
                window = codes[start:start + k]
                if min(window) >= 0:
                    x[row, sum(c * 20 ** (k - 1 - j) for j, c in enumerate(window))] += 1
            x[row] /= max(n, 1)
        blocks.append(x)
    return np.concatenate(blocks, axis=1)


@dataclasses.dataclass
class Task:
    """A fine-tune's rows: texts, labels and (float64) targets, once per config."""

    config: object
    texts: list
    labels: np.ndarray
    num_classes: int | None
    features: dict = dataclasses.field(default_factory=dict)


def read(config, sequences: str = "auto") -> Task:
    from d2v_jax.modalities.text.labeled import read_task

    if not models_for(config, sequences):
        raise ConfigError(f"benchmarks/baselines.py: no baseline for the {config.modality!r} "
                          f"{config.task!r} task {config.data.source!r}; baselines exist for "
                          "SMILES regression and text classification")
    texts, labels, class_names, _ = read_task(config)
    return Task(config, texts, np.asarray(labels), len(class_names) if class_names else None)


def splits(task: Task, config) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of the fine-tune that `config` describes: the same
    function the fine-tune calls (`labeled_data`), on the same labels."""
    source = ArraySource(config.data.source, row=np.arange(len(task.texts)))
    data = labeled_data(config, source, task.labels, None, None, None)
    return data.train, data.test


def fit_predict(model: str, task: Task, train: np.ndarray, test: np.ndarray, seed: int,
                opts: Options) -> np.ndarray:
    """Test-row predictions of baseline `model` fitted on the `train` rows."""
    y = task.labels[train]
    if model == "train_mean":
        return np.full(len(test), np.mean(y.astype(np.float64)))
    if model == "majority":  # ties: the lowest class id
        return np.full(len(test), np.argmax(np.bincount(y)))
    if model in ("rf_morgan", "ridge_morgan"):
        if "morgan" not in task.features:
            task.features["morgan"] = morgan_fingerprints(task.texts, opts.morgan_radius,
                                                          opts.morgan_bits)
        x = task.features["morgan"]
        if model == "rf_morgan":
            from sklearn.ensemble import RandomForestRegressor
            est = RandomForestRegressor(n_estimators=opts.rf_trees, n_jobs=opts.rf_jobs,
                                        random_state=seed)
        else:
            from sklearn.linear_model import RidgeCV
            est = RidgeCV(alphas=opts.ridge_alphas)
        return est.fit(x[train], y.astype(np.float64)).predict(x[test])
    if model in ("rf_kmer", "lr_kmer"):
        if "kmer" not in task.features:
            task.features["kmer"] = kmer_composition(task.texts, opts.kmer_max)
        x = task.features["kmer"]
        if model == "rf_kmer":
            from sklearn.ensemble import RandomForestClassifier
            est = RandomForestClassifier(n_estimators=opts.rf_trees, n_jobs=opts.rf_jobs,
                                         random_state=seed)
        else:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
            est = make_pipeline(StandardScaler(),
                                LogisticRegression(C=opts.lr_c, max_iter=opts.lr_max_iter))
        return est.fit(x[train], y).predict(x[test])
    if model == "tfidf_lr":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        texts = np.asarray(task.texts, dtype=object)
        # Fitted on the training rows only: the test texts' vocabulary is unseen.
        vec = TfidfVectorizer(ngram_range=(1, opts.tfidf_ngrams), min_df=opts.tfidf_min_df,
                              sublinear_tf=True)
        x_train = vec.fit_transform(texts[train])
        clf = LogisticRegression(C=opts.lr_c, max_iter=opts.lr_max_iter)
        return clf.fit(x_train, y).predict(vec.transform(texts[test]))
    raise ConfigError(f"unknown baseline {model!r}; expected rf_morgan, ridge_morgan, "
                      "train_mean, tfidf_lr, rf_kmer, lr_kmer or majority")


def metrics(task_kind: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The fine-tune's own metrics (finetune.steps) of the baseline's predictions."""
    if task_kind == "regression":
        return regression_metrics(np.asarray(preds, np.float64), labels.astype(np.float64))
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": macro_f1(labels, preds)}


def run(finetune: str, overrides: dict, fractions, seeds, opts: Options | None = None,
        report=None) -> list[dict]:
    """Every baseline at every (fraction, seed): a list of run records
    {"arm", "label_fraction", "seed", "num_labels", "num_test", "metrics",
    "headline", "train", "test", "wall_seconds"} (train / test: the row indices)."""
    opts = opts or Options()
    base = load_config(finetune, overrides)
    task = read(base, opts.sequences)
    runs = []
    for f in fractions:
        for seed in seeds:
            config = load_config(finetune, {**overrides, "seed": int(seed),
                                            "data.label_fraction": float(f)})
            train, test = splits(task, config)
            for model in models_for(config, opts.sequences):
                t = time.perf_counter()
                preds = fit_predict(model, task, train, test, int(seed), opts)
                res = {"arm": model, "label_fraction": float(f), "seed": int(seed),
                       "num_labels": len(train), "num_test": len(test),
                       "metrics": metrics(config.task, preds, task.labels[test]),
                       "headline": HEADLINE[config.task], "train": train.tolist(),
                       "test": test.tolist(), "wall_seconds": time.perf_counter() - t}
                if report is not None:
                    report(res)
                runs.append(res)
    return runs


def grid_rows(finetune: str, overrides: dict, fractions, seeds, opts: Options | None = None
              ) -> list[dict]:
    """`run`'s records for benchmarks/label_efficiency.py's grid, or [] for a
    task without a baseline (images, speech)."""
    if not models_for(load_config(finetune, overrides), (opts or Options()).sequences):
        return []
    return run(finetune, overrides, fractions, seeds, opts,
               report=lambda r: logging.info("%s f=%g seed=%d: %s", r["arm"], r["label_fraction"],
                                             r["seed"], json.dumps(r["metrics"])))


def summarize(runs: list[dict]) -> dict:
    """{arm: {fraction: {"mean", "std", "values", "num_labels", "seeds"}}} of
    the headline metric (the layout of benchmarks/label_efficiency.summarize),
    plus every metric's mean and std under "metrics"."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["arm"], {}).setdefault(r["label_fraction"], []).append(r)
    summary = {}
    for arm, by_f in out.items():
        summary[arm] = {}
        for f, rows in by_f.items():
            vals = np.array([r["metrics"][r["headline"]] for r in rows])
            per = {k: (float(np.mean([r["metrics"][k] for r in rows])),
                       float(np.std([r["metrics"][k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0)
                   for k in rows[0]["metrics"]}
            summary[arm][f] = {"mean": float(vals.mean()),
                               "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                               "values": vals.tolist(), "num_labels": rows[0]["num_labels"],
                               "seeds": [r["seed"] for r in rows], "metrics": per}
    return summary


def table(summary: dict, title: str) -> str:
    """Markdown: one row per (baseline, fraction), every metric as mean +- std."""
    lines = [f"### {title}", ""]
    first = next(iter(summary.values()))
    names = list(next(iter(first.values()))["metrics"])
    lines += [f"| baseline | labels | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for arm, by_f in summary.items():
        for f in sorted(by_f):
            s = by_f[f]
            scale = {"accuracy": 100.0, "macro_f1": 100.0}
            cells = [f"{scale.get(k, 1.0) * m:.{1 if k in scale else 3}f} +- "
                     f"{scale.get(k, 1.0) * sd:.{1 if k in scale else 3}f}"
                     for k, (m, sd) in s["metrics"].items()]
            lines.append(f"| {arm} | {100 * f:g}% ({s['num_labels']}) | {' | '.join(cells)} |")
    seeds = next(iter(first.values()))["seeds"]
    lines += ["", f"Mean +- sample std over seeds {seeds}; accuracy and macro-F1 in %."]
    return "\n".join(lines)


def _define_flags(fv, argv):
    from absl import flags
    flags.DEFINE_string("finetune", None, "Fine-tune experiment, e.g. "
                        "experiments/finetune.py:solubility.", flag_values=fv)
    flags.DEFINE_string("overrides", "", "key=value,... of the fine-tune config (data.path, "
                        "data.target_column, data.test_fraction, ...).", flag_values=fv)
    flags.DEFINE_list("fractions", ["0.05"], "Label fractions.", flag_values=fv)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (label subset, forest).", flag_values=fv)
    flags.DEFINE_string("out", "", "JSON output (default: baselines_<task>.json here).",
                        flag_values=fv)
    d = Options()
    flags.DEFINE_integer("morgan_radius", d.morgan_radius, "Morgan fingerprint radius.", flag_values=fv)
    flags.DEFINE_integer("morgan_bits", d.morgan_bits, "Morgan fingerprint bits.", flag_values=fv)
    flags.DEFINE_integer("rf_trees", d.rf_trees, "Random forest trees.", flag_values=fv)
    flags.DEFINE_integer("rf_jobs", d.rf_jobs, "Random forest parallel jobs.", flag_values=fv)
    flags.DEFINE_list("ridge_alphas", [str(a) for a in d.ridge_alphas],
                      "Ridge penalties RidgeCV chooses from.", flag_values=fv)
    flags.DEFINE_integer("tfidf_ngrams", d.tfidf_ngrams, "TF-IDF word n-grams 1..n.", flag_values=fv)
    flags.DEFINE_integer("tfidf_min_df", d.tfidf_min_df, "TF-IDF minimum document count.",
                         flag_values=fv)
    flags.DEFINE_float("lr_c", d.lr_c, "Logistic regression inverse L2 strength.", flag_values=fv)
    flags.DEFINE_integer("lr_max_iter", d.lr_max_iter, "Logistic regression iterations.",
                         flag_values=fv)
    flags.DEFINE_integer("kmer_max", d.kmer_max, "Peptides: residue k-mer frequencies for "
                         "k = 1..n.", flag_values=fv)
    flags.DEFINE_enum("sequences", d.sequences, list(SEQUENCES), "What a text task's rows are: "
                      "auto (by task) or protein (a text_tsv of protein / peptide sequences: "
                      "the k-mer baselines).", flag_values=fv)


def _main(fv) -> int:
    if not fv.finetune:
        raise errors.UserError("--finetune is required, e.g. "
                               "--finetune experiments/finetune.py:solubility")
    opts = Options(morgan_radius=fv.morgan_radius, morgan_bits=fv.morgan_bits,
                   rf_trees=fv.rf_trees, rf_jobs=fv.rf_jobs,
                   ridge_alphas=tuple(float(a) for a in fv.ridge_alphas),
                   tfidf_ngrams=fv.tfidf_ngrams, tfidf_min_df=fv.tfidf_min_df, lr_c=fv.lr_c,
                   lr_max_iter=fv.lr_max_iter, kmer_max=fv.kmer_max, sequences=fv.sequences)
    fractions = [float(f) for f in fv.fractions]
    seeds = [int(s) for s in fv.seeds]
    overrides = parse_overrides(fv.overrides)
    t0 = time.perf_counter()

    def report(r):
        print(f"{r['arm']} f={r['label_fraction']:g} seed={r['seed']} n={r['num_labels']}: "
              f"{json.dumps({k: round(v, 4) for k, v in r['metrics'].items()})}", flush=True)

    runs = run(fv.finetune, overrides, fractions, seeds, opts, report)
    summary = summarize(runs)
    name = fv.finetune.split(":")[-1]
    text = table(summary, f"{name}: baselines (test split of {runs[0]['num_test']})")
    out = fv.out or f"baselines_{name}.json"
    with open(out, "w") as f:
        json.dump({"meta": {"finetune": fv.finetune, "overrides": overrides, "fractions": fractions,
                            "seeds": seeds, "options": dataclasses.asdict(opts),
                            "seconds": time.perf_counter() - t0,
                            "command": " ".join(sys.argv)},
                   "summary": {a: {str(k): v for k, v in s.items()} for a, s in summary.items()},
                   "runs": runs}, f, indent=1)
    print(text)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.absl_main(_define_flags, _main, None, doc=__doc__))
