"""Stage two: train LoSA or a linear probe from a store, nanoGPT-short.

Evaluation every epoch on the validation split; the epoch with the best validation
accuracy is the one kept (and the only one ever scored on the test split).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from featcache.errors import UserError
from featcache.store import Store, open_store

from .classifier import METHODS, build_classifier, select_taps, trainable_parameters
from .loader import ShardLoader

console = Console(stderr=True)


@dataclass
class FitConfig:
    cache: Path
    method: str = "losa"
    rank: int = 16
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    taps: str = "all"  # which of the store's tapped blocks to train on (featcache --taps syntax)
    out: Path | None = None  # default: runs/<store>-<method>[-r<rank>]-s<seed>
    device: str = "cpu"


@dataclass
class FitResult:
    run: Path
    method: str
    rank: int | None
    params: int
    best_epoch: int
    val_acc: float
    test_acc: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(z), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: ShardLoader) -> tuple[float, float]:
    """(mean loss, accuracy) over a split, in the store's order."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for b in loader.epoch(0):
        logits, y = model(b.tokens), b.labels
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train()
    return loss_sum / max(n, 1), correct / max(n, 1)


def _check(cfg: FitConfig, store: Store) -> str:
    """Validate the request against the store; return the validation split's name."""
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{cfg.method}'")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise UserError("--epochs and --batch-size must be at least 1 and --lr positive")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device here.")
    if "train" not in store.splits:
        raise UserError(f"{store.path} has no train split (it has {', '.join(store.splits)}).")
    val = "val" if "val" in store.splits else None
    if val is None:
        raise UserError(f"{store.path} has no val split to select the model on; extract it "
                        "from a folder without train/val/ levels (a split is made) or add val/.")
    for name in ("train", val):
        if not store.split(name).complete:
            raise UserError(f"split '{name}' of {store.path} is incomplete: rerun the "
                            "`featcache extract` command that made it to finish it.")
    return val


def fit(cfg: FitConfig) -> FitResult:
    """Train one configuration from the store at `cfg.cache`; write the run directory."""
    store = open_store(cfg.cache)
    val_split = _check(cfg, store)
    device = torch.device(cfg.device)
    run = Path(cfg.out) if cfg.out else Path("runs") / (
        f"{Path(store.path).name}-{cfg.method}" + (f"-r{cfg.rank}" if cfg.method == "losa" else "")
        + f"-s{cfg.seed}")
    run.mkdir(parents=True, exist_ok=True)
    positions = select_taps(store, cfg.taps)
    model = build_classifier(cfg.method, store, cfg.rank, cfg.seed, len(positions)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    layers = positions if model.side is not None else positions[-1:]  # a probe: the last tap only
    train = ShardLoader(store, "train", cfg.batch_size, shuffle=True, seed=cfg.seed, layers=layers,
                        device=device)
    val = ShardLoader(store, val_split, cfg.batch_size, shuffle=False, layers=layers, device=device)
    total = cfg.epochs * len(train)
    warmup = max(1, total // 20)
    (run / "config.json").write_text(json.dumps({
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "store": {k: store.meta[k] for k in ("model", "weights", "taps", "layout", "dtype", "classes")},
        "blocks": [store.taps[p] for p in positions],
        "trainable_params": trainable_parameters(model)}, indent=2))
    metrics = (run / "metrics.jsonl").open("w")
    best = {"val_acc": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict] = []
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        train_loss = 0.0
        for b in train.epoch(epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, warmup)
            loss = train_step(model, opt, b.tokens, b.labels)
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at epoch {epoch}, step {step}; lower --lr. "
                                f"The best epoch so far is {best.get('epoch')} (not saved).")
            train_loss += loss / len(train)
            step += 1
        val_loss, val_acc = evaluate(model, val)
        row = {"epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": val_loss,
               "val_acc": val_acc, "seconds": time.perf_counter() - t0}
        history.append(row)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        console.print(f"epoch {epoch:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                      f"val acc {100 * val_acc:.1f}%")
        if val_acc > best["val_acc"]:
            best = row
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics.close()
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    test_acc = None
    if "test" in store.splits and store.split("test").complete:
        test = ShardLoader(store, "test", cfg.batch_size, shuffle=False, layers=layers, device=device)
        test_acc = evaluate(model, test)[1]
    save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(run / "adapter.safetensors"),
              metadata={"method": cfg.method, "rank": str(cfg.rank), "epoch": str(best["epoch"])})
    result = FitResult(run=run, method=cfg.method, rank=cfg.rank if cfg.method == "losa" else None,
                       params=trainable_parameters(model), best_epoch=best["epoch"],
                       val_acc=best["val_acc"], test_acc=test_acc, seconds=seconds,
                       history=history)
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
