"""The VTAB-1k folder layout of the PETL repositories: `vtab1k:<task>`.

    <data-root>/<task>/train800.txt, val200.txt, test.txt   lines: "<relative path> <label>"

train800 + val200 are the 1k training images (800 to train, 200 to select on), test.txt
the evaluation set; paths are relative to the task folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Dataset, FileSplit

LISTS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}


def open_vtab1k(task: str, root: Path | None) -> Dataset:
    folder = (root or Path("data") / "vtab-1k") / task
    if not folder.is_dir():
        raise UserError(f"vtab1k:{task}: no folder {folder}. Point --data-root at the folder that "
                        "holds the VTAB-1k task folders.")
    parsed = {}
    for split, name in LISTS.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"vtab1k:{task}: {path} is missing")
        keys, labels = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                key, label = line.rsplit(maxsplit=1)
                labels.append(int(label))
            except ValueError:
                raise UserError(f"{path}:{n}: expected '<path> <integer label>', got '{line[:80]}'") from None
            keys.append(key)
        if not keys:
            raise UserError(f"vtab1k:{task}: {path} lists no images")
        parsed[split] = (keys, np.array(labels, dtype=np.int64))
    classes = [str(i) for i in range(1 + max(int(l.max()) for _, l in parsed.values()))]
    ds = Dataset(name=f"vtab1k-{task}", source=f"vtab1k:{folder.resolve()}", classes=classes)
    ds.splits = {s: FileSplit(folder.resolve(), k, l) for s, (k, l) in parsed.items()}
    return ds
