"""DP-SGD overhead: time per step and peak memory of Opacus' per-sample gradient modes against
a plain step, on the same model (embedded MiniLM + LoRA), batch and sequence length.

    python -m benchmarks.dp_overhead [--quick]

Each mode runs in its own process so its peak resident memory (CPU) or peak allocated CUDA
memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

MODES = ("plain", "hooks", "functorch", "ghost")
SHARED_BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def measure(mode: str, steps: int, batch_size: int, max_length: int) -> dict[str, float]:
    """Median seconds per step after one warm-up step, and peak memory, for one mode."""
    from opacus import PrivacyEngine

    from common.config import RunConfig
    from common.task import build_task
    data_path = SHARED_BANKING77 if SHARED_BANKING77.is_dir() else "builtin"
    task = build_task(RunConfig.from_mapping({"data.path": str(data_path),
                                              "model.max_length": max_length}))
    rows = task.data.train.subset(np.arange(batch_size * (steps + 1) * 4))
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
        loss = criterion(model(**batch).logits, labels)
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
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    steps, batch_size, max_length = (3, 8, 32) if args.quick else (10, 32, 64)
    if args.mode:
        print(json.dumps(measure(args.mode, steps, batch_size, max_length)))
        return
    figures = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, "-m", "benchmarks.dp_overhead", "--mode", mode,
                               *(["--quick"] if args.quick else [])],
                              capture_output=True, text=True, check=True)
        figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, figures[mode], flush=True)
    plain = figures["plain"]
    ratios = {mode: {"time_ratio": figures[mode]["seconds_per_step"] / plain["seconds_per_step"],
                     "memory_ratio": figures[mode]["peak_over_loaded_model_mib"]
                     / max(plain["peak_over_loaded_model_mib"], 1e-9)}
              for mode in MODES if mode != "plain"}
    from benchmarks.plots import bar_chart
    from benchmarks.record import save

    path = save("dp_overhead", {"batch_size": batch_size, "max_length": max_length,
                                "steps": steps, "modes": figures, "ratios": ratios,
                                "goal_time_ratio": 1.2}, quick=args.quick)
    bar_chart(path.with_suffix(".png"), {m: r["time_ratio"] for m, r in ratios.items()},
              title="DP-SGD step time / plain step time", goal=1.2)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
