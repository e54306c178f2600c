"""The results table printed by `sidetrain fit` and `make demo`."""

from __future__ import annotations

from rich.table import Table

from sidetrain import FitResult


def results_table(results: list[FitResult], title: str | None = None) -> Table:
    t = Table(title=title)
    for col in ("method", "rank", "trainable params", "best epoch", "val acc", "test acc", "time"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        t.add_row(r.method, str(r.rank or "-"), f"{r.params:,}", str(r.best_epoch),
                  f"{100 * r.val_acc:.1f}%",
                  "-" if r.test_acc is None else f"{100 * r.test_acc:.1f}%", f"{r.seconds:.1f} s")
    return t
