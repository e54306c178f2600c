"""The results table printed by `sidetrain fit`, `sidetrain sweep` and `make demo`."""

from __future__ import annotations

from rich.table import Table

from sidetrain import FitResult


def results_table(results: list[FitResult], title: str | None = None, names: bool = False) -> Table:
    """One row per run; with `names`, the run folder's name (which says the method and the
    options that vary) replaces the method and rank columns, so rows fit 80 columns."""
    t = Table(title=title)
    cols = (["run"] if names else ["method", "rank"]) + ["trainable params", "best epoch",
                                                          "val acc", "test acc", "time"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("run", "method") else "right",
                     no_wrap=col == "run")
    for r in results:
        row = [r.run.name] if names else [r.method, str(r.rank or "-")]
        kept = r.best_epoch >= 0  # (not when it stopped before its first epoch's end)
        row += [f"{r.params:,}", str(r.best_epoch) if kept else "-",
                f"{100 * r.val_acc:.1f}%" if kept else "-",
                "-" if r.test_acc is None else f"{100 * r.test_acc:.1f}%",
                f"{r.seconds:.1f} s" + (" (stopped: NaN/inf)" if r.failed else "")]
        t.add_row(*row)
    return t
