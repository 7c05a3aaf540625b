"""What a legitimate node sends in this run, and the Fleet proxy's limits that follow from it.

Flower's Fleet API reads a whole request body before it checks the node's signature, so an
outsider (no registered key) can make the SuperLink hold whatever body nginx lets through. The
limits are therefore derived from the run's largest legitimate request: a node's reply travels as
Flower objects pushed one request each, the largest being one adapter array (under secure
aggregation, the whole adapter as one masked vector) or one chunk of it (Flower cuts arrays into
chunks of at most 5 MiB). The adapter's shape comes from the model's configuration alone, built
on PyTorch's meta device: no weights are read or allocated. docs/deployment.md ("Limits for
outsiders") explains each value; `benchmarks/outsider_load.py` measures them under load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.common.config import CAUSAL_LM, RunConfig

VALUE_BYTES = 8  # twice the widest value a reply carries today (float32, the uint32 ring)
FRAMING = 64 * 1024  # protobuf and Flower object headers, the .npy header, room to spare
MEMBER_BYTES = 1024  # a secure-aggregation record per cohort member (keys, sealed shares)
OBJECTS_PER_MESSAGE = 4  # message, record dict, array record, config record, beside the arrays
NODES_PER_ADDRESS = 4  # nodes that may share one public address (a site behind one NAT)
REQUESTS_PER_NODE = 4  # a SuperNode's requests at once: its loop, heartbeat, two object workers
RATE_PER_NODE = 5  # requests per second a node keeps up at most (measured: 2.5 over 30 s)
MIN_UPSTREAM = 32


@dataclass(frozen=True)
class FleetLimits:
    """The values in nginx.conf that bound what one address, and all of them, can cost."""

    largest_object: int  # bytes of the largest object a node pushes in this run
    message_objects: int  # objects (one request each) of the largest message
    rate: int = NODES_PER_ADDRESS * RATE_PER_NODE  # limit_req rate per address (r/s)
    connections: int = NODES_PER_ADDRESS * REQUESTS_PER_NODE  # limit_conn per address
    upstream: int = MIN_UPSTREAM  # max_conns to the SuperLink: every node's requests at once
    header_timeout: int = 10  # s; a node sends its headers in one write
    body_timeout: int = 10  # s between two reads of a body (nginx has no total body timeout)
    keepalive_timeout: int = 15  # s; an idle node polls every 3 s

    @property
    def body_bytes(self) -> int:
        """client_max_body_size: the largest object and its framing, in whole KiB."""
        return _round_up(self.largest_object + FRAMING, 1024)

    @property
    def burst(self) -> int:
        """limit_req burst per address: each node pulls one message's objects and pushes its
        reply's at once."""
        return NODES_PER_ADDRESS * 2 * self.message_objects


def fleet_limits(config: RunConfig) -> FleetLimits:
    """The proxy's limits for this run, from its adapter's arrays and its number of nodes."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as CHUNK

    sizes = adapter_sizes(config)
    largest = min(VALUE_BYTES * max(sizes), CHUNK)  # a plain reply goes array by array
    if config.secagg.enabled:  # the adapter as one masked vector, and records per member
        largest = max(min(VALUE_BYTES * sum(sizes), CHUNK),
                      MEMBER_BYTES * config.federation.num_clients)
    chunks = sum(math.ceil(VALUE_BYTES * n / CHUNK) for n in sizes)
    return FleetLimits(
        largest_object=largest,
        message_objects=len(sizes) + chunks + OBJECTS_PER_MESSAGE,
        upstream=max(MIN_UPSTREAM, REQUESTS_PER_NODE * config.federation.num_clients))


def adapter_sizes(config: RunConfig) -> list[int]:
    """Values in each array a node sends (LoRA and head): the trainable parameters of the run's
    model, built on the meta device from its configuration."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from fedtune.common.adapter import add_lora
    from fedtune.common.data import load_data
    from fedtune.common.mean_pooling import MeanPoolingClassifier
    from fedtune.common.model import ModelLoadError, resolve_model_path

    try:
        shape = AutoConfig.from_pretrained(resolve_model_path(config.model.name))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model {config.model.name!r}: no readable configuration "
                             f"({str(error).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        if config.model.task == CAUSAL_LM:
            base = AutoModelForCausalLM.from_config(shape)
        else:
            labels = load_data(config.data, config.seed, config.model.task,
                               held_out_only=True).num_labels
            if config.model.pooling == "mean":
                base = MeanPoolingClassifier(AutoModel.from_config(shape), labels)
            else:
                shape.num_labels = labels
                base = AutoModelForSequenceClassification.from_config(shape)
        model = add_lora(base, config.adapter, config.model.task)
    return [p.numel() for p in model.parameters() if p.requires_grad]


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
