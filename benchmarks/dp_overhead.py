"""DP-SGD overhead: time per step and peak memory of Opacus' per-sample gradient modes against
a plain step, on the same model (embedded MiniLM + LoRA), batch and sequence length.

    python -m benchmarks.dp_overhead [--quick] [--bf16] [--model PATH] [--batch-size N]

Each mode runs in its own process so its peak resident memory (CPU) or peak allocated CUDA
memory is its own. `--bf16` runs the forward and backward passes under bf16 autocast (CUDA);
a mode that fails is recorded with its error. On a GPU the figures go to dp_overhead-gpu.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from benchmarks.shared_data import SHARED_BANKING77

MODES = ("plain", "hooks", "functorch", "ghost")


def measure(mode: str, steps: int, batch_size: int, max_length: int, *, model_name: str = "",
            bf16: bool = False) -> dict[str, float]:
    """Median seconds per step after one warm-up step, and peak memory, for one mode."""
    from opacus import PrivacyEngine

    from fedtune.common.config import RunConfig
    from fedtune.common.task import build_task
    data_path = SHARED_BANKING77 if SHARED_BANKING77.is_dir() else "builtin"
    values = {"data.path": str(data_path), "model.max_length": max_length}
    task = build_task(RunConfig.from_mapping(
        {**values, **({"model.name": model_name} if model_name else {})}))
    wanted = np.arange(batch_size * (steps + 1) * 4)  # the built-in set repeats when small
    rows = task.data.train.subset(wanted % len(task.data.train))
    model, device = task.model, task.device
    loader = task.loader(rows, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    baseline = _peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    if mode != "plain":
        engine = PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                       poisson_sampling=False, grad_sample_mode=mode,
                                       criterion=criterion)
        model, optimizer, loader = made[0], made[1], made[-1]
        if mode == "ghost":
            criterion = made[2]
    times = []
    warnings.simplefilter("ignore")
    for step, batch in enumerate(loader):
        if step > steps:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(**batch).logits.float(), labels)
        loss.backward()
        if mode == "plain":
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else _peak_rss_mib())
    return {"seconds_per_step": float(np.median(times)), "peak_mib": peak,
            "peak_over_loaded_model_mib": peak - (0 if device.type == "cuda" else baseline),
            "device": device.type}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 8: checks it runs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--model", default="", help="model path (default: the embedded MiniLM)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 32 (8 with --quick)")
    parser.add_argument("--max-length", type=int, default=0, help="default 64 (32 with --quick)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    steps, batch_size, max_length = (3, 8, 32) if args.quick else (10, 32, 64)
    batch_size, max_length = args.batch_size or batch_size, args.max_length or max_length
    if args.mode:
        print(json.dumps(measure(args.mode, steps, batch_size, max_length,
                                 model_name=args.model, bf16=args.bf16)))
        return
    figures = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, "-m", "benchmarks.dp_overhead", "--mode", mode,
                               "--batch-size", str(batch_size), "--max-length", str(max_length),
                               *(["--quick"] if args.quick else []),
                               *(["--bf16"] if args.bf16 else []),
                               *(["--model", args.model] if args.model else [])],
                              capture_output=True, text=True)
        figures[mode] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                         else {"error": done.stderr.strip().splitlines()[-1:]})
        print(mode, figures[mode], flush=True)
    plain = figures["plain"]
    ratios = {mode: {"time_ratio": figures[mode]["seconds_per_step"] / plain["seconds_per_step"],
                     "memory_ratio": figures[mode]["peak_over_loaded_model_mib"]
                     / max(plain["peak_over_loaded_model_mib"], 1e-9)}
              for mode in MODES if mode != "plain" and "error" not in figures[mode]}
    from benchmarks.plots import bar_chart
    from benchmarks.record import save

    name = "dp_overhead-gpu" if torch.cuda.is_available() else "dp_overhead"
    path = save(f"{name}-bf16" if args.bf16 else name,
                {"batch_size": batch_size, "max_length": max_length, "bf16": args.bf16,
                 "model": args.model or "embedded", "steps": steps, "modes": figures,
                 "ratios": ratios, "goal_time_ratio": 1.2}, quick=args.quick)
    bar_chart(path.with_suffix(".png"), {m: r["time_ratio"] for m, r in ratios.items()},
              title="DP-SGD step time / plain step time", goal=1.2)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
