import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from common.adapter import (
    AdapterError,
    add_lora,
    from_record,
    load_trainable_state,
    to_record,
    trainable_state,
)
from common.config import LoraSettings


@pytest.fixture()
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    return add_lora(base, LoraSettings(r=4), "classification")


def test_only_lora_and_head_tensors_are_exchanged(lora_model):
    state = trainable_state(lora_model)
    assert state and all("lora_" in name or "classifier" in name for name in state)
    frozen = [n for n, p in lora_model.named_parameters() if not p.requires_grad]
    assert not set(frozen) & set(state)
    assert any("word_embeddings" in n for n in frozen)
    exchanged = sum(v.size for v in state.values())
    total = sum(p.numel() for p in lora_model.parameters())
    assert exchanged < 0.1 * total


def test_state_survives_the_record_round_trip(lora_model):
    state = trainable_state(lora_model)
    back = from_record(to_record(state))
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_loading_a_state_changes_the_model(lora_model):
    state = {k: np.full_like(v, 0.5) for k, v in trainable_state(lora_model).items()}
    load_trainable_state(lora_model, state)
    assert all(np.all(v == 0.5) for v in trainable_state(lora_model).values())


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda s, k: s.update({k: np.zeros((3, 3), np.float32)}), "has shape (3, 3), expected"),
    (lambda s, k: s.update({k: np.full_like(s[k], np.nan)}), "NaN or infinite"),
    (lambda s, k: s.pop(k), "missing"),
    (lambda s, k: s.update({"extra.weight": np.zeros(1, np.float32)}), "unexpected"),
])
def test_a_state_that_does_not_fit_is_refused_and_nothing_is_written(lora_model, corrupt, message):
    before = trainable_state(lora_model)
    state = dict(before)
    corrupt(state, sorted(state)[0])
    with pytest.raises(AdapterError, match=None) as caught:
        load_trainable_state(lora_model, state)
    assert message in str(caught.value)
    after = trainable_state(lora_model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_saved_adapter_loads_with_peft(lora_model, tiny_model_dir, tmp_path):
    lora_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    original = trainable_state(lora_model)
    reloaded = {n: p.detach().numpy() for n, p in loaded.named_parameters() if n in original}
    assert set(reloaded) == set(original)
    assert all(np.allclose(reloaded[k], original[k]) for k in original)


def test_ffa_lora_trains_and_sends_b_only_and_every_process_draws_the_same_a(tiny_model_dir):
    # Prepare, Execute: two "processes" building the model from the same seed
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
        models.append(add_lora(base, LoraSettings(r=4, freeze_a=True), "classification"))
    # Assert
    state = trainable_state(models[0])
    assert any("lora_B" in n for n in state) and not any("lora_A" in n for n in state)
    a_values = [{n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}
                for m in models]
    assert a_values[0] and all(torch.equal(a_values[0][n], a_values[1][n]) for n in a_values[0])
