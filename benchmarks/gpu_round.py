"""Federated causal-LM rounds on a GPU with the frozen base in 4-bit (bitsandbytes): time and
memory of the first round against the second, and the perplexity they reach.

    python -m benchmarks.gpu_round [--quantize 4bit] [--dp] [--hidden 512] [--layers 8]

A lent GPU machine has no Ray, so the rounds run fedtune's real ServerApp and ClientApp in one
process over a direct grid: each message is handed to its node's ClientApp and the reply comes
back, as the SuperLink would carry it. The Llama-shaped base is built in code (random weights,
so its perplexity shows that training works, not what a pretrained model reaches).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

SUPERLINK = 1  # the sender Flower writes on what its SuperLink sends


class DirectGrid(Grid):
    """A grid whose nodes are ClientApps in this process: a push runs them, a pull returns."""

    def __init__(self, client_app, contexts: dict[int, Context]) -> None:
        self.client_app, self.contexts = client_app, contexts
        from flwr.supercore.run import Run  # Flower's own record of a run (not public API)

        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__.update(_run_id=self._run.run_id, _src_node_id=SUPERLINK)
            message.metadata.__dict__["_message_id"] = message.object_id
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # a node's failure is an error reply, as on a SuperLink
                traceback.print_exc()
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(list(messages)))


def llama_base(directory: Path, hidden: int, layers: int) -> Path:
    """A Llama-shaped causal LM (random weights) with the tests' word tokenizer, by path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import word_tokenizer

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=256, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def instruction_data(directory: Path, rows: int) -> Path:
    from tests.conftest import instruction_rows, write_jsonl

    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "train.jsonl", instruction_rows(rows))
    write_jsonl(directory / "test.jsonl", instruction_rows(max(rows // 4, 8), offset=rows))
    return directory


def run_rounds(work: Path, args: argparse.Namespace) -> dict:
    """`args.rounds` rounds of `args.clients` nodes; each round's seconds, metrics and peak."""
    from fedtune.client.app import app as client_app
    from fedtune.common.config import RunConfig
    from fedtune.server import progress
    from fedtune.server.app import make_server_app
    from fedtune.server.metrics_log import read_rounds

    shutil.rmtree(work, ignore_errors=True)
    values = {"model.task": "causal-lm", "model.quantize": args.quantize,
              "model.name": str(llama_base(work / "base", args.hidden, args.layers)),
              "model.max_length": 48, "data.path": str(instruction_data(work / "data", 400)),
              "federation.num_clients": args.clients, "federation.rounds": args.rounds,
              "train.batch_size": 16, "train.lr": 0.02, "output.dir": str(work / "run"),
              "privacy.dp": args.dp}
    if args.dp:
        values["privacy.epsilon"] = 8.0
    config = RunConfig.from_mapping(values)
    names = {100 + i: f"client-{i}" for i in range(args.clients)}
    contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"partition-id": i, "num-partitions": args.clients})
                for i, node in enumerate(names)}
    grid = DirectGrid(client_app, contexts)
    from flwr.supercore.task_identity import TaskIdentity  # what a ServerApp process is told

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 1
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with progress.shown(progress.RoundProgress()) as display:
        server_app = make_server_app(config, node_names=names.get, display=display)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                 run_config={}))
    rows = read_rounds(Path(config.output.dir))
    return {"settings": values, "seconds_total": time.perf_counter() - started,
            "rounds": rows,
            "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20
                              if torch.cuda.is_available() else None),
            "bitsandbytes_4bit_layers": _quantized_layers(config) if args.quantize != "none"
            else 0}


def _quantized_layers(config) -> int:
    """How many Linear4bit/Linear8bitLt modules the loaded base holds (0: not quantised)."""
    from fedtune.common.model import load_causal_lm

    model = load_causal_lm(config.model)
    return sum("Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__
               for m in model.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="4bit", choices=("none", "4bit", "8bit"))
    parser.add_argument("--dp", action="store_true", help="DP-SGD at epsilon 8")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-gpu-round"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               **run_rounds(args.work, args)}
    text = json.dumps(figures, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
