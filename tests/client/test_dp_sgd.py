"""DP-SGD on a tiny PEFT model: per-example clipping, calibrated noise, exact steps, clean model."""

import copy

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from transformers import AutoTokenizer

from fedtune.client import dp_sgd
from fedtune.client.dp_plan import DPRoundPlan, plan_round
from fedtune.client.dp_sgd import GRAD_SAMPLE_MODE, train_private
from fedtune.common.adapter import add_lora, trainable_state
from fedtune.common.classifier import Classification, ClassifierCollator
from fedtune.common.config import LoraSettings, RunConfig
from fedtune.common.data import Examples
from fedtune.common.model import load_classifier
from fedtune.common.privacy import GaussianEvent, epsilon_spent, noise_for_target
from fedtune.common.training import make_loader

LOSS = Classification(num_labels=3).loss


@pytest.fixture(params=["pooler", "mean"])
def model(tiny_model_dir, request):
    torch.manual_seed(0)
    base = load_classifier(str(tiny_model_dir), 3, request.param)
    return add_lora(base, LoraSettings(r=4, lora_dropout=0.0), "classification")


@pytest.fixture()
def loader(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["alpha", "bravo", "charlie"]
    data = Examples(texts=[f"{words[i % 3]} thing number {i} " * (1 + i % 4) for i in range(40)],
                    labels=np.arange(40) % 3)
    return make_loader(data, ClassifierCollator(tokenizer, 32), batch_size=8, shuffle=True, seed=0)


def private(model, loader, noise: float, clip: float):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    model.train()
    return engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                               noise_multiplier=noise, max_grad_norm=clip,
                               poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE,
                               noise_generator=torch.Generator().manual_seed(1))


def without_dropout(model: torch.nn.Module) -> None:
    """Deterministic passes, so two ways of computing a gradient can be compared exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def per_sample_norms(params) -> torch.Tensor:
    flat = torch.cat([p.grad_sample.reshape(len(p.grad_sample), -1) for p in params], dim=1)
    return flat.norm(dim=1)


def test_every_per_sample_gradient_is_clipped_to_max_grad_norm(model, loader):
    trainable = [p for p in model.parameters() if p.requires_grad]
    dp_model, optimizer, dp_loader = private(model, loader, noise=0.0, clip=0.05)
    batch = next(b for b in dp_loader if len(b["labels"]) > 1)
    dp_model(**batch).loss.backward()
    # Opacus computed a per-example gradient for each trainable tensor, and only for those
    assert all(p.grad_sample is not None and len(p.grad_sample) == len(batch["labels"])
               for p in trainable)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters() if not p.requires_grad)
    norms = per_sample_norms(trainable)
    assert (norms > 0.05).any()  # the bound binds, so the test can fail
    optimizer.pre_step()  # clip, accumulate and (here zero) noise
    factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = norms * factors
    assert (clipped_norms <= 0.05 + 1e-6).all()
    for p in trainable:
        expected = torch.einsum("i,i...->...", factors, p.grad_sample)
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)
    dp_model._close()


def test_each_per_sample_gradient_is_that_example_s_gradient_alone(model, loader):
    # The privacy proof bounds each example's influence by its own clipped gradient; a model
    # that mixed examples in a batch (unmasked pooling over padding, batch statistics) breaks it.
    without_dropout(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dp_model, _, dp_loader = private(model, loader, noise=0.0, clip=1e6)
    batch = next(b for b in dp_loader if len(set(b["attention_mask"].sum(1).tolist())) > 1)
    dp_model(**batch).loss.backward()
    per_sample = [p.grad_sample.clone() for p in trainable]
    dp_model._close()
    for i in range(len(batch["labels"])):
        length = int(batch["attention_mask"][i].sum())
        alone = {key: value[i:i + 1, :length] if value.dim() == 2 else value[i:i + 1]
                 for key, value in batch.items()}
        model.zero_grad()
        model(**alone).loss.backward()
        for p, grads in zip(trainable, per_sample, strict=True):
            torch.testing.assert_close(grads[i], p.grad, rtol=1e-3, atol=1e-6)


def test_noise_has_the_calibrated_standard_deviation(model, loader):
    trainable = [p for p in model.parameters() if p.requires_grad]
    noise, clip = 1.3, 0.5
    dp_model, optimizer, dp_loader = private(model, loader, noise=noise, clip=clip)
    batch = next(b for b in dp_loader if len(b["labels"]) > 1)
    dp_model(**batch).loss.backward()
    optimizer.pre_step()
    # Opacus: grad = (sum of clipped + N(0, (noise * clip)^2)) / expected batch size
    drawn = torch.cat([(p.grad * optimizer.expected_batch_size - p.summed_grad).ravel()
                       for p in trainable])
    assert drawn.numel() > 1000
    assert float(drawn.mean()) == pytest.approx(0.0, abs=4 * noise * clip / drawn.numel() ** 0.5)
    assert float(drawn.std()) == pytest.approx(noise * clip, rel=0.08)  # ~4 standard errors
    dp_model._close()


def test_train_private_takes_exactly_its_steps_and_returns_a_clean_model(model, loader):
    before = trainable_state(model)
    plan = DPRoundPlan(GaussianEvent(1.0, 1 / len(loader), 7), delta=1e-3, max_grad_norm=1.0,
                      expected_batch=8.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    stats = train_private(model, loader, optimizer, plan, loss_fn=LOSS, device=torch.device("cpu"),
                          noise_generator=torch.Generator().manual_seed(0), physical_batch=64)
    assert stats.steps == 7 and stats.examples > 0
    after = trainable_state(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert not any(p._forward_hooks or p._backward_hooks for p in model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def _train_copy(model, loader, physical_batch: int,
                head_clip_share: float = 0.0) -> tuple[dict, list[int]]:
    """Trained state of a copy of `model` (dropout off), and the sizes its passes saw."""
    model = copy.deepcopy(model)
    without_dropout(model)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: sizes.append(len(kwargs["labels"])), with_kwargs=True)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=16,
                                         collate_fn=loader.collate_fn,
                                         generator=torch.Generator().manual_seed(3))
    plan = DPRoundPlan(GaussianEvent(0.8, 16 / 40, 4), delta=1e-3, max_grad_norm=0.5,
                      expected_batch=16.0, head_clip_share=head_clip_share)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    stats = train_private(model, loader, optimizer, plan, loss_fn=LOSS, device=torch.device("cpu"),
                          noise_generator=torch.Generator().manual_seed(5),
                          physical_batch=physical_batch)
    hook.remove()
    assert stats.steps == 4
    return trainable_state(model), sizes


def test_a_batch_split_into_chunks_is_still_one_noisy_step(model, loader):
    whole, whole_sizes = _train_copy(model, loader, physical_batch=1000)
    split, split_sizes = _train_copy(model, loader, physical_batch=3)
    assert len(whole_sizes) == 4 and max(whole_sizes) > 3  # the cap binds, so this can fail
    assert max(split_sizes) <= 3 and sum(split_sizes) == sum(whole_sizes)
    # Same Poisson draws and noise: the same clipped sum, one noise draw and one step per batch.
    for name, value in whole.items():
        np.testing.assert_allclose(split[name], value, rtol=1e-4, atol=1e-6)


def test_a_round_cut_short_leaves_nothing_on_the_cached_model(model, loader):
    calls = []

    def out_of_memory_on_the_second_chunk(m, batch):
        loss = LOSS(m, batch)  # the forward pass ran: Opacus holds its activations
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return loss

    plan = DPRoundPlan(GaussianEvent(0.8, 16 / 40, 4), delta=1e-3, max_grad_norm=0.5,
                      expected_batch=16.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_private(model, loader, optimizer, plan, loss_fn=out_of_memory_on_the_second_chunk,
                      device=torch.device("cpu"), noise_generator=torch.Generator().manual_seed(5),
                      physical_batch=1)
    assert not any("activations" in vars(m) or "max_batch_len" in vars(m)
                   for m in model.modules())
    assert not any(hasattr(p, "summed_grad") or p.grad is not None for p in model.parameters())
    # the next client on this model trains exactly as on a model that never failed
    clean = copy.deepcopy(model)
    for module in clean.modules():
        for name in ("activations", "max_batch_len"):
            module.__dict__.pop(name, None)
    after_failure, _ = _train_copy(model, loader, physical_batch=3)
    fresh, _ = _train_copy(clean, loader, physical_batch=3)
    for name, value in fresh.items():
        np.testing.assert_allclose(after_failure[name], value, rtol=1e-4, atol=1e-6)


def test_empty_poisson_batches_still_take_a_noise_step(model, loader, monkeypatch):
    noise_steps = []
    real_step = dp_sgd._noise_only_step
    monkeypatch.setattr(dp_sgd, "_noise_only_step",
                        lambda *args: noise_steps.append(1) or real_step(*args))
    before = trainable_state(model)
    # batch size 1 on 40 rows: each step draws each row with rate 1/40, so ~37% are empty
    single = torch.utils.data.DataLoader(loader.dataset, batch_size=1,
                                         collate_fn=loader.collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    plan = DPRoundPlan(GaussianEvent(1.0, 1 / 40, 12), delta=1e-3, max_grad_norm=1.0,
                      expected_batch=1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stats = train_private(model, single, optimizer, plan, loss_fn=LOSS, device=torch.device("cpu"),
                          noise_generator=torch.Generator().manual_seed(0), physical_batch=64)
    assert stats.steps == 12 and noise_steps  # some steps drew nobody and still stepped
    after = trainable_state(model)
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_plan_spreads_the_target_over_every_planned_round():
    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.epsilon": 3.0,
                                     "federation.rounds": 4, "train.batch_size": 10,
                                     "train.local_epochs": 1, "privacy.accountant": "rdp"})
    plan = plan_round(config, planning_rows=100)
    assert plan.event.sample_rate == 0.1 and plan.event.steps == 10 and plan.expected_batch == 10
    assert plan.delta == pytest.approx(1e-3)
    whole_run = epsilon_spent([plan.event] * 4, plan.delta, "rdp")
    assert 2.95 <= whole_run <= 3.0
    # noise for four rounds, not for one: one round alone would have needed far less
    assert plan.event.noise_multiplier > 1.2 * noise_for_target(3.0, plan.delta, 0.1, 10, "rdp")


def _clipped_and_noise(model, loader, *, share: float, noise: float, clip: float):
    """One batch through NeutralisingOptimizer with the head clipped apart at `share`: the
    per-example gradients, which of them are the head's, and the noisy sum's parts."""
    head = dp_sgd.head_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()  # Opacus keeps activations in training mode only
    wrapped = dp_sgd.wrap_model(model, grad_sample_mode=GRAD_SAMPLE_MODE, batch_first=True,
                                loss_reduction="mean")
    optimizer = dp_sgd.NeutralisingOptimizer(
        torch.optim.SGD(trainable, lr=0.1), noise_multiplier=noise, max_grad_norm=clip,
        expected_batch_size=8, loss_reduction="mean", generator=torch.Generator().manual_seed(2),
        head_params=head, head_clip_share=share)
    batch = next(iter(loader))
    LOSS(wrapped, batch).backward()
    samples = [p.grad_sample.detach().clone() for p in trainable]
    optimizer.pre_step()
    in_head = [any(p is h for h in head) for p in trainable]
    noisy_sums = [p.grad * optimizer.expected_batch_size for p in trainable]
    summed = [p.summed_grad for p in trainable]
    wrapped._close()
    return samples, in_head, summed, noisy_sums


def _part(tensors: list, in_head: list[bool], head: bool) -> list:
    return [t for t, h in zip(tensors, in_head, strict=True) if h == head]


@pytest.mark.parametrize("share", [0.25, 0.8])
def test_the_head_and_the_lora_matrices_are_clipped_each_to_its_share(model, loader, share):
    clip = 0.005  # the fresh LoRA B's gradients are small: both bounds bind
    samples, in_head, summed, _ = _clipped_and_noise(model, loader, share=share, noise=0.0,
                                                    clip=clip)
    assert any(in_head) and not all(in_head)
    squares = torch.zeros(len(samples[0]))
    for head, bound in ((True, clip * share ** 0.5), (False, clip * (1 - share) ** 0.5)):
        mine = _part(samples, in_head, head)
        norms = torch.cat([s.reshape(len(s), -1) for s in mine], dim=1).norm(dim=1)
        assert (norms > bound).any()  # each bound binds, so this can fail
        factors = (bound / (norms + 1e-6)).clamp(max=1.0)
        for sample, got in zip(mine, _part(summed, in_head, head), strict=True):
            torch.testing.assert_close(got, torch.einsum("i,i...->...", factors, sample),
                                       rtol=1e-4, atol=1e-7)
        squares += (norms * factors) ** 2
    # the two bounds the code applied add up to the one norm the noise is drawn for
    assert (squares.sqrt() <= clip + 1e-6).all()


def test_clipping_the_head_apart_leaves_the_noise_at_the_whole_norm(model, loader):
    noise, clip = 1.3, 0.5
    _, in_head, summed, noisy = _clipped_and_noise(model, loader, share=0.5, noise=noise,
                                                   clip=clip)
    for head in (True, False):  # each part's noise, not z C sqrt(s) or z C sqrt(1 - s)
        drawn = torch.cat([(n - s).ravel() for n, s in zip(_part(noisy, in_head, head),
                                                           _part(summed, in_head, head),
                                                           strict=True)])
        assert drawn.numel() > 90  # the head's 99 values: seeded noise, so no flake
        assert float(drawn.std()) == pytest.approx(noise * clip, rel=0.15)


def test_train_private_clips_the_head_apart_in_chunks_as_in_one_pass(model, loader):
    flat, _ = _train_copy(model, loader, physical_batch=1000)
    whole, _ = _train_copy(model, loader, physical_batch=1000, head_clip_share=0.5)
    split, _ = _train_copy(model, loader, physical_batch=3, head_clip_share=0.5)
    # the share reaches the optimizer (same draws and noise, another clipping) ...
    assert any(not np.allclose(whole[name], value) for name, value in flat.items())
    for name, value in whole.items():  # ... and a batch in chunks is still one noisy step
        np.testing.assert_allclose(split[name], value, rtol=1e-4, atol=1e-6)


def test_the_head_share_reaches_the_plan_and_is_checked():
    config = RunConfig.from_mapping({"privacy.dp": True, "train.head_clip_share": 0.6})
    assert plan_round(config, planning_rows=1000).head_clip_share == 0.6
    for bad in ({"privacy.dp": True, "train.head_clip_share": 1.0},
                {"privacy.dp": True, "train.head_clip_share": -0.1},
                {"train.head_clip_share": 0.5},  # without DP-SGD it would do nothing
                {"privacy.dp": True, "privacy.level": "client", "train.head_clip_share": 0.5}):
        with pytest.raises(ValueError, match=r"train\.head_clip_share"):
            RunConfig.from_mapping(bad)
