"""The CLIs as a user meets them: bad input gives one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def cli(tool: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"featcache_cli.{tool}", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,expected", [
    (["featcache", "extract", "--model", "vit_tiny", "--dataset", "/no/such/folder", "--random-init"],
     "dataset not found"),
    (["featcache", "extract", "--model", "vit_tinny", "--dataset", "demo", "--random-init"],
     "unknown model"),
    (["sidetrain", "fit", "--cache", "."], "is not a featcache store"),
    (["sidetrain", "fit", "--cache", "/no/such/store"], "no store at /no/such/store"),
    (["sidetrain", "eval", "--run", ".", "--cache", "."], "is not a finished sidetrain run"),
    (["featcache", "info", "/no/such"], "no store at /no/such"),
    (["sidetrain", "sweep", "--cache", ".", "--rank", "4,eight"], "--rank takes a comma-separated list"),
    (["sidetrain", "fit", "--cache", "/no/such/store", "--method", "lora"],  # (before the store is read)
     "--method must be one of losa, linear, mlp, not 'lora'"),
])
def test_bad_input_is_one_clear_line(args, expected, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]


def test_a_cache_root_or_a_misspelt_store_is_answered_with_the_stores_there(fp32_store, monkeypatch, run_cli):
    monkeypatch.chdir(fp32_store.parent.parent)
    root, name = fp32_store.parent.name, fp32_store.name
    for cache, expected in ((root, f"(its --out); it holds 1 store(s): {root}/{name}."),
                            (f"{root}/{name}x", f"the path does not exist. Did you mean {root}/{name}?")):
        r = run_cli("sidetrain", "fit", "--cache", cache)
        assert r.returncode == 2 and expected in r.stderr, r.stderr
    r = run_cli("featcache", "ls", f"{root}x")
    assert r.returncode == 2 and f"{root}x is not a folder. Did you mean {root}?" in r.stderr, r.stderr


def test_extract_info_fit_from_the_command_line(tmp_path, monkeypatch, run_cli):
    """The first command as a user runs it (`python -m`, a process of its own), the rest in
    this one."""
    r = cli("featcache", "extract", "--model", "vit_tiny", "--random-init", "--img-size", "32",
            "--dataset", "demo", "--limit", "10", "--out", "s", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert written["written"] == {"train": 10, "val": 10, "test": 10}
    # a log file's lines are whole (rich wrapped them at 80 columns): grep finds the record
    assert any(line.startswith("store size: 30 samples") and "free:" in line for line in r.stderr.splitlines())
    monkeypatch.chdir(tmp_path)
    info = json.loads(run_cli("featcache", "info", "s", "--json").stdout)
    assert written["bytes_on_disk"] == info["bytes_on_disk"] > written["bytes"]  # the plan counts tokens only
    assert info["complete"] and info["splits"]["train"]["n"] == 10 and info["dtype"] == "fp16"
    assert len(info["id"]) == 32  # this extraction's id, which runs record
    r = run_cli("featcache", "extract", "--model", "vit_tiny", "--random-init", "--img-size", "32",
                "--dataset", "demo", "--limit", "10", "--out", "t", "--dry-run", "--json")
    planned = json.loads(r.stdout)
    assert planned["twin"] == "s" and planned["left"] == 30  # the store a real run would reuse
    r = run_cli("featcache", "extract", "--model", "vit_tiny", "--random-init", "--img-size", "32",
                "--dataset", "demo", "--limit", "10", "--out", "t", "--dry-run")
    assert r.stdout.startswith("dry run: t, would reuse s (")
    verify = json.loads(run_cli("featcache", "verify", "s", "--json").stdout)
    assert verify["ok"] and verify["samples"] == 30 and not verify["problems"]
    (listed,) = json.loads(run_cli("featcache", "ls", ".", "--json").stdout)
    assert listed["path"] == "s" and listed["complete"] and listed["splits"]["val"] == 10
    r = run_cli("sidetrain", "fit", "--cache", "s", "--epochs", "1", "--rank", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["method"] == "losa"
    assert (tmp_path / "runs" / "s-losa-r4-s0" / "adapter.safetensors").is_file()
    # the comma lists become a grid; the mlp's width does not multiply the linear probe
    r = run_cli("sidetrain", "sweep", "--cache", "s", "--method", "linear,mlp", "--mlp-hidden", "8,16",
                "--epochs", "1", "--batch-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    runs = sorted(Path(x["run"]).name for x in json.loads(r.stdout))
    assert runs == ["linear", "mlp-mlp_hidden16", "mlp-mlp_hidden8"]
    assert (tmp_path / "runs" / "s-sweep" / "sweep.json").is_file()


def test_ctrl_c_says_what_was_kept(capsys, monkeypatch):
    from featcache_cli.common import make_app, run

    app = make_app("test")

    @app.command()
    def long() -> None:
        raise KeyboardInterrupt  # as Ctrl-C in the middle of an extraction or a fit

    @app.command()
    def other() -> None:  # (with two commands typer reads the first argument as the command)
        pass

    monkeypatch.setattr(sys, "argv", ["tool", "long"])
    with pytest.raises(SystemExit) as stop:
        run(app)
    assert stop.value.code == 130 and "the same command continues from there" in capsys.readouterr().err


def test_the_cli_defaults_are_the_python_defaults():
    """fit's and sweep's options default to FitConfig's (but sweep's methods), and
    FitConfig's model options to ModelSpec's: the places a default is written must agree."""
    from dataclasses import MISSING, fields

    import typer.main

    from featcache_cli.sidetrain import app
    from sidetrain import FitConfig, ModelSpec

    python = {f.name: f.default for f in fields(FitConfig) if f.default is not MISSING}
    assert {f.name: f.default for f in fields(ModelSpec)}.items() <= python.items()
    group = typer.main.get_command(app)
    for command in ("fit", "sweep"):
        # (--compile's parameter is compile_: not the builtin's name)
        options = {p.name.rstrip("_"): p.default for p in group.commands[command].params}
        options = {k: v for k, v in options.items() if k in python}
        assert options.keys() == python.keys() - {"out"}  # every option (--out: the param out_dir)
        if command == "sweep":
            assert options.pop("method") == "losa,linear"  # a sweep compares LoSA with a probe
        for name, default in options.items():  # sweep's lists are strings like "1e-3"
            if isinstance(default, str) and not isinstance(python[name], str):
                default = type(python[name])(default)
            assert default == python[name], (command, name)


def test_listing_and_describing_stores_load_neither_torch_nor_timm(fp32_store):
    """They start in a fraction of a second instead of several: extraction, verify and
    training import torch and timm when they run."""
    code = ("import sys; from typer.testing import CliRunner; from featcache_cli.featcache import app; "
            f"runner = CliRunner(); root = {str(fp32_store.parent)!r}; "
            "results = [runner.invoke(app, args) for args in (['--help'], ['ls', root], ['info', sys.argv[1]])]; "
            "assert all(r.exit_code == 0 for r in results), [r.output for r in results]; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(fp32_store)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_large_images_are_read_without_pil_warnings_and_too_large_ones_skipped(tmp_path, monkeypatch,
                                                                                run_cli, recwarn):
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    Image.new("RGB", (60, 60)).save(tmp_path / "imgs" / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is large (a warning), 60x60 too large
    r = run_cli("featcache", "extract", "--model", "vit_tiny", "--random-init", "--img-size", "32",
                "--dataset", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    skipped = {k: v for split in json.loads(r.stdout)["skipped"].values() for k, v in split.items()}
    assert list(skipped) == ["a/huge.png"] and "exceeds limit" in skipped["a/huge.png"]


def test_folders_one_may_not_read_or_write_are_one_line(fp32_store, tmp_path, monkeypatch, run_cli):
    """(Tests run as root, whom permissions never stop: the errors are raised as the OS would.)"""
    import shutil
    root = tmp_path / "lab"
    shutil.copytree(fp32_store, root / "mine")
    shutil.copytree(fp32_store, root / "theirs")
    is_file = Path.is_file

    def private(path):
        if "theirs" in path.parts:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", private)
    r = run_cli("featcache", "ls", str(root))
    assert r.returncode == 0 and "mine" in r.stdout and "theirs" not in r.stdout
    assert f"{root / 'theirs'}: cannot be read (permission denied): left out." in " ".join(r.stderr.split())
    monkeypatch.setattr(Path, "is_file", is_file)

    def mkdir(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = run_cli("sidetrain", "fit", "--cache", str(root / "mine"), "--rank", "4", "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith(f"error: permission denied: {tmp_path / 'run'}. ")
    import zarr
    monkeypatch.setattr(zarr, "open_group", lambda path, mode: mkdir(Path(path) / "zarr.json"))
    r = run_cli("featcache", "info", str(root / "theirs"))
    assert r.returncode == 2 and f"error: cannot read {root / 'theirs'}: permission denied" in r.stderr
