"""How separable the frozen model's sentence features are, per pooling: a linear probe.

DP-SGD's noise leaves the LoRA update small, so a private model scores about what a linear head
on the frozen features scores. The classifier fedtune fine-tunes (Hugging Face's
`...ForSequenceClassification`) reads BERT's pooler: a dense layer and tanh over the first token.
The embedded MiniLM is a sentence-transformers model trained with mean pooling, so this compares
the three on the same rows:

    python -m benchmarks.feature_probe --data DIR [--data DIR ...] [--rows 2000]

Per data set and pooling ('cls': the first token's hidden state, 'pooler': what the classifier
reads, 'mean': the masked mean of the hidden states), a full-batch softmax regression (Adam, 300
steps, seeded) on `--rows` seeded training rows, scored on up to 1,000 test rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from benchmarks.record import save
from fedtune.common.config import DataConfig
from fedtune.common.data import Examples, load_data
from fedtune.common.mean_pooling import masked_mean
from fedtune.common.model import load_tokenizer, resolve_model_path

POOLINGS = ("cls", "pooler", "mean")


def features(model: torch.nn.Module, tokenizer, rows: Examples, max_length: int,
             ) -> dict[str, torch.Tensor]:
    """Each pooling's (rows, hidden) features of the frozen model."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in POOLINGS}
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = tokenizer(rows.texts[start:start + 64], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            result = model(**batch)
            hidden = result.last_hidden_state
            out["cls"].append(hidden[:, 0])
            if getattr(result, "pooler_output", None) is not None:  # BERT-like models only
                out["pooler"].append(result.pooler_output)
            out["mean"].append(masked_mean(hidden, batch["attention_mask"]))
    return {name: torch.cat(parts) for name, parts in out.items() if parts}


def probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
          test_labels: torch.Tensor, num_labels: int) -> float:
    """Test accuracy of a softmax regression fitted on the training features."""
    torch.manual_seed(0)
    head = torch.nn.Linear(train.shape[1], num_labels)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(train), train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(test).argmax(1) == test_labels).float().mean())


def seeded(rows: Examples, count: int) -> Examples:
    return rows.subset(np.random.default_rng(0).permutation(len(rows))[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a data directory")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (seeded)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = AutoModel.from_pretrained(resolve_model_path(args.model)).eval()
    results = {}
    for directory in args.data:
        data = load_data(DataConfig(path=directory), seed=0)
        train, test = seeded(data.train, args.rows), seeded(data.test, 1000)
        train_x = features(model, tokenizer, train, args.max_length)
        test_x = features(model, tokenizer, test, args.max_length)
        train_y, test_y = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
        results[Path(directory).name] = {
            name: round(probe(train_x[name], train_y, test_x[name], test_y, data.num_labels), 3)
            for name in train_x}
        print(Path(directory).name, results[Path(directory).name], flush=True)
    save("feature_probe", {"rows": args.rows, "model": args.model, "accuracy": results},
         quick=False)


if __name__ == "__main__":
    main()
