"""`fedtune predict`: every row's answer by label name (or generated text), batched, bad input
refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.common.causal_lm import LMCollator, generate
from fedtune.common.config import CAUSAL_LM, DEFAULT_PROMPT
from fedtune.common.data import DataError
from fedtune.simulations.export import ReadingSettings, TrainedModel, export_run
from fedtune.simulations.predict import PredictError, inputs_of, predict_file, predictions
from tests.conftest import write_jsonl
from tests.simulations.test_cli import fedtune
from tests.simulations.test_export import make_run


@pytest.fixture()
def run_and_export(tiny_model_dir, toy_data_dir, tmp_path):
    make_run(tmp_path / "run", tiny_model_dir, toy_data_dir)
    return tmp_path / "run", export_run(tmp_path / "run", tmp_path / "model")


def test_rows_get_label_names_and_probabilities_alike_from_the_run_and_its_export(
        run_and_export, toy_data_dir, tmp_path):
    # Prepare: the test split as JSONL, and the same texts as CSV under another column name
    run, model = run_and_export
    rows = [json.loads(line) for line in (toy_data_dir / "test.jsonl").read_text().splitlines()]
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,sentence\n" + "".join(f'{i},"{r["text"]}"\n'
                                                  for i, r in enumerate(rows)))
    # Execute
    from_run = list(predict_file(run, toy_data_dir / "test.jsonl", batch_size=4))
    from_model = list(predict_file(model, toy_data_dir / "test.jsonl", batch_size=7))
    from_csv = list(predict_file(model, csv_file, text_field="sentence", batch_size=len(rows)))
    # Assert: one answer per row, in order, whatever the batching and the source
    assert len(from_run) == len(rows)
    assert {a["label"] for a in from_run} <= {"a", "b", "c"}
    for answers in (from_model, from_csv):
        assert [a["label"] for a in answers] == [a["label"] for a in from_run]
        assert [a["score"] for a in answers] == pytest.approx([a["score"] for a in from_run],
                                                              abs=1e-5)
    assert all(1 / 3 <= a["score"] <= 1 for a in from_run)  # the most probable of 3 labels


def test_batched_generation_equals_one_prompt_at_a_time(tiny_gpt2_dir):
    # Prepare: prompts of different lengths, so the batch is left-padded
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    reading = ReadingSettings(task=CAUSAL_LM, text_field="text", max_length=48,
                              prompt_template=DEFAULT_PROMPT)
    prompts = inputs_of([{"instruction": "name the colour of the fruit", "input": "kiwi"},
                         {"text": "the lime is"},
                         {"instruction": "name the colour of the fruit"}], reading, "rows")
    one_by_one = [generate(model, LMCollator(tokenizer, 48), prompt, max_new_tokens=6,
                           device=torch.device("cpu")) for prompt in prompts]
    # Execute
    batched = predictions(TrainedModel(model, tokenizer, reading), prompts, batch_size=3,
                          max_new_tokens=6)
    # Assert
    assert [a["generated"] for a in batched] == one_by_one
    assert prompts[0] == DEFAULT_PROMPT.format(instruction="name the colour of the fruit",
                                               input="kiwi")


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "fine"}, {"body": "no text"}], "rows row 2: field 'text' is missing or not text"),
    ([{"text": 7}], "rows row 1: field 'text' is missing or not text"),
    ([], "rows has no rows"),
])
def test_a_row_without_its_text_is_refused_by_number(rows, message):
    reading = ReadingSettings(task="classification", text_field="text", max_length=32,
                              prompt_template=DEFAULT_PROMPT)
    with pytest.raises(PredictError) as caught:
        inputs_of(rows, reading, "rows")
    assert str(caught.value) == message


def test_an_unusable_source_or_input_file_is_refused_before_any_model_loads(run_and_export,
                                                                            tmp_path):
    run, model = run_and_export
    (tmp_path / "rows.txt").write_text("text\n")
    with pytest.raises(PredictError, match="neither a fedtune run directory"):
        predict_file(tmp_path, tmp_path / "rows.txt")
    with pytest.raises(DataError, match=r"neither \.jsonl, \.jsonl\.gz nor \.csv"):
        predict_file(run, tmp_path / "rows.txt")
    with pytest.raises(DataError, match="does not exist"):
        predict_file(run, tmp_path / "absent.jsonl")
    (model / "fedtune.json").write_text("{not json")
    with pytest.raises(PredictError, match=r"fedtune\.json is unreadable"):
        predict_file(model, tmp_path / "rows.txt")


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
    ('{"label": 1}\n', "row 1: field 'text' is missing or not text"),
])
def test_bad_input_gets_one_line_and_exit_code_2(run_and_export, tmp_path, content, message):
    run, _ = run_and_export
    (tmp_path / "rows.jsonl").write_text(content)
    done = fedtune("predict", run, "--input", tmp_path / "rows.jsonl", "--output",
                   tmp_path / "answers.jsonl")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "answers.jsonl").exists()


def test_the_command_writes_one_json_line_per_row(run_and_export, tmp_path):
    _, model = run_and_export
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "alpha item 1"}, {"text": "bravo item 2"}])
    done = fedtune("predict", model, "--input", tmp_path / "rows.jsonl")
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == 2 and all(set(a) == {"label", "score"} for a in answers)
