"""Sample-level DP-SGD on a client with Opacus: Poisson batches, per-example clipping, noise.

Opacus computes per-example gradients only for the parameters that require them, so on a PEFT
model the cost is that of the LoRA matrices and the head, not of the frozen transformer.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.privacy import (
    GaussianEvent,
    default_delta,
    dp_sgd_schedule,
    noise_for_target,
)
from common.training import LossFn, TrainStats

# Opacus' per-sample gradient engine; chosen by benchmarks/dp_overhead.py (see docs/benchmarks.md).
GRAD_SAMPLE_MODE = "hooks"


@dataclass(frozen=True)
class DPRoundPlan:
    """What one round of DP-SGD on this client will spend, fixed before it trains."""

    event: GaussianEvent
    delta: float
    max_grad_norm: float


def plan_round(config: RunConfig, records: int, node_delta: float | None = None,
               accountant: str = "") -> DPRoundPlan:
    """Noise for the whole planned horizon (every round x this round's steps), not per round.

    The delta is the server's when it sets one, else the node's own (`node_delta`, by default
    1/(10 n)); a node's policy refuses a server delta above its own before this plan is used.
    The noise is calibrated with `accountant`, the one the node's ledger is kept with, so the
    ledger reaches the target only at the end of the planned rounds."""
    privacy = config.privacy
    accountant = accountant or privacy.accountant_or_default
    train = config.training
    sample_rate, steps = dp_sgd_schedule(records, train.batch_size, train.local_epochs,
                                         train.local_steps)
    delta = privacy.delta or node_delta or default_delta(records)
    noise = privacy.noise_multiplier or noise_for_target(
        privacy.epsilon, delta, sample_rate, steps * config.federation.rounds, accountant)
    return DPRoundPlan(GaussianEvent(noise, sample_rate, steps), delta,
                       train.max_grad_norm)


def train_private(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                  plan: DPRoundPlan, *, loss_fn: LossFn, device: torch.device,
                  noise_generator: torch.Generator, physical_batch: int) -> TrainStats:
    """Exactly `plan.event.steps` DP-SGD steps; the model is returned unwrapped.

    Poisson sampling uses the loader's generator and the noise `noise_generator`: they must be
    independent streams (`client/randomness.py`). A Poisson batch larger than `physical_batch`
    goes through the model in chunks (memory), still as one noisy step."""
    model.train()  # Opacus refuses a model in eval mode (the cached model was just evaluated)
    noise_generator = on_device(noise_generator, device)
    engine = PrivacyEngine(accountant="rdp")  # the ledger, not this accountant, is the record
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.event.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE,
            noise_generator=noise_generator)
        try:
            return _steps(private_model, private_optimizer, private_loader, plan.event.steps,
                          loss_fn, device, physical_batch)
        finally:
            private_model._close()  # drop Opacus' hooks: the cached model serves other clients
            _scrub(model)


def _scrub(model: torch.nn.Module) -> None:
    """Remove what Opacus' cleanup leaves: a pass cut short (out of memory mid-batch) keeps its
    activations on the modules, which would mis-scale the next client's per-example gradients,
    and every parameter keeps the last batch's un-noised clipped sum."""
    for module in model.modules():  # each module's own attributes (PEFT wrappers forward reads)
        vars(module).pop("activations", None)
        vars(module).pop("max_batch_len", None)
    for param in model.parameters():
        vars(param).pop("summed_grad", None)
        param.grad = None


def on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """Opacus draws the noise where the parameters live, and torch needs a generator there: a
    CUDA model gets one seeded from the CPU stream (which stays the only source of its seed)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _steps(model: torch.nn.Module, optimizer: DPOptimizer, loader: DataLoader, steps: int,
           loss_fn: LossFn, device: torch.device, physical_batch: int) -> TrainStats:
    model.train()
    total_loss, examples = 0.0, 0
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for batch in itertools.islice(batches, steps):
        optimizer.zero_grad(set_to_none=True)
        size = len(batch["labels"])
        if size == 0:  # an empty Poisson draw still releases noise
            _noise_only_step(model, optimizer)
            continue
        for start in range(0, size, physical_batch):
            chunk = {key: value[start:start + physical_batch].to(device)
                     for key, value in batch.items()}
            loss = loss_fn(model, chunk)
            loss.backward()
            # Each chunk's per-example gradients are clipped and summed; the batch's noise and
            # its one optimizer step come after its last chunk (Opacus' skip signal).
            last = start + physical_batch >= size
            optimizer.signal_skip_step(do_skip=not last)
            optimizer.step()
            if not last:
                optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum of a skipped step
            total_loss += float(loss.detach()) * len(chunk["labels"])
        examples += size
    return TrainStats(loss=total_loss / max(examples, 1), examples=examples, steps=steps)


def _noise_only_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
    optimizer.step()
