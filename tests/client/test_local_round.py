"""Once admitted, a round answers in the same way whatever the rows: a crafted adapter that makes
one row's logits overflow, an over-long row or a failure mid-training changes the values of the
DP-SGD release, never its kind; and a request asked again is answered again at no new cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client import app as client_app
from fedtune.client import dp_sgd
from fedtune.common import record_keys as keys
from fedtune.common.task import cached_task
from tests.client.conftest import (
    data_dir,
    ledger_rounds,
    node_context,
    request,
    run_config,
    toy_rows,
)

TRIGGER = "the patient was diagnosed with metastatic carcinoma of the pancreas"
PLAIN_DP = {"budget-epsilon": 100.0, "require-secagg": False,
            "max-epsilon-per-round": 50.0, "max-epsilon-per-run": 50.0}


def head_inputs(task, texts: list[str]) -> np.ndarray:
    """What the classification head reads for each text (the mean of the token states)."""
    seen = {}
    head = next(m for n, m in task.model.named_modules() if n.endswith("modules_to_save.default"))
    hook = head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    collate = task.objective.collator(task.tokenizer, task.config.model.max_length)
    with torch.no_grad():
        task.model.eval()
        task.model(**collate([(t, 0) for t in texts]))
    hook.remove()
    return seen["x"].double().numpy()


def crafted_adapter(config, texts: list[str], trigger: str) -> dict[str, np.ndarray]:
    """A finite head whose first logit overflows exactly for rows past a threshold the server
    chose: here, the trigger row (the attack of issue 27, item 1)."""
    task = cached_task(config)
    inputs = head_inputs(task, [*texts, trigger])
    apart = inputs[-1] - inputs[:-1].mean(axis=0)
    common_part = inputs[:-1].mean(axis=0)
    for tilt in np.linspace(0.0, 2.0, 21):  # lean towards the rows' mean until all project > 0
        direction = apart / np.linalg.norm(apart) + tilt * common_part / np.linalg.norm(
            common_part)
        direction /= np.linalg.norm(direction)
        projections = inputs @ direction
        if projections[:-1].min() > 0:
            break
    highest = projections[:-1].max()
    assert projections[-1] > highest  # the trigger stands apart: a threshold exists
    # logit = scale (projection - highest) + 0.6 F: the trigger's is 1.1 F (inf), every
    # other row's at most 0.6 F (finite), F being float32's largest value
    top = float(np.finfo(np.float32).max)
    scale = 0.5 * top / (projections[-1] - highest)
    offset = 0.6 * top - scale * highest
    assert abs(offset) < top  # a finite bias can place the threshold there
    adapter = dict(task.initial_adapter)
    weight = next(n for n in adapter if "modules_to_save" in n and n.endswith("weight"))
    bias = next(n for n in adapter if "modules_to_save" in n and n.endswith("bias"))
    adapter[weight] = adapter[weight].copy()
    adapter[bias] = adapter[bias].copy()
    adapter[weight][0] = (scale * direction).astype(np.float32)
    adapter[bias][0] = np.float32(offset)
    return adapter


def per_example_losses(config, adapter, rows: list[tuple[str, int]]) -> np.ndarray:
    task = cached_task(config)
    task.model.load_state_dict({k: torch.from_numpy(v) for k, v in adapter.items()},
                               strict=False)
    collate = task.objective.collator(task.tokenizer, config.model.max_length)
    with torch.no_grad():
        task.model.eval()
        logits = task.model(**collate(rows)).logits
    labels = torch.tensor([label for _, label in rows])
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()


def reply_kind(reply) -> tuple:
    """What the server can read besides the released values: the records and metric names,
    and whether every value is a finite number."""
    arrays = reply.content.array_records.get(keys.ARRAYS)
    finite = arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())
    return (tuple(sorted(reply.content.array_records)), tuple(sorted(reply.content.metric_records)),
            tuple(sorted(reply.content[keys.METRICS])) if keys.METRICS in reply.content else (),
            finite)


def test_a_row_whose_logits_a_crafted_adapter_overflows_changes_no_reply_kind(
        tiny_model_dir, tmp_path):
    rows = toy_rows(30)
    plain = data_dir(tmp_path / "plain", rows)
    triggered = data_dir(tmp_path / "triggered", [*rows, {"text": TRIGGER, "label": 1}])
    config = run_config(tiny_model_dir, plain, **{"train.local_steps": 2,
                                                  "privacy.noise_multiplier": 1.0,
                                                  "train.batch_size": 1_000_000})
    adapter = crafted_adapter(config, [r["text"] for r in rows], TRIGGER)
    losses = per_example_losses(config, adapter, [(TRIGGER, 1), *((r["text"], r["label"])
                                                                 for r in rows[:5])])
    # the probe works: the trigger row's loss is not finite, the others' are
    assert not np.isfinite(losses[0]) and np.isfinite(losses[1:]).all()
    # the default limit refuses such an adapter outright; raised, the node must still hold
    kinds = {}
    for name, data in (("plain", plain), ("triggered", triggered)):
        context = node_context(tiny_model_dir, data, tmp_path / f"ledger-{name}", **PLAIN_DP,
                               **{"max-adapter-value": 3.4e38})
        kinds[name] = reply_kind(client_app.train(request(config, adapter=adapter), context))
    assert kinds["plain"] == kinds["triggered"]
    assert kinds["plain"][-1]  # a finite update, both times


def test_a_row_longer_than_the_model_is_cut_to_the_asked_length(tiny_model_dir, tmp_path):
    long_row = {"text": " ".join(f"word{i}" for i in range(700)), "label": 0}
    short = data_dir(tmp_path / "short", toy_rows(30))
    long = data_dir(tmp_path / "long", [*toy_rows(30), long_row])
    config = run_config(tiny_model_dir, short, **{"model.max_length": 128,
                                                  "train.local_steps": 1,
                                                  "train.batch_size": 1_000_000})
    kinds = [reply_kind(client_app.train(request(config),
                                         node_context(tiny_model_dir, data, tmp_path / name,
                                                      **PLAIN_DP)))
             for name, data in (("a", short), ("b", long))]
    assert kinds[0] == kinds[1] and kinds[0][-1]


def test_a_failure_after_the_ledger_entry_releases_the_noise_only_update(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    real, calls = dp_sgd.train_private, []

    def fails_with_rows(model, loader, *args, **kwargs):
        calls.append(len(loader.dataset))
        if len(loader.dataset) > 0:
            raise RuntimeError("CUDA out of memory")  # as a row too long for the device would
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr("fedtune.client.local_round.train_private", fails_with_rows)
    config = run_config(tiny_model_dir, toy_data_dir, **{"train.local_steps": 2})
    ledger = tmp_path / "ledger"
    reply = client_app.train(request(config),
                             node_context(tiny_model_dir, toy_data_dir, ledger, **PLAIN_DP))
    assert calls[0] > 0 and calls[1] == 0  # tried with the rows, then with none
    kind = reply_kind(reply)
    assert kind[0] == (keys.ARRAYS,) and kind[-1]
    assert len(ledger_rounds(ledger)) == 1  # spent once, before training


def test_a_dp_reply_carries_no_count_and_a_repeated_request_costs_nothing_more(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir, **{"train.local_steps": 2})
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **PLAIN_DP)
    first = client_app.train(request(config), context)
    assert set(first.content[keys.METRICS]) == {keys.UNIT_WEIGHT, keys.EPSILON}
    again = client_app.train(request(config), context)  # a server that restarted mid-round
    assert len(ledger_rounds(ledger)) == 1
    for name, array in first.content[keys.ARRAYS].items():
        np.testing.assert_array_equal(again.content[keys.ARRAYS][name].numpy(), array.numpy())
    assert again.content[keys.METRICS][keys.EPSILON] == first.content[keys.METRICS][keys.EPSILON]
    moved = {k: v + 0.01 for k, v in cached_task(config).initial_adapter.items()}
    client_app.train(request(config, adapter=moved), context)  # another question: it costs
    assert len(ledger_rounds(ledger)) == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_neutralised_examples_contribute_zero_before_clipping(tiny_model_dir, bad):
    """The optimizer-level rule the node relies on: a non-finite per-example gradient is
    replaced by zeros, the others are clipped and summed as before."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = dp_sgd.NeutralisingOptimizer(torch.optim.SGD([weight], lr=1.0),
                                             noise_multiplier=0.0, max_grad_norm=1.0,
                                             expected_batch_size=3)
    weight.grad_sample = torch.tensor([[3.0, 4.0, 0.0], [bad, 0.0, 0.0], [0.0, 0.3, 0.4]])
    optimizer.pre_step()
    np.testing.assert_allclose(weight.grad.numpy(), np.array([0.6, 0.8 + 0.3, 0.4]) / 3,
                               rtol=1e-5)

