"""Checks of a dataset and its store that name the likely mistake behind what they find:
a mistyped label, a folder one level too high, wrong paths."""

from __future__ import annotations

import difflib
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import UserError
from .images import Images
from .sources import Dataset
from .store import Store

PROBE = 8  # inputs of each split read before a run: none readable means wrong paths
DIGESTS = 32  # inputs of each split whose bytes a store records (input_digests)
WHERE = ("Check that the files are where the dataset says (a manifest's relative paths are "
         "read from its folder, or from --data-root)")


def rare_classes_note(ds: Dataset) -> str | None:
    """A class of one or two samples, among classes of ten or more or named like another
    class, is most often a mistyped label in a manifest: a note naming a sample (not an
    error: the class may be real)."""
    labels = np.concatenate([s.labels for s in ds.splits.values()])
    counts = np.bincount(labels[labels >= 0], minlength=len(ds.classes))
    rare = np.flatnonzero((counts > 0) & (counts <= 2))
    # many rare classes are a long tail or a --limit, not typos: then only name likenesses
    by_count = np.median(counts) >= 10 and len(rare) <= max(1, 0.1 * len(counts))
    lines = []
    for c in rare:
        big = [n for n, k in zip(ds.classes, counts) if k >= 5 * counts[c]]  # a typo's original
        like = difflib.get_close_matches(ds.classes[c], big, n=1, cutoff=0.75) or [
            n for n in big if n.lower() == ds.classes[c].lower()]
        if like or by_count:
            key = next(s.keys[i] for s in ds.splits.values() for i in np.flatnonzero(s.labels == c))
            lines.append(f"'{ds.classes[c]}' ({counts[c]} sample{'s' if counts[c] > 1 else ''}, e.g. {key})"
                         + (f", close to '{like[0]}'" if like else ""))
        if len(lines) > 5:
            break
    if not lines:
        return None
    return (f"class(es) with at most 2 samples, against a median of {np.median(counts):g} per "
            f"class: {'; '.join(lines[:5])}{' ...' if len(lines) > 5 else ''}. A mistyped label?")


def empty_classes_note(ds: Dataset) -> str | None:
    """Classes without a sample in any split (an empty class folder; integer labels that skip
    numbers): the head still gets an output for each, which nothing trains."""
    labels = np.concatenate([s.labels for s in ds.splits.values()])
    empty = np.flatnonzero(np.bincount(labels[labels >= 0], minlength=len(ds.classes)) == 0)
    if not len(empty):
        return None
    names = ", ".join(f"'{ds.classes[c]}'" for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
    return (f"{len(empty)} of {len(ds.classes)} classes have no sample: {names} (an empty class "
            "folder, or integer labels that skip numbers?). They stay classes of the store.")


def no_train_note(ds: Dataset) -> str | None:
    """A store without a train split can be scored on but not trained from: worth saying
    before it is written, not at `sidetrain fit`."""
    if "train" in ds.splits:
        return None
    return (f"{ds.name} has no train split (it has {', '.join(ds.splits)}): its store can be "
            "scored with `sidetrain eval`, but `sidetrain fit` needs train (and val).")


def one_class_note(ds: Dataset) -> str | None:
    """A single class is most often a folder one level above the class folders (whose
    images are then found recursively under one "class"): nothing can be learned from it."""
    if len(ds.classes) != 1:
        return None
    return (f"the dataset has one class, '{ds.classes[0]}', so a classifier can learn nothing "
            f"from it. If '{ds.classes[0]}' is the folder holding the class folders, pass that "
            "folder as --dataset.")


def _spread(n: int, k: int) -> np.ndarray:
    """k sample indices spread over a split of n (the same for the same inputs)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).astype(int))


def _digest(path: Path) -> str:
    """A file's size and first MiB, hashed: what regenerating it changes, read cheaply even
    for a long video (its date is no witness: a copy with `cp -r` is dated anew)."""
    with open(path, "rb") as f:
        return hashlib.sha256(str(os.fstat(f.fileno()).st_size).encode() + f.read(1 << 20)).hexdigest()[:16]


def input_digests(ds: Dataset) -> dict[str, dict[str, str]]:
    """A few inputs of each split (files only), hashed: recorded in a new store so that a
    rerun can tell images regenerated in place under the same paths and labels."""
    out = {}
    for name, split in ds.splits.items():
        digests = {}
        for i in _spread(len(split), DIGESTS):
            path = split.file(int(i))
            try:
                if path is not None:
                    digests[split.keys[i]] = _digest(path)
            except OSError:  # unreadable inputs are the extractor's to report
                continue
        if digests:
            out[name] = digests
    return out


def changed_inputs_note(store: Store, now: dict[str, dict[str, str]], then: str) -> str | None:
    """The inputs the store recorded (input_digests) whose files now hold something else
    (`now`: input_digests of the dataset), and `then`, what follows: a store of the same
    paths and labels is resumed, kept or reused, so images regenerated in place would
    otherwise go unnoticed. (Stores from before the record: not checked.)"""
    recorded = store.meta.get("input_digests", {})
    pairs = [(key, digest, now.get(name, {}).get(key)) for name, digests in recorded.items()
             for key, digest in digests.items()]
    changed = [key for key, was, is_ in pairs if is_ is not None and is_ != was]
    if not changed:
        return None
    return (f"{len(changed)} of the {len(pairs)} inputs {store.path} recorded hold other bytes now "
            f"(e.g. {changed[0]}): {then}")


def refuse_unreadable_inputs(images: Images, names: list[str]) -> None:
    """Before a run, read inputs of each split until one can be read, at most PROBE spread
    over it (a run of bad files in one folder does not stop a split): when none can, the
    paths are wrong, which the pass would otherwise find out only at its end."""
    for sid, name in enumerate(names):
        split = images.splits[sid]
        n = min(PROBE, len(split))
        reasons, picked = [], np.unique(np.linspace(0, len(split) - 1, n).round().astype(int))
        for i in picked:
            reasons.append(images[(sid, int(i))][2])
            if not reasons[-1]:
                break
        if n and all(reasons):
            which = f"of the {n}" if n == len(split) else f"of {n} inputs spread over the {len(split)}"
            kind = Counter(r.split(":")[0] for r in reasons).most_common(1)[0][0]  # the usual cause
            j = next(j for j, r in enumerate(reasons) if r.startswith(kind))
            missing = any(r.startswith(("FileNotFoundError", "NotADirectoryError")) for r in reasons)
            raise UserError(f"none {which} inputs of split '{name}' could be read (most often: "
                            f"{split.keys[picked[j]]}: {reasons[j]})." + (f" {WHERE}." if missing else ""))


def refuse_unreadable(store: Store, names: list[str]) -> None:
    """A finished split none of whose inputs could be read is a wrong path, not bad luck:
    say so now rather than let `sidetrain fit` find an empty split later."""
    for name in names:
        split = store.split(name)
        if split.attrs["complete"] and split.n and not (split.labels >= 0).any():
            key, why = next(iter(split.attrs["skipped"].items()))
            raise UserError(
                f"none of the {split.n} inputs of split '{name}' could be read (the first: {key}: "
                f"{why}), so {store.path} holds no sample of it. {WHERE}, then delete "
                f"{store.path} and extract again.")
