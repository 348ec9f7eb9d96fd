"""The built-in text model's data and build, for the docs to quote: the Rotten Tomatoes reviews it is trained on
(counts, the split by film, how many fit its 64 tokens) and how long its fine-tuning took (from set-up's cache).

Usage: python benchmarks/text_model.py [--json PATH]
--json writes reviews, fresh, rotten, films, films_train, train, val, test (reviews per split),
test_majority (the test split's majority-class share), over_max_length (how many reviews have more tokens than
max_length, special tokens counted as in training), max_length, fine_tune_minutes with fine_tune_cpu and
fine_tune_cores (the cached build's own time and the machine that built it; null if the cache predates them),
test_accuracy and cached (whether the weights came from the cache).
"""

import argparse

import numpy as np

from modelship import data
from modelship.bench import write_figures
from modelship.models import text, zoo


def split_facts() -> dict:
    rows = data._rotten_tomatoes_rows()
    splits = {s: data._rotten_tomatoes_split(s) for s in ("train", "val", "test")}
    return {"reviews": len(rows), "fresh": sum(r["label"] for r in rows),
            "rotten": sum(1 - r["label"] for r in rows), "films": len({r["film"] for r in rows}),
            "films_train": len({r["film"] for r in splits["train"]}), **{s: len(v) for s, v in splits.items()}}


def over(max_length: int) -> int:
    tok = text.tokenizer()
    lengths = [len(ids) for ids in tok([r["text"] for r in data._rotten_tomatoes_rows()])["input_ids"]]
    return int(np.sum(np.array(lengths) > max_length))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    entry = zoo.ZOO["text"]
    max_length = entry.preprocess["max_length"]
    _, info = text.train(entry.data, max_length)  # read from set-up's cache (built there if missing)
    seconds, built_on = info.get("fine_tune_seconds"), info.get("built_on") or {}
    facts = split_facts()
    assert info["test_samples"] == facts["test"], "the model was tested on another split than the one counted here"
    figures = {**facts, "max_length": max_length, "over_max_length": over(max_length),
               "fine_tune_minutes": None if seconds is None else seconds / 60,
               "fine_tune_cpu": built_on.get("cpu"), "fine_tune_cores": built_on.get("cores"),
               "test_majority": info["majority_baseline"], "test_accuracy": info["test_accuracy"],
               "cached": info["cached"]}
    for k, v in figures.items():
        print(f"  {k:18s} {v}")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
