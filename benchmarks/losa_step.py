"""Where a LoSA training step's time goes: the host launching kernels, or the device.

    python benchmarks/losa_step.py [--device cuda] [--model vit_base --img-size 224] [--batch-size 32]

Random tokens shaped as the (random-init) backbone's taps, the default LoSA (rank 16,
variant B, last4 head), a fused AdamW and gradient clipping, as `sidetrain fit` trains,
with the batch already on the device (what `--preload` gives). Reports per step: the wall
time (steps run back to back, as training runs them), the kernels launched (on a CPU,
the ATen ops that do the work) and, on CUDA, the time the GPU spends running them. A GPU
time far below the wall time means the step waits on the host launching its kernels (a
CUDA graph or fused kernels would pay); about the same means it waits on the GPU. The
same step is then run with the model through torch.compile (`fit --compile`: fused
kernels), and on CUDA also compiled with CUDA graphs (mode reduce-overhead) and captured
whole in a CUDA graph and replayed (the most a graph could save). Compile time is
reported apart. Writes benchmarks/results/losa_step_<cpu|cuda>_<model>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from featcache import load_backbone
from sidetrain import ModelSpec
from sidetrain.classifier import make_classifier

from common import machine, save

# view and bookkeeping ops, which launch no kernel: left out of a CPU's count
NO_WORK = {"aten::" + name for name in (
    "as_strided", "resolve_conj", "view", "empty", "empty_strided", "detach", "expand", "t",
    "transpose", "unsqueeze", "squeeze", "_local_scalar_dense", "item", "to", "_unsafe_view",
    "reshape", "slice", "select", "permute", "unflatten", "flatten", "alias", "lift_fresh",
    "_reshape_alias", "contiguous", "result_type", "promote_types", "new_empty",
    "new_empty_strided", "empty_like")}


def build(args: argparse.Namespace, device: torch.device):
    bb = load_backbone(args.model, random_init=True, img_size=args.img_size)
    layout, layers = bb.layout(), len(bb.blocks)  # every block tapped, as extract's default
    model = make_classifier(ModelSpec("losa", rank=16), bb.final_norms(), layout, 10, layers, 0).to(device)
    tokens = torch.randn(args.batch_size, layers, layout.tokens, layout.width, device=device).half()
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    return model, tokens, labels


def make_step(model: torch.nn.Module, device: torch.device, capturable: bool = False, net=None):
    """`net`: what runs the forward (model compiled, say); `model` by default."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=capturable)
    net = model if net is None else net

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def eager(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        step(x, y)
    return eager, step, opt


def per_step(run, n: int, device: torch.device) -> float:
    """Seconds per step, `n` steps back to back (the best of three such runs)."""
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def profiled(run, device: torch.device) -> tuple[int, float | None]:
    """(kernels one step launches, GPU milliseconds they run; None on a CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(kernels), sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    work = [e for e in events if e.name.startswith("aten::") and e.name not in NO_WORK
            and not any(c.name.startswith("aten::") and c.name not in NO_WORK for c in e.cpu_children)]
    return len(work), None


def graphed(model, tokens, labels, device: torch.device, n: int) -> float:
    """Seconds per step replayed from a CUDA graph of the whole step (forward, backward,
    clipping, AdamW), as torch's whole-network capture recipe does it."""
    _, step, opt = make_step(model, device, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(tokens, labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step(tokens, labels)
    return per_step(graph.replay, n, device)


def compiled(model, tokens, labels, device: torch.device, n: int, mode: str | None) -> dict:
    """Milliseconds per step with the model through torch.compile, and seconds compiling."""
    torch._dynamo.reset()  # (each mode compiles from scratch)
    eager, _, _ = make_step(model, device, net=torch.compile(model, mode=mode))
    run = lambda: eager(tokens, labels)  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(3):  # (reduce-overhead records its graphs at the second and third)
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    row = {"step_ms": 1e3 * per_step(run, n, device), "compile_s": time.perf_counter() - t0}
    if device.type == "cuda":  # (on a CPU the fused kernels are no ATen ops to count)
        row |= dict(zip(("kernels", "gpu_ms"), profiled(run, device)))
    return row


def print_row(r: dict, eager_ms: float | None) -> None:
    if "error" in r:
        print(f"| {r['mode']} | failed: {r['error']} | | | | |", flush=True)
        return
    gpu = "" if r.get("gpu_ms") is None else f"{r['gpu_ms']:.1f}"
    took = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
    ratio = "" if eager_ms is None else f"{eager_ms / r['step_ms']:.2f}x"
    print(f"| {r['mode']} | {r['step_ms']:.1f} | {ratio} | "
          f"{r.get('kernels', '')} | {gpu} | {took} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tokens, labels = build(args, device)
    print(f"\nLoSA training step: {args.model} at {args.img_size} px ({tokens.shape[1]} taps x "
          f"{tokens.shape[2]} tokens x {tokens.shape[3]}), batch {args.batch_size}, {machine()}\n")
    print("| mode | step (ms) | vs eager | kernels | GPU busy (ms) | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    eager, _, _ = make_step(model, device)
    run = lambda: eager(tokens, labels)  # noqa: E731
    for _ in range(3):  # allocator, cuBLAS handles, kernel selection
        run()
    modes = {"eager": lambda: {"step_ms": 1e3 * per_step(run, args.steps, device)}
             | dict(zip(("kernels", "gpu_ms"), profiled(run, device)))}
    modes["torch.compile"] = lambda: compiled(model, tokens, labels, device, args.steps, None)
    if device.type == "cuda":
        modes["torch.compile reduce-overhead"] = lambda: compiled(model, tokens, labels, device, args.steps,
                                                                  "reduce-overhead")
        modes["CUDA graph"] = lambda: {"step_ms": 1e3 * graphed(model, tokens, labels, device, args.steps)}
    meta = {"machine": machine(), "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size}
    rows = []
    for mode, measure in modes.items():  # each row printed and saved as it comes (a time limit may cut the rest)
        try:
            rows.append({"mode": mode, **measure()})
        except Exception as e:  # what compile or capture refuses is itself the finding
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {e}"[:300]})
        print_row(rows[-1], rows[0].get("step_ms"))
        written = save(f"losa_step_{device.type}_{args.model}", {**meta, "rows": rows})
    print(f"\nwritten: {written}")


if __name__ == "__main__":
    main()
