"""Where a store lives: a local folder, or an fsspec URL (s3://bucket/path, gs://..., ...).

Local paths stay `Path`s: locks, free-space checks and memory-mapped reads need a real
file system. URLs go to zarr and fsspec as they are, configured the fsspec way: the usual
AWS_* (or GOOGLE_*) credentials, and e.g. FSSPEC_S3_ENDPOINT_URL=http://host:9000 for
MinIO, Ceph or any S3-compatible server. `file://` URLs are local paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

Location = str | Path  # a local Path, or a URL string


def is_url(location: Location) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def normalize(location: Location) -> Location:
    """A Path for local folders (file:// included), the URL without a trailing slash otherwise."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return text.rstrip("/") if is_url(text) else Path(location)


def join(location: Location, *parts: str) -> Location:
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def parent(location: Location) -> Location:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_url(location) else Path(location).parent


def name(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: Location):
    """(fsspec filesystem, path within it); a missing protocol package is a clear error."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as e:
        raise UserError(f"{location}: {e}. Install the package for this protocol "
                        "(s3fs for s3://, gcsfs for gs://).") from None


def exists(location: Location) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    try:
        return fs.exists(path)
    except Exception as e:  # network, credentials: say what failed, not a traceback
        raise UserError(f"cannot reach {location}: {type(e).__name__}: {e}") from None


def listing(location: Location) -> list[str]:
    """Names directly under `location` (none when it does not exist)."""
    if not is_url(location):
        return [p.name for p in Path(location).iterdir()] if Path(location).is_dir() else []
    if not exists(location):
        return []
    fs, path = filesystem(location)
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]


def read_json(location: Location) -> dict:
    """A small JSON file (a zarr.json) from a folder or a bucket."""
    if not is_url(location):
        return json.loads(Path(location).read_text())
    fs, path = filesystem(location)
    return json.loads(fs.cat_file(path))


def usage(location: Location) -> int:
    """Bytes stored under `location`."""
    if not is_url(location):
        return sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file())
    fs, path = filesystem(location)
    return int(fs.du(path, total=True))
