import json
import math

import pytest

from fedtune.simulations.report import ReportError, summarise, write_report


def synthetic_run(run_dir, rounds=3):
    rows = []
    for r in range(1, rounds + 1):
        clients = {"client-0": 0.5 + 0.1 * r, "client-1": 0.2 + 0.05 * r, "client-2": 0.6}
        rows.append({"round": r, "accuracy": 0.4 + 0.1 * r, "loss": 2.0 / r, "clients": 3,
                     "train_loss": 2.1 / r, "bytes_up": 1000 * r, "bytes_down": 2000,
                     "client_accuracy": clients, "client_accuracy_mean": 0.5,
                     "client_accuracy_worst": min(clients.values()),
                     "client_accuracy_std": 0.1, "label_accuracy": [0.9, math.nan, 0.1, 0.5],
                     "epsilon": {"client-0": 1.0 * r, "client-1": 1.1 * r},
                     "epsilon_max": 1.1 * r, "seconds": 1.0})
    rows[-1]["clients_exhausted"] = ["client-1"]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_writes_every_plot_and_a_summary(tmp_path):
    synthetic_run(tmp_path / "run")
    written = write_report(tmp_path / "run")
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "bytes.png", "clients.png", "epsilon.png", "labels.png",
                     "report.md"]
    assert all(p.stat().st_size > 2000 for p in written if p.suffix == ".png")
    summary = (tmp_path / "run" / "report.md").read_text()
    assert "| 3 | 0.7000 | 0.6667 | 3 | 0.3500 |" in summary
    assert "Worst client: client-1 at 0.3500" in summary
    assert "Worst labels: 2 (0.100), 3 (0.500), 0 (0.900)." in summary
    assert "spent their privacy budget: client-1" in summary


def test_a_plain_baseline_gets_the_plots_it_has_data_for(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "loss": 1.0})
                                       + "\n")
    assert [p.name for p in write_report(run)] == ["accuracy.png", "report.md"]
    assert "Final accuracy 0.5000 after round 1." in summarise([{"round": 1, "accuracy": 0.5,
                                                                 "loss": 1.0}])


def test_no_metrics_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match=r"no metrics\.jsonl rows"):
        write_report(tmp_path)


def test_a_causal_lm_run_reports_its_perplexity(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": math.log(30 / r), "perplexity": 30 / r}
            for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.name for p in write_report(run)] == ["accuracy.png", "report.md"]
    assert ("Held-out perplexity 30.000 after round 1, 15.000 after round 2"
            in (run / "report.md").read_text())


def test_labels_are_named_from_the_runs_labels_json_and_the_worst_twenty_sorted(tmp_path):
    from fedtune.server.metrics_log import write_label_names
    from fedtune.simulations.report import worst_labels

    run = tmp_path / "run"
    run.mkdir()
    names = [f"intent_{i}" for i in range(30)]
    accuracy = [(i * 7 % 30) / 30 for i in range(30)]
    accuracy[4] = math.nan  # a label absent from the test split
    rows = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "label_accuracy": accuracy}]
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    write_label_names(run, names)

    assert "labels.png" in [p.name for p in write_report(run)]
    summary = (run / "report.md").read_text()
    worst = worst_labels(rows[0], names, 20)
    assert len(worst) == 20 and [a for _, a in worst] == sorted(a for _, a in worst)
    assert worst[0] == ("intent_0", 0.0) and "intent_4" not in dict(worst)
    assert f"Worst labels: intent_0 (0.000), {worst[1][0]} (0.033)" in summary
    assert "| intent_0 | 0.000 |" in summary and summary.count("| intent_") == 20
