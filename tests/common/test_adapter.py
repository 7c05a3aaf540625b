import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedtune.common.adapter import (
    EMBEDDED_HUB_ID,
    AdapterError,
    add_lora,
    load_saved_adapter,
    load_trainable_state,
    public_name,
    trainable_state,
)
from fedtune.common.adapter_state import from_record, to_record
from fedtune.common.config import LoraSettings
from fedtune.common.model import resolve_model_path


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


def test_the_saved_adapter_names_its_base_model(lora_model, tiny_model_dir, tmp_path):
    lora_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)
    # the embedded model is named by its hub id, not by its path inside site-packages
    assert public_name(resolve_model_path("embedded")) == EMBEDDED_HUB_ID
    assert public_name("gpt2") == "gpt2"


def test_a_saved_adapter_loads_back_checked_like_any_state(lora_model, tiny_model_dir,
                                                            tmp_path):
    # Prepare
    load_trainable_state(lora_model, {k: np.full_like(v, 0.25)
                                      for k, v in trainable_state(lora_model).items()})
    lora_model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)
    fresh = add_lora(AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3), LoraSettings(r=4), "classification")
    wider = add_lora(AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3), LoraSettings(r=8), "classification")
    # Execute, Assert
    load_saved_adapter(fresh, tmp_path / "adapter")
    assert all(np.all(v == 0.25) for v in trainable_state(fresh).values())
    with pytest.raises(AdapterError, match="has shape"):
        load_saved_adapter(wider, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="unreadable"):
        load_saved_adapter(fresh, tmp_path / "absent")


def test_default_targets_are_peft_s_own_plus_the_encoders_it_lacks():
    from fedtune.common.adapter import AdapterError, target_modules
    from fedtune.common.config import LoraSettings

    settings = LoraSettings()
    assert target_modules(settings, "bert") == ["query", "value"]  # PEFT's entry
    assert target_modules(settings, "llama") == ["q_proj", "v_proj"]
    assert target_modules(settings, "distilbert") == ["q_lin", "v_lin"]  # fedtune's own
    assert target_modules(LoraSettings(target_modules=["key"]), "bert") == ["key"]
    with pytest.raises(AdapterError, match=r"set lora\.target_modules"):
        target_modules(settings, "no-such-model")
