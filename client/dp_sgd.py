"""Sample-level DP-SGD on a client with Opacus: Poisson batches, per-example clipping, noise.

Opacus computes per-example gradients only for the parameters that require them, so on a PEFT
model the cost is that of the LoRA matrices and the head, not of the frozen transformer.

Everything the mechanism's parameters depend on is public: the sample rate and the steps follow
the planning row count (the node's policy or the server's), not the rows the node holds; the
noisy sum is divided by the planned expected batch, not by one computed from the data; and an
example whose gradient is not finite (a crafted adapter can make a chosen row's logits
overflow) contributes zero instead of failing the round, so what the server sees depends on any
one row only through a clipped, noised gradient.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import DataLoader

from fedtune.client.dp_plan import DPRoundPlan
from fedtune.common.data import Examples
from fedtune.common.training import Collate, LossFn, TrainStats, head_parameters

# Opacus' per-sample gradient engine; chosen by benchmarks/dp_overhead.py (see docs/benchmarks.md).
GRAD_SAMPLE_MODE = "hooks"


class NeutralisingOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, but an example whose per-example gradient holds a NaN or an infinity
    contributes zero (as an example whose gradient is zero would) before clipping; and, given
    `head_params`, the head and the rest are clipped each to its own part of the norm."""

    def __init__(self, *args, head_params: list[torch.nn.Parameter] | None = None,
                 head_clip_share: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        head = {id(param) for param in head_params or ()}
        self.in_head = [id(param) in head for param in self.params]
        self.head_clip_share = head_clip_share

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        if samples and len(samples[0]) > 0:
            bad = torch.zeros(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for sample in samples:
                bad |= ~torch.isfinite(sample.reshape(len(sample), -1)).all(dim=1).to(bad.device)
            if bool(bad.any()):
                for param in self.params:
                    flat = self._get_flat_grad_sample(param)
                    keep = (~bad).to(flat.device).view(-1, *([1] * (flat.dim() - 1)))
                    param.grad_sample = torch.where(keep, flat, torch.zeros_like(flat))
        in_head = self.in_head
        if not (self.head_clip_share and any(in_head) and not all(in_head)) \
                or not len(samples[0]):
            super().clip_and_accumulate()
        else:
            self._clip_in_two_parts(in_head)

    def _clip_in_two_parts(self, in_head: list[bool]) -> None:
        """Clip each example's head gradient to C sqrt(s) and the rest to C sqrt(1 - s): the
        whole still has norm <= C, so Opacus' noise (std z C) keeps its meaning. Under one norm
        the fresh head holds 99% of the square and the LoRA matrices' signal drowns in noise."""
        samples = self.grad_samples
        device = samples[0].device
        norms = [sample.reshape(len(sample), -1).norm(2, dim=-1).to(device) for sample in samples]
        bound = {True: self.max_grad_norm * math.sqrt(self.head_clip_share),
                 False: self.max_grad_norm * math.sqrt(1 - self.head_clip_share)}
        factor = {}
        for part in (True, False):
            total = torch.stack([n for n, h in zip(norms, in_head, strict=True) if h == part],
                                dim=1).norm(2, dim=1)
            factor[part] = (bound[part] / (total + 1e-6)).clamp(max=1.0)
        for param, sample, part in zip(self.params, samples, in_head, strict=True):
            _check_processed_flag(param.grad_sample)  # a gradient clipped twice is refused
            sample = sample.to(param.dtype)
            clipped = torch.einsum("i,i...", factor[part].to(sample.device, param.dtype), sample)
            if param.summed_grad is None:
                param.summed_grad = clipped
            else:
                param.summed_grad += clipped  # in place, as Opacus accumulates
            _mark_as_processed(param.grad_sample)


def train_private(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                  plan: DPRoundPlan, *, loss_fn: LossFn, device: torch.device,
                  noise_generator: torch.Generator, physical_batch: int) -> TrainStats:
    """Exactly `plan.event.steps` DP-SGD steps on the rows of `loader` (`Task.start_round`'s);
    the model is returned unwrapped.

    Each step draws every row independently with the plan's sample rate (Poisson sampling,
    from the loader's generator) and adds noise from `noise_generator`: independent streams
    (`client/randomness.py`). A batch larger than `physical_batch` goes through the model in
    chunks (memory), still as one noisy step."""
    model.train()  # the cached model was just evaluated
    rows, collate, sampling = loader.dataset.examples, loader.collate_fn, loader.generator
    noise_generator = on_device(noise_generator, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        private = wrap_model(model, grad_sample_mode=GRAD_SAMPLE_MODE, batch_first=True,
                             loss_reduction="mean")
        dp_optimizer = NeutralisingOptimizer(
            optimizer, noise_multiplier=plan.event.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch,
            loss_reduction="mean", generator=noise_generator,
            head_params=head_parameters(model), head_clip_share=plan.head_clip_share)
        try:
            return _steps(private, dp_optimizer, rows, collate, plan, loss_fn, device, sampling,
                          physical_batch)
        finally:
            private._close()  # drop Opacus' hooks: the cached model serves other clients
            _scrub(model)


def _steps(model: torch.nn.Module, optimizer: DPOptimizer, rows: Examples, collate: Collate,
           plan: DPRoundPlan, loss_fn: LossFn, device: torch.device,
           sampling: torch.Generator, physical_batch: int) -> TrainStats:
    model.train()
    total_loss, examples = 0.0, 0
    for _ in range(plan.event.steps):
        optimizer.zero_grad(set_to_none=True)
        drawn = poisson_draw(len(rows), plan.event.sample_rate, sampling)
        if not drawn:  # an empty Poisson draw still releases noise
            _noise_only_step(model, optimizer)
            continue
        for start in range(0, len(drawn), physical_batch):
            part = drawn[start:start + physical_batch]
            chunk = {key: value.to(device)
                     for key, value in collate([rows.item(i) for i in part]).items()}
            loss = loss_fn(model, chunk)
            loss.backward()
            # Each chunk's per-example gradients are clipped and summed; the batch's noise and
            # its one optimizer step come after its last chunk (Opacus' skip signal).
            last = start + physical_batch >= len(drawn)
            optimizer.signal_skip_step(do_skip=not last)
            optimizer.step()
            if not last:
                optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum of a skipped step
            total_loss += float(loss.detach()) * len(part)
        examples += len(drawn)
    return TrainStats(loss=total_loss / max(examples, 1), examples=examples,
                      steps=plan.event.steps)


def poisson_draw(rows: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """The rows one step uses: each independently with probability `sample_rate`."""
    return torch.nonzero(torch.rand(rows, generator=generator) < sample_rate).flatten().tolist()


def _noise_only_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
    optimizer.step()


def _scrub(model: torch.nn.Module) -> None:
    """Remove what Opacus' cleanup leaves: a pass cut short (out of memory mid-batch) keeps its
    activations on the modules, which would mis-scale the next client's per-example gradients,
    and every parameter keeps the last batch's un-noised clipped sum."""
    for module in model.modules():  # each module's own attributes (PEFT wrappers forward reads)
        vars(module).pop("activations", None)
        vars(module).pop("max_batch_len", None)
    for param in model.parameters():
        vars(param).pop("summed_grad", None)
        vars(param).pop("grad_sample", None)
        param.grad = None


def on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """Opacus draws the noise where the parameters live, and torch needs a generator there: a
    CUDA model gets one seeded from the CPU stream (which stays the only source of its seed)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
