"""What both CLIs share: one-line errors instead of tracebacks for bad input."""

from __future__ import annotations

import errno
import json
import shutil
import sys
import warnings
from pathlib import Path

import typer

from featcache.errors import UserError, disk_full
from featcache.store import Store


def make_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode=None)


def run(app: typer.Typer) -> None:
    """Run `app`; a UserError becomes `error: ...` on one stderr line and exit status 2, a
    full or read-only disk or a folder the user may not read or write one line and status 1,
    Ctrl-C exit status 130 with a line on what was kept."""
    # A dataset's large photos (a 10k x 10k scan) are no attack on the user who chose them:
    # PIL's warning above 89 MP goes; its refusal above 179 MP skips the image, with a reason.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except PermissionError as e:  # a colleague's folder, in a shared cache or runs root
        print(f"error: permission denied: {e.filename or e}. To read a colleague's store or run, ask "
              "them to share it (`chmod -R g+rX` for the group, a+rX for all); to write, pick a "
              "folder you may write (--out).", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # where the disk fills up or is read-only is no bug of ours: one line
        if not disk_full(e) and e.errno != errno.EROFS:
            raise
        print(f"error: {e.strerror}{f': {e.filename}' if e.filename else ''}. "
              + ("Free some space" if disk_full(e) else "Write elsewhere (--out)")
              + " and rerun the same command: extract, fit and sweep continue from what they finished.",
              file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:
        if e.code == 130:  # typer's exit for Ctrl-C (it catches KeyboardInterrupt itself)
            print("\ninterrupted (extract, fit and sweep keep the shards and epochs they "
                  "finished: the same command continues from there)", file=sys.stderr)
        raise


def emit_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def clear_stale_demo_store(path: Path) -> None:
    """A demo owns its video store: one decoded otherwise (before decoding by codec) would
    refuse to be completed or rerun, so it is extracted again."""
    from featcache import open_store
    from featcache.sources.video import decoder_name

    try:
        made = open_store(path).meta["dataset"].get("decoder")
    except UserError:  # none there, or a layout cut short (which extract lays out again)
        return
    if made != decoder_name():
        shutil.rmtree(path)


def clear_stale_demo_runs(folder: Path, store: Store) -> None:
    """A demo owns its run folders: those an earlier sidetrain trained under another batch
    order, on an earlier extraction of the store, or on another device would refuse to
    resume, so they are trained again."""
    from featcache.precision import pick_device
    from sidetrain.loader import DATA_ORDER  # (sidetrain loads torch: the demos only)

    device = pick_device("auto")
    for config in folder.glob("*/config.json"):
        saved = json.loads(config.read_text())
        if (saved.get("data_order"), saved["store"].get("id"), saved.get("device", "cpu")) != (
                DATA_ORDER, store.meta.get("id"), device):
            shutil.rmtree(config.parent)
