"""The mean-pooling classifier: reads the masked mean of token states, and works with LoRA."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.common.adapter import add_lora, trainable_state
from fedtune.common.config import ConfigError, LoraSettings, ModelConfig
from fedtune.common.mean_pooling import MeanPoolingClassifier
from fedtune.common.model import load_classifier


@pytest.fixture()
def mean_model(tiny_model_dir) -> MeanPoolingClassifier:
    torch.manual_seed(0)
    return load_classifier(str(tiny_model_dir), 3, "mean").eval()


def test_the_head_reads_the_masked_mean_of_the_token_states(tiny_model_dir, mean_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["short", "a much longer sentence than the first"], padding=True,
                      return_tensors="pt")
    encoder = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = mean_model(**batch).logits
        for i in range(2):
            alone = tokenizer([["short", "a much longer sentence than the first"][i]],
                              return_tensors="pt")
            mean = encoder(**alone).last_hidden_state.mean(dim=1)
            expected = mean_model.classifier(mean)
            # padding in the batch changes nothing: pads are left out of the mean
            torch.testing.assert_close(logits[i:i + 1], expected, rtol=1e-4, atol=1e-5)


def test_labels_give_the_cross_entropy_loss(tiny_model_dir, mean_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["one", "two words"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = mean_model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_lora_trains_the_attention_and_the_whole_head_only(mean_model):
    model = add_lora(mean_model, LoraSettings(r=4), "classification")
    names = set(trainable_state(model))
    head = {n for n in names if "classifier" in n}
    assert head and all("modules_to_save" in n for n in head)
    assert all("lora_" in n for n in names - head)
    assert any("query" in n for n in names) and any("value" in n for n in names)


def test_a_saved_adapter_reloads_onto_a_fresh_mean_pooling_classifier(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = add_lora(load_classifier(str(tiny_model_dir), 3, "mean"), LoraSettings(r=4),
                     "classification")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)  # a different fresh head: the saved one must replace it
    reloaded = PeftModel.from_pretrained(load_classifier(str(tiny_model_dir), 3, "mean"),
                                         tmp_path / "adapter")
    saved, loaded = trainable_state(model), dict(reloaded.named_parameters())
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name].detach(), torch.from_numpy(value))


def test_its_adapter_fails_loudly_on_a_standard_head_that_reads_the_first_token(
        tiny_model_dir, tmp_path):
    # Prepare: an adapter of the mean-pooling head, as a run saves it
    model = add_lora(load_classifier(str(tiny_model_dir), 3, "mean"), LoraSettings(r=4),
                     "classification")
    model.save_pretrained(tmp_path / "adapter")
    standard = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    # Execute, Assert: PEFT finds none of its modules there, instead of loading half of it
    with pytest.raises(ValueError, match="target"):
        PeftModel.from_pretrained(standard, tmp_path / "adapter")


def test_an_unknown_pooling_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        ModelConfig(pooling="max")
