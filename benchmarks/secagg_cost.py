"""Secure aggregation's cost: crypto seconds per client and at the server, bytes per client,
for 5/10/20/50 clients and two vector sizes (the embedded MiniLM's adapter, and 1M values);
against the plain round (float32 upload; one client's local training on a tenth of banking77).

    python -m benchmarks.secagg_cost [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from client.secagg import SecAggClient
from common.secagg import ring
from server.secagg import SecAggServer


def one_round(clients: int, length: int) -> dict[str, float]:
    """Run the four steps in process, timing each role and counting what each client sends."""
    rng = np.random.default_rng(0)
    server = SecAggServer(server_round=1)
    names = [f"client-{i:03d}" for i in range(clients)]
    parties = {n: SecAggClient(n, server.session, 1) for n in names}
    client_s = dict.fromkeys(names, 0.0)
    sent = dict.fromkeys(names, 0)

    def timed(name, call, *args):
        started = time.perf_counter()
        result = call(*args)
        client_s[name] += time.perf_counter() - started
        return result

    keys = {n: timed(n, parties[n].public_keys) for n in names}
    for n in names:
        sent[n] += 64
    started = time.perf_counter()
    cohort = server.make_cohort(keys)
    server_s = time.perf_counter() - started
    sealed = {n: timed(n, parties[n].share_secrets, cohort) for n in names}
    for n in names:
        sent[n] += sum(len(c) for c in sealed[n].values())
    started = time.perf_counter()
    inbox = server.route(sealed)
    server_s += time.perf_counter() - started
    vectors = {n: rng.normal(scale=0.05, size=length) for n in names}
    masked = {n: timed(n, parties[n].mask, inbox[n], vectors[n]) for n in names}
    for n in names:
        sent[n] += masked[n].nbytes
    survivors, dropped = server.reveal_lists(masked)
    reveals = {n: timed(n, parties[n].reveal, survivors, dropped) for n in names}
    for n in names:
        sent[n] += sum(len(r.share) + 16 for r in reveals[n])
    started = time.perf_counter()
    total = server.unmask(masked, reveals)
    server_s += time.perf_counter() - started
    error = np.abs(ring.decode(total) - np.sum(list(vectors.values()), axis=0)).max()
    assert error <= ring.error_bound(clients), error
    return {"clients": clients, "length": length, "neighbours": cohort.neighbours,
            "threshold": cohort.threshold,
            "client_crypto_seconds": float(np.mean(list(client_s.values()))),
            "server_crypto_seconds": server_s,
            "bytes_up_per_client": float(np.mean(list(sent.values()))),
            "plain_bytes_up_per_client": 4.0 * length,
            "bytes_ratio": float(np.mean(list(sent.values()))) / (4.0 * length)}


def adapter_length() -> int:
    from common.config import RunConfig
    from common.task import build_task

    task = build_task(RunConfig())
    return sum(v.size for v in task.initial_adapter.values()) + 1


def local_training_seconds(quick: bool) -> float:
    """One client's local epoch on a tenth of banking77 (MiniLM, batch 32, 64 tokens)."""
    from benchmarks.dp_overhead import SHARED_BANKING77
    from common.config import RunConfig
    from common.task import build_task
    from common.training import adamw, train_local

    path = str(SHARED_BANKING77) if SHARED_BANKING77.is_dir() else "builtin"
    task = build_task(RunConfig.from_mapping({"data.path": path, "model.max_length": 64}))
    rows, _ = task.client_examples(task.config.partition, 0, 10)
    if quick:
        rows = rows.subset(np.arange(32))
    loader = task.loader(rows, batch_size=32, shuffle=True)
    started = time.perf_counter()
    train_local(task.model, loader, adamw(task.model, 1e-3, 0.0), loss_fn=task.objective.loss,
                epochs=1, max_steps=0,
                max_grad_norm=1.0, device=task.device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 clients, small vectors")
    args = parser.parse_args()
    lengths = {"minilm_adapter": adapter_length(), "one_million": 1_000_000}
    sizes = (5, 10, 20, 50)
    if args.quick:
        lengths, sizes = {"small": 1000}, (5,)
    rows = []
    for label, length in lengths.items():
        for clients in sizes:
            row = {"vector": label, **one_round(clients, length)}
            rows.append(row)
            print(row, flush=True)
    training = local_training_seconds(args.quick)
    at_ten = next((r for r in rows if r["clients"] == 10 and r["vector"] == "minilm_adapter"),
                  rows[0])
    crypto_share = at_ten["client_crypto_seconds"] / (at_ten["client_crypto_seconds"] + training)
    from benchmarks.plots import line_chart
    from benchmarks.record import save

    path = save("secagg_cost", {"rounds": rows, "local_training_seconds": training,
                                "crypto_share_of_client_round_at_10": crypto_share,
                                "goal_crypto_share": 0.10, "goal_bytes_ratio": 1.1},
                quick=args.quick)
    series = {label: ([r["clients"] for r in rows if r["vector"] == label],
                      [r["client_crypto_seconds"] for r in rows if r["vector"] == label])
              for label in lengths}
    line_chart(path.with_suffix(".png"), series, xlabel="clients",
               ylabel="client crypto seconds per round", title="Secure aggregation cost")
    print(f"local training {training:.2f}s; crypto share at 10 clients {crypto_share:.3f}")


if __name__ == "__main__":
    main()
