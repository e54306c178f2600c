"""A store summarised: what `featcache info` prints and scripts read with --json."""

from __future__ import annotations

from .lock import writer
from .store import Store, disk_usage


def store_info(store: Store) -> dict:
    m = store.meta
    splits, lost = {}, {}  # (each split read once: its labels and keys are the cost)
    for name in store.splits:
        s = store.split(name)
        splits[name] = {"n": s.n, "read": int((s.labels >= 0).sum()), "skipped": s.attrs["skipped"],
                        "shards_done": int(s.done.sum()), "shards": len(s.done),
                        "complete": s.complete,
                        "added": m.get("splits_added", {}).get(name)}  # (laid out after the store)
        if gone := s.lost_shards(store.path):
            lost[name] = gone
    complete = all(split["complete"] for split in splits.values())  # (Store.complete, not read again)
    return {"path": store.path, "format_version": m["format_version"],
            "model": m["model"]["name"], "weights": m["weights"], "taps": m["taps"],
            "layout": m["layout"], "dtype": m["dtype"], "precision": store.precision,
            "transform": m["transform"],
            "dataset": m["dataset"], "classes": m["classes"], "shard_size": m["shard_size"],
            "batch_size": m.get("batch_size"),  # (absent in the earliest stores)
            "device": m.get("device"),  # the kind it was begun on (absent in stores before 2026-11-28)
            "splits": splits, "complete": complete, "bytes_on_disk": disk_usage(store.path),
            "lost_shards": lost,  # flagged done, files gone (a copy cut short)
            "writer": None if complete else writer(store.path),  # who is writing it now
            "created": m["created"], "id": m.get("id"), "versions": m["versions"]}  # (id: newer stores)
