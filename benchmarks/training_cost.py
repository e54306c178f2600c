"""Training cost per epoch, peak memory and trainable parameters, same backbone/batch/data:

    python benchmarks/training_cost.py [--model vit_small] [--img-size 112] [--n 256] [--precision bf16]

writes benchmarks/results/training_cost_<cpu|cuda>_<model>[_bf16].json and .png. With
--precision bf16 every method's forward runs under bf16 autocast, as `sidetrain fit
--precision bf16` trains (for GPUs: on most CPUs it is slower).

- losa-cache:  LoSA trained from the store (what sidetrain does);
- losa-preload: the same with the split held in the GPU's memory (`fit --preload`; CUDA only);
- losa-compiled: losa-cache through torch.compile (`fit --compile`; on CUDA also preloaded: the
               fastest LoSA there is); its compiling falls in the untimed first epoch, and
               its "saved for backward" is the uncompiled model's;
- losa-e2e:    the same LoSA with the frozen backbone run forward every step;
- linear:      the linear probe from the store;
- full-ft:     full fine-tuning (every backbone weight and a head);
- lora:        LoRA rank 8 on every block's qkv projection (backbone frozen);
- adapter:     a bottleneck adapter (D -> 64 -> D) after every block (backbone frozen).

Each method runs in its own process, so its peak memory is its own: on CUDA the most
allocated; on CPU the peak of private (anonymous) resident memory less that at start
(Python, torch and timm loaded). Both count what the training holds, weights, optimiser
state, batches and activations, and neither counts the dataset: on CUDA it stays on the
host, so on CPU the decoded images of the fine-tuning rows are taken off, and the store's
pages that LoSA maps (page cache, shared and dropped under pressure) are reported apart.
On CPU that takes a second process per method, run with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_), so that freed tensors go back to the OS at once: by default
glibc keeps them, and the resident set grew to twice the live tensors (CUDA's figure
leaves its allocator's cache out too). Times come from the first process, under the
default allocator. The peak resident set is reset after the first epoch
(/proc/self/clear_refs), when every page of the store is mapped, and its file-backed part
is taken off at the end. (Not ru_maxrss: Linux carries it over from the parent across
fork and exec.) Beside it, the bytes autograd saves for backward over one batch, counted
by saved-tensor hooks: a figure no allocator affects (CUDA's fused attention saves somewhat
different tensors than the CPU's). Every method steps a fused AdamW, as sidetrain does.
One epoch = n images in batches. Targets: LoSA from the cache at least 20x faster per
epoch than full fine-tuning, with at most a fifth of its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import timm.data
import torch
import torch.nn.functional as F
from torch import nn

from featcache import ExtractConfig, extract, load_backbone, open_dataset, open_store
from featcache.precision import autocast
from featcache.sources.base import to_rgb
from sidetrain import EndToEnd, ModelSpec, ShardLoader, build_classifier

from common import bar_chart, machine, save, scratch

METHODS = ("losa-cache", "losa-preload", "losa-compiled", "losa-e2e", "linear", "full-ft", "lora", "adapter")


class LoRA(nn.Module):
    """W x + (alpha/r) B A x on a frozen linear layer; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.a.t() @ self.b.t())


class Adapter(nn.Module):
    """A block followed by a residual bottleneck D -> 64 -> D (up-projection starts at zero)."""

    def __init__(self, block: nn.Module, width: int, hidden: int = 64):
        super().__init__()
        self.block, self.down, self.up = block, nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + self.up(F.gelu(self.down(x)))


def backbone_model(args, method: str) -> nn.Module:
    bb = load_backbone(args.model, random_init=True, img_size=args.img_size)
    m = bb.model
    m.reset_classifier(10)
    if method == "full-ft":
        return m.requires_grad_(True).train()
    m.requires_grad_(False)
    m.head.requires_grad_(True)
    if method == "lora":
        for blk in m.blocks:
            blk.attn.qkv = LoRA(blk.attn.qkv)
    if method == "adapter":
        m.blocks = nn.Sequential(*[Adapter(blk, m.embed_dim) for blk in m.blocks])
    return m.train()


def resident() -> dict[str, int]:
    """This process's resident-set figures in bytes: VmHWM (peak), RssAnon, RssFile, RssShmem."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one batch: the activations, whatever the
    allocator (each storage once; parameters, frozen or not, left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[torch.Tensor] = []  # alive until the forward ends, so that no address repeats

    def pack(t: torch.Tensor) -> None:
        if t.untyped_storage().data_ptr() not in weights:
            kept.append(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        model(x)
    total = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())
    # the graph holds `pack`, so `kept` would hold the graph in a cycle through C++ that
    # Python's collector never frees: the batch's activations stayed in every peak after
    kept.clear()
    return total


def run_one(args) -> dict:
    device = torch.device(args.device)
    start = resident() if device.type == "cpu" else {}
    store = open_store(args.store)
    split = open_dataset(args.images).splits["train"]
    labels = torch.from_numpy(split.labels)
    dataset = 0  # bytes of decoded images held, not counted (see the module doc)
    if args.method in ("losa-cache", "losa-preload", "losa-compiled", "linear"):
        # the pool head, as the fine-tuned baselines' heads read the pooled feature
        spec = ModelSpec("linear" if args.method == "linear" else "losa", rank=16, head_input="pool")
        model = build_classifier(spec, store, seed=0).to(device)
        loader = ShardLoader(store, "train", args.batch_size, shuffle=True, recycle=True,  # as fit reads
                             layers=[-1] if args.method == "linear" else None, device=device,
                             preload=args.method == "losa-preload"
                             or (args.method == "losa-compiled" and device.type == "cuda"))
        batches = lambda: ((b.tokens, b.labels) for b in loader.epoch(0))  # noqa: E731
    else:
        bb = load_backbone(args.model, random_init=True, img_size=args.img_size)
        tf = timm.data.create_transform(**bb.data_config, is_training=False)
        images = torch.stack([tf(to_rgb(split.open(i))) for i in range(len(split))])
        dataset = images.nbytes
        if args.method == "losa-e2e":
            side = build_classifier(ModelSpec("losa", rank=16, head_input="pool"), store, 0)
            model = EndToEnd(bb.model, store.taps, side)
        else:
            model = backbone_model(args, args.method)
        model = model.to(device)
        batches = lambda: ((images[i:i + args.batch_size].to(device), labels[i:i + args.batch_size].to(device))  # noqa: E731
                           for i in range(0, len(images), args.batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    with autocast(device.type, args.precision):
        saved = saved_bytes(model, next(batches())[0])
    if args.method == "losa-compiled":
        model = torch.compile(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times = []
    for _ in range(args.epochs):  # the first warms up (allocator, caches); the best of the rest
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:  # the peak resident set restarts from now (see the module doc)
            Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        for x, y in batches():
            with autocast(device.type, args.precision):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = {"method": args.method, "epoch_s": min(times[1:]), "trainable": sum(p.numel() for p in params),
           "saved_bytes": saved}
    if device.type == "cuda":
        return row | {"peak_bytes": torch.cuda.max_memory_allocated()}
    end = resident()
    private = end["VmHWM"] - end["RssFile"] - end["RssShmem"] - start["RssAnon"]
    return row | {"peak_bytes": private - dataset, "mapped_bytes": end["RssFile"] - start["RssFile"]}


def run_child(command: list[str], **env: str) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ | env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one child process
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    cpu = torch.device(args.device).type == "cpu"
    with scratch() as tmp:
        images = Path(tmp) / "images"
        from extract_throughput import write_images
        write_images(images, args.n)
        store = Path(tmp) / "store"
        extract(ExtractConfig(model=args.model, random_init=True, img_size=args.img_size,
                              dataset=str(images), out=store, device=args.device, val_fraction=0.01))
        child = [sys.executable, __file__, "--store", str(store), "--images", str(images), "--model",
                 args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                 "--device", args.device, "--precision", args.precision]
        rows = []
        for method in METHODS:
            if cpu and method == "losa-preload":  # (the page cache holds the store on a CPU)
                continue
            row = run_child(child + ["--method", method])
            if cpu:  # the memory from a second process (see the module doc)
                memory = run_child(child + ["--method", method, "--epochs", "2"],
                                   MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
                row |= {k: memory[k] for k in ("peak_bytes", "mapped_bytes")}
            rows.append(row)
    ft = next(r for r in rows if r["method"] == "full-ft")
    print(f"\ntraining cost per epoch: {args.model} at {args.img_size} px, {args.n} images, batch "
          f"{args.batch_size}, {args.precision}, {machine()}\n")
    print("| method | trainable params | epoch (s) | speed-up vs full FT | peak memory | vs full FT "
          "| saved for backward |" + (" files mapped |" if cpu else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else ""))
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['epoch_s']:.2f} | {ft['epoch_s'] / r['epoch_s']:.1f}x | "
              f"{r['peak_bytes'] / 2**20:,.0f} MiB | {r['peak_bytes'] / ft['peak_bytes']:.2f} | "
              f"{r['saved_bytes'] / 2**20:,.0f} MiB |" + (f" {r['mapped_bytes'] / 2**20:,.0f} MiB |" if cpu else ""))
    print("\npeak memory: " + ("the most allocated on the GPU" if not cpu else
                            "peak private resident memory less that at start (libraries loaded) and "
                            "the decoded images; files mapped apart (the store for LoSA and the probe, "
                            "and in every row the library code loaded late)")
          + ". saved for backward: the activations autograd keeps over one batch")
    stem = f"training_cost_{'cpu' if cpu else 'cuda'}_{args.model}" + ("_bf16" if args.precision == "bf16" else "")
    path = save(stem, {"model": args.model, "img_size": args.img_size, "n": args.n, "precision": args.precision,
                       "batch_size": args.batch_size, "machine": machine(), "rows": rows})
    png = bar_chart(stem, [r["method"] for r in rows],
                    [ft["epoch_s"] / r["epoch_s"] for r in rows], "epoch speed-up vs full FT",
                    f"training cost, {args.model} {args.img_size} px, {args.precision}, {machine()}", target=20)
    print(f"\nwritten: {path} and {png.name}")


if __name__ == "__main__":
    main()
