"""What a private head alone reaches on the frozen MiniLM's features: an upper view of two DP-SGD
levers without training the encoder (docs/utility.md, "the DP gap").

    python -m benchmarks.head_only_dp --data DIR [--data DIR ...] [--rows 2000,4000,8000]

On seeded 2,000 training / 500 test rows (the privacy-utility subsamples' size), split round-robin
into 5 clients of 400 rows, each client's rows as masked-mean features of the frozen encoder:
- **more local epochs**: federated DP-SGD of the linear head alone (Poisson batches, each
  example's gradient clipped to 1, Gaussian noise at the PRV multiplier for epsilon 8 over 5
  rounds, the noisy sum divided by the expected batch, AdamW, FedAvg), with fedtune's DP-SGD
  schedule at batch 256 (`dp_sgd_schedule`: a 400-row client takes 2 steps of rate 1/2 an epoch)
  and 2, 4, 8 or 16 local epochs a round;
- **a warm start of the head from noisy class sums**: each client releases its per-class sums of
  unit-norm features once (sensitivity 1) with Gaussian noise for epsilon e at delta 1/(10 n);
  the server's summed class directions classify by cosine (nearest class mean): what a warm
  start of the head paid with e of the budget would start DP-SGD from.

With `--rows`, instead: the private head at fedtune's DP-SGD local epochs against the same head
trained without clipping or noise, on each number of training rows (5 clients of a fifth each),
scored on the whole test split, three seeds: the DP gap's dependence on rows, measured where a
full run per size would take hours.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel

from benchmarks.feature_probe import features, seeded
from benchmarks.record import save
from fedtune.common.config import DP_SGD_TRAINING, DataConfig
from fedtune.common.data import load_data
from fedtune.common.model import load_tokenizer, resolve_model_path
from fedtune.common.privacy import default_delta, dp_sgd_schedule, noise_for_target

CLIENTS, ROWS, TEST_ROWS, ROUNDS, EPSILON, BATCH = 5, 2000, 500, 5, 8.0, 256
EPOCHS = (2, 4, 8, 16)
WARM_EPSILONS = (1.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1, 2)  # --rows: each size's heads are trained with these seeds


def private_head(x: torch.Tensor, y: torch.Tensor, num_labels: int, epochs: int, lr: float,
                 seed: int = 0, private: bool = True) -> torch.nn.Linear:
    """FedAvg over CLIENTS of DP-SGD on a linear head; returns the global head. `private=False`
    is the same schedule without clipping or noise: the reference its DP cost is read against."""
    rows = len(x) // CLIENTS
    rate, steps = dp_sgd_schedule(rows, BATCH, epochs, 0)  # fedtune's own schedule
    noise = noise_for_target(EPSILON, default_delta(rows), rate, steps * ROUNDS, "prv") \
        if private else 0.0
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.zeros(num_labels, x.shape[1]), torch.zeros(num_labels)
    for _ in range(ROUNDS):
        trained = []
        for client in range(CLIENTS):
            xs, ys = x[client::CLIENTS][:rows], y[client::CLIENTS][:rows]
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            optimizer = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0)
            for _ in range(steps):
                take = torch.rand(rows, generator=generator) < rate
                xb, yb = xs[take], ys[take]
                residual = torch.softmax(xb @ w.detach().T + b.detach(), 1)
                residual[torch.arange(len(yb)), yb] -= 1  # d loss / d logits, per example
                norm = torch.sqrt(residual.pow(2).sum(1) * (xb.pow(2).sum(1) + 1))
                scale = torch.clamp(1.0 / (norm + 1e-6), max=1.0)[:, None] if private else 1.0
                grad_w = (residual * scale).T @ xb
                grad_b = (residual * scale).sum(0)
                grad_w += torch.randn(grad_w.shape, generator=generator) * noise
                grad_b += torch.randn(grad_b.shape, generator=generator) * noise
                w.grad, b.grad = grad_w / (rate * rows), grad_b / (rate * rows)
                optimizer.step()
            trained.append((w.detach(), b.detach()))
        weight = torch.stack([w for w, _ in trained]).mean(0)
        bias = torch.stack([b for _, b in trained]).mean(0)
    head = torch.nn.Linear(x.shape[1], num_labels)
    head.weight.data, head.bias.data = weight, bias
    return head


def noisy_class_means(x: torch.Tensor, y: torch.Tensor, num_labels: int, epsilon: float | None,
                      seed: int = 0) -> torch.Tensor:
    """Unit class directions from every client's per-class sums of unit features, each client's
    sums noised for `epsilon` (None: no noise)."""
    unit = torch.nn.functional.normalize(x, dim=1)
    rows = len(x) // CLIENTS
    noise = 0.0 if epsilon is None else noise_for_target(epsilon, default_delta(rows), 1.0, 1,
                                                         "prv")
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(num_labels, x.shape[1])
    for client in range(CLIENTS):
        sums = torch.zeros(num_labels, x.shape[1]).index_add_(0, y[client::CLIENTS],
                                                               unit[client::CLIENTS])
        total += sums + torch.randn(sums.shape, generator=generator) * noise
    return torch.nn.functional.normalize(total, dim=1)  # a frequent class's sum is no vote


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((scores.argmax(1) == labels).float().mean()), 3)


def measure(directory: str, model: torch.nn.Module, tokenizer: Any, lr: float) -> dict[str, Any]:
    data = load_data(DataConfig(path=directory), seed=0)
    train, test = seeded(data.train, ROWS), seeded(data.test, TEST_ROWS)
    x, tx = (features(model, tokenizer, rows, 128)["mean"] for rows in (train, test))
    y, ty = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    k = data.num_labels
    with torch.no_grad():
        heads = {str(e): accuracy(private_head(x, y, k, e, lr)(tx), ty) for e in EPOCHS}
        unit = torch.nn.functional.normalize(tx, dim=1)
        means = {str(e): accuracy(unit @ noisy_class_means(x, y, k, e).T, ty)
                 for e in (*WARM_EPSILONS, None)}
    return {"train_rows": len(train), "test_rows": len(test),
            "dp_head_by_local_epochs": heads, "class_means_by_epsilon": means}


def by_rows(directory: str, model: torch.nn.Module, tokenizer: Any, lr: float,
            sizes: list[int]) -> dict[str, Any]:
    """The private head at fedtune's DP-SGD epochs against the same head without DP, on seeded
    subsamples of each size (each one the start of the next), scored on the whole test split,
    mean of SEEDS (batches and noise): how the DP gap moves with rows. A size above the data's is
    all of it; each client keeps a fifth of the rows, rounded down (10,003 rows: 10,000 used)."""
    data = load_data(DataConfig(path=directory), seed=0)
    train, test = seeded(data.train, max(sizes)), data.test
    x, tx = (features(model, tokenizer, rows, 128)["mean"] for rows in (train, test))
    y, ty = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    epochs, out = DP_SGD_TRAINING["local_epochs"], {}
    with torch.no_grad():
        for n in sorted({min(n, len(train)) for n in sizes}):
            dp, plain = ([accuracy(private_head(x[:n], y[:n], data.num_labels, epochs, lr, seed,
                                                private)(tx), ty) for seed in SEEDS]
                         for private in (True, False))
            dp_mean, plain_mean = statistics.mean(dp), statistics.mean(plain)
            out[str(n)] = {"dp": round(dp_mean, 3), "no_dp": round(plain_mean, 3),
                           "gap_points": round(100 * (plain_mean - dp_mean), 1),
                           "dp_by_seed": dp, "no_dp_by_seed": plain}
    return {"test_rows": len(test), "local_epochs": epochs, "seeds": list(SEEDS),
            "by_train_rows": out}


def row_counts(text: str) -> list[int]:
    """--rows' sizes: whole numbers, each at least a row a client."""
    # argparse prints this one line, then exits 2
    wrong = argparse.ArgumentTypeError(f"{text!r}: each size must be a whole number of at "
                                       f"least {CLIENTS} rows (one a client)")
    try:
        sizes = [int(n) for n in text.split(",")] if text else []
    except ValueError:
        raise wrong from None
    if any(n < CLIENTS for n in sizes):
        raise wrong
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a data directory")
    parser.add_argument("--head-lr", type=float, default=5e-2, help="the DP-SGD head default")
    parser.add_argument("--rows", default="", type=row_counts,
                        help="training-row counts, e.g. 2000,4000,8000: the DP gap of the head "
                             "against rows instead (head_only_dp_rows.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("embedded")
    model = AutoModel.from_pretrained(resolve_model_path("embedded")).eval()
    results = {}
    for directory in args.data:
        name = Path(directory).name
        results[name] = (by_rows(directory, model, tokenizer, args.head_lr, args.rows)
                         if args.rows else measure(directory, model, tokenizer, args.head_lr))
        print(name, results[name], flush=True)
    save("head_only_dp_rows" if args.rows else "head_only_dp",
         {"clients": CLIENTS, "rounds": ROUNDS, "epsilon": EPSILON, "expected_batch": BATCH,
          "head_lr": args.head_lr, "results": results}, quick=False)


if __name__ == "__main__":
    main()
