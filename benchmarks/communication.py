"""Communication per client per round: the adapter fedtune sends, against the full model a
full-model FedAvg would send, plain (float32) and under secure aggregation (uint32 ring).

    python -m benchmarks.communication [--quick]

Counts are the bytes of the exact records exchanged (`ArrayRecord.count_bytes`); fedtune does
not quantise updates.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.shared_data import SHARED_BANKING77


def measure(data_path: str, rank: int) -> dict[str, float]:
    from fedtune.common.adapter_state import to_record
    from fedtune.common.config import RunConfig
    from fedtune.common.secagg.plan import summation_for
    from fedtune.common.task import build_task

    task = build_task(RunConfig.from_mapping({"data.path": data_path, "lora.r": rank}))
    adapter = task.initial_adapter
    adapter_bytes = to_record(adapter).count_bytes()
    full = {name: p.detach().cpu().numpy() for name, p in task.model.named_parameters()}
    full_bytes = to_record(full).count_bytes()
    summation = summation_for(task.config, 10)
    vector = summation.to_vector({k: v * 0 for k, v in adapter.items()}, 100, 1.0)
    masked_bytes = summation.encoding.encode(vector, np.random.default_rng(0)).nbytes
    return {"labels": task.data.num_labels, "lora_r": rank,
            "adapter_values": int(sum(v.size for v in adapter.values())),
            "full_model_values": int(sum(v.size for v in full.values())),
            "adapter_bytes": adapter_bytes, "full_model_bytes": full_bytes,
            "adapter_over_full": adapter_bytes / full_bytes,
            "secagg_upload_bytes": masked_bytes,
            "secagg_over_plain_upload": masked_bytes / adapter_bytes,
            "per_client_round_bytes": 2 * adapter_bytes,
            "per_client_round_bytes_full_model": 2 * full_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the built-in set, rank 8 only")
    args = parser.parse_args()
    banking = str(SHARED_BANKING77) if SHARED_BANKING77.is_dir() else "builtin"
    cases = [("builtin", 8)] if args.quick else [
        ("builtin", 8), (banking, 4), (banking, 8), (banking, 16)]
    rows = []
    for path, rank in cases:
        row = {"data": "builtin" if path == "builtin" else "banking77", **measure(path, rank)}
        rows.append(row)
        print(row, flush=True)
    from benchmarks.plots import bar_chart
    from benchmarks.record import save

    out = save("communication", {"cases": rows, "quantisation": "none (float32 adapter; "
                                 "uint32 ring under secure aggregation)"}, quick=args.quick)
    bar_chart(out.with_suffix(".png"),
              {f"{r['data']} r{r['lora_r']}": 100 * r["adapter_over_full"] for r in rows},
              title="Adapter bytes per round, % of the full model")


if __name__ == "__main__":
    main()
