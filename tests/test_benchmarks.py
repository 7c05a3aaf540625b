"""Every benchmark still runs (quick mode) and records its figures with their provenance."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.slow
def test_quick_benchmarks_run_and_record_machine_versions_and_command():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("dp_overhead", "secagg_cost", "communication", "throughput", "scale", "utility",
                 "audit"):
        body = json.loads((RESULTS / f"{name}-quick.json").read_text())
        assert body["quick"] is True and body["command"] and body["machine"]["versions"]["torch"]
        assert (RESULTS / f"{name}-quick.png").stat().st_size > 1000
    ratios = json.loads((RESULTS / "dp_overhead-quick.json").read_text())["ratios"]
    assert set(ratios) == {"hooks", "functorch", "ghost"}
    assert all(r["time_ratio"] > 0 for r in ratios.values())
    case = json.loads((RESULTS / "communication-quick.json").read_text())["cases"][0]
    assert 0 < case["adapter_over_full"] < 0.05
    assert 0.9 < case["secagg_over_plain_upload"] < 1.05  # 32-bit ring: float32's size
    throughput = json.loads((RESULTS / "throughput-quick.json").read_text())
    assert throughput["examples_trained"] > 0 and throughput["ratio"] > 0
    scale = json.loads((RESULTS / "scale-quick.json").read_text())["runs"]
    assert [r["clients"] for r in scale] == [10, 30]
    assert all(r["sampled_per_round"] == 3 and r["peak_rss_gib"] > 0.1 for r in scale)
    utility = json.loads((RESULTS / "utility-quick.json").read_text())["results"]["builtin"]
    assert set(utility) == {"centralised", "dirichlet-0.5", "dp-eps8", "secagg"}
    assert all(0 <= run["accuracy"] <= 1 and 0 <= run["macro_f1"] <= 1 for run in utility.values())
    assert 0 < utility["dp-eps8"]["epsilon_max"] <= 8
    audit = json.loads((RESULTS / "audit-quick.json").read_text())["results"]
    assert set(audit) == {"no-dp", "dp-eps8"}
    assert audit["no-dp"]["epsilon_reported"] is None and audit["no-dp"]["canaries"] == 40
    assert 0 < audit["dp-eps8"]["epsilon_reported"] <= 8
    assert audit["dp-eps8"]["epsilon_lower_bound"] <= audit["dp-eps8"]["epsilon_reported"]


def test_the_feature_probe_pools_only_real_tokens_and_fits_separable_features(tiny_model_dir):
    import torch
    from transformers import AutoModel

    from benchmarks.feature_probe import features, probe
    from fedtune.common.data import Examples
    from fedtune.common.model import load_tokenizer

    model, tokenizer = AutoModel.from_pretrained(tiny_model_dir).eval(), load_tokenizer(
        str(tiny_model_dir))
    short = Examples(texts=["the cat"], labels=torch.zeros(1, dtype=torch.long).numpy())
    padded = Examples(texts=["the cat", "the cat sat on the mat and the dog sat too"],
                      labels=torch.zeros(2, dtype=torch.long).numpy())
    alone, beside = features(model, tokenizer, short, 32), features(model, tokenizer, padded, 32)
    assert set(alone) == {"cls", "pooler", "mean"}
    assert torch.allclose(alone["mean"][0], beside["mean"][0], atol=1e-5)  # padding ignored
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    assert probe(x, y, x, y, 2) > 0.95
    assert probe(x, 1 - y, x, y, 2) < 0.05  # scored on the test labels, not the training ones


def test_the_gpu_round_harness_runs_the_real_apps_in_one_process(tmp_path):
    """benchmarks/gpu_round on a CPU (no quantisation): the apps train and the ledger counts."""
    import argparse

    from benchmarks.gpu_round import run_rounds

    args = argparse.Namespace(quantize="none", dp=True, hidden=64, layers=2, clients=2, rounds=2)
    figures = run_rounds(tmp_path / "work", args)
    rows = figures["rounds"]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert rows[-1]["perplexity"] < rows[0]["perplexity"] * 1.05
    assert 0 < max(rows[-1]["epsilon"].values()) <= 8


def test_the_privacy_utility_grid_shows_mean_spread_the_dp_gap_and_a_panel_per_data_set(
        tmp_path):
    from benchmarks.privacy_utility import dp_gaps, flags_for, plot, summarise

    runs = {"0": {"accuracy": 0.8, "macro_f1": 0.7}, "1": {"accuracy": 0.9, "macro_f1": 0.8},
            "2": {"error": "exit 2"}}  # a failed seed is left out, never counted as 0
    summary = summarise(runs)
    assert summary["seeds"] == 2 and summary["accuracy"]["mean"] == pytest.approx(0.85)
    assert summary["accuracy"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert (summary["accuracy"]["min"], summary["accuracy"]["max"]) == (0.8, 0.9)
    cells = {"iid/none": {"summary": summarise({"0": {"accuracy": 0.9}})},
             "iid/8": {"summary": summarise({"0": {"accuracy": 0.85}})},
             "pooled/none": {"summary": summarise({"0": {"accuracy": 0.9}})}}
    assert dp_gaps(cells) == {"iid": 5.0}  # points; pooled has no epsilon-8 cell yet
    assert flags_for("pooled", "none", 2) == ("centralized", ["--seed", "2"])
    assert flags_for("pooled", "8", 2) == (  # centralized refuses --dp: one client holds all
        "simulate", ["--num-clients", "1", "--dp", "--epsilon", "8", "--seed", "2"])
    assert flags_for("dirichlet-0.1", "none", 0) == (
        "simulate", ["--partition", "dirichlet", "--alpha", "0.1", "--seed", "0"])
    grid = {"sst2": {"sizes": {"train_rows": 10, "test_rows": 5}, "cells": cells},
            "banking77": {"sizes": {"train_rows": 10, "test_rows": 5}, "cells": {}}}
    plot(tmp_path / "curve.png", grid)
    assert (tmp_path / "curve.png").stat().st_size > 1000


@pytest.fixture
def privacy_utility(tmp_path, monkeypatch):
    """The benchmark with its runs faked (accuracy 0.5 + seed / 10) and its results in tmp_path;
    returns the module and the list of each call's run directory name, command and flags."""
    import benchmarks.privacy_utility as bench
    import benchmarks.record as record

    calls = []

    def fake_run(command, flags, out):
        calls.append((out.name, command, flags))
        seed = int(flags[flags.index("--seed") + 1])
        return {"accuracy": 0.5 + seed / 10, "macro_f1": 0.4, "epsilon_max": None, "seconds": 1.0}

    def fake_prepare(name, scratch, rows, test_rows):
        (scratch / name).mkdir()
        return scratch / name, {"train_rows": rows, "test_rows": test_rows}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "prepare", fake_prepare)
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    return bench, calls


def test_privacy_utility_with_two_jobs_records_every_cell_and_resumes_without_rerunning(
        privacy_utility, tmp_path, monkeypatch):
    bench, calls = privacy_utility
    argv = ["privacy_utility", "--only", "sst2,banking77", "--partitions", "iid",
            "--epsilons", "8,none", "--rows", "10", "--test-rows", "5", "--jobs", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()

    grid = json.loads((tmp_path / "privacy_utility.json").read_text())["grid"]
    for name in ("sst2", "banking77"):
        for cell in ("iid/8", "iid/none"):
            summary = grid[name]["cells"][cell]["summary"]
            assert summary["seeds"] == 3 and summary["accuracy"]["mean"] == pytest.approx(0.6)
    assert len(calls) == 12
    bench.main()  # everything measured on these sizes already: nothing runs again
    assert len(calls) == 12


def test_privacy_utility_fills_the_named_cells_in_their_order_and_refuses_unknown_ones(
        privacy_utility, tmp_path, monkeypatch, capsys):
    bench, calls = privacy_utility
    cells = "sst2:iid/1,banking77:dirichlet-0.5/none,sst2:iid/1"
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", cells, "--seeds", "0,1"])
    bench.main()

    assert [name for name, _, _ in calls] == [
        "sst2-iid-1-0", "sst2-iid-1-1", "banking77-dirichlet-0.5-none-0",
        "banking77-dirichlet-0.5-none-1"]
    assert calls[0][2][-5:] == ["--dp", "--epsilon", "1", "--seed", "0"]
    assert calls[2][2][-6:] == ["--partition", "dirichlet", "--alpha", "0.5", "--seed", "0"]
    grid = json.loads((tmp_path / "privacy_utility.json").read_text())["grid"]
    assert set(grid["sst2"]["cells"]) == {"iid/1"}
    assert set(grid["banking77"]["cells"]) == {"dirichlet-0.5/none"}

    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/3"])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 2 and "'sst2:iid/3'" in capsys.readouterr().err


def test_an_interrupted_privacy_utility_run_records_only_the_cells_it_measured(
        privacy_utility, tmp_path, monkeypatch):
    bench, _ = privacy_utility
    measured = bench.run

    def stopped_at_banking77(command, flags, out):
        if out.name.startswith("banking77"):
            raise KeyboardInterrupt
        return measured(command, flags, out)

    monkeypatch.setattr(bench, "run", stopped_at_banking77)
    cells = "sst2:iid/none,banking77:iid/none,sst2:iid/8"
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", cells, "--jobs", "1"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()

    grid = json.loads((tmp_path / "privacy_utility.json").read_text())["grid"]
    assert list(grid) == ["sst2"]  # banking77's cell was laid out, never measured
    assert sorted(grid["sst2"]["cells"]) == ["iid/8", "iid/none"]


def test_a_failed_or_stopped_privacy_utility_run_adds_nothing_to_its_cell_and_is_listed(
        privacy_utility, tmp_path, monkeypatch):
    bench, _ = privacy_utility
    measured = bench.run

    def seed_1_fails_and_banking77_is_stopped(command, flags, out):
        if out.name.startswith("banking77") or out.name.endswith("-1"):
            return {"error": "exit -15", "seconds": 2.0}
        return measured(command, flags, out)

    monkeypatch.setattr(bench, "run", seed_1_fails_and_banking77_is_stopped)
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells",
                                      "sst2:iid/none,banking77:iid/none"])
    bench.main()

    grid = json.loads((tmp_path / "privacy_utility.json").read_text())["grid"]
    assert list(grid) == ["sst2"]
    cell = grid["sst2"]["cells"]["iid/none"]
    assert sorted(cell["runs"]) == ["0", "2"] and cell["summary"]["seeds"] == 2
    failed = json.loads((tmp_path / "privacy_utility.json").read_text())["failed"]
    assert sorted((f["data"], f["cell"], f["seed"]) for f in failed) == [
        ("banking77", "iid/none", 0), ("banking77", "iid/none", 1), ("banking77", "iid/none", 2),
        ("sst2", "iid/none", 1)]
    assert {f["error"] for f in failed} == {"exit -15"}


def test_a_run_whose_clients_were_lost_is_a_failed_run_not_a_figure(tmp_path, monkeypatch):
    # Ray ended two actors under memory pressure: the run went on from one client, then none,
    # and exited 0 with a last accuracy that is not the setting's
    import benchmarks.privacy_utility as bench
    from benchmarks.fedtune_run import Finished
    from fedtune.server.metrics_log import append_round

    out = tmp_path / "run"
    out.mkdir()
    for row in ({"round": 1, "accuracy": 0.23, "clients": 5, "clients_failed": 0},
                {"round": 2, "accuracy": 0.14, "clients": 1, "clients_failed": 4},
                {"round": 3, "accuracy": 0.14, "clients": 0, "clients_failed": 5,
                 "round_abandoned": "5 failed or did not answer"}):
        append_round(out, row)
    monkeypatch.setattr(bench, "fedtune", lambda command, flags, out: Finished(9.0, None))
    result = bench.run("simulate", ["--seed", "0"], out)
    assert result == {"error": "clients lost, 9 client replies failed (rounds 2, 3): the rounds "
                               "went on without them; round 3 abandoned (5 failed or did not "
                               "answer)", "seconds": 9.0}
    (out / "metrics.jsonl").unlink()  # a round that aggregated nothing, no client failing
    append_round(out, {"round": 1, "accuracy": 0.8, "clients": 0, "clients_failed": 0,
                       "round_abandoned": "budget spent: client-0"})
    assert bench.run("simulate", ["--seed", "0"], out)["error"] == \
        "clients lost, round 1 abandoned (budget spent: client-0)"
    (out / "metrics.jsonl").unlink()
    append_round(out, {"round": 1, "accuracy": 0.8, "clients": 5, "clients_failed": 0})
    assert bench.run("simulate", ["--seed", "0"], out)["accuracy"] == 0.8


def test_the_gradient_share_splits_one_examples_gradient_between_head_and_lora(
        tiny_model_dir, toy_data_dir):
    from benchmarks.gradient_share import norms
    from fedtune.common.config import RunConfig
    from fedtune.common.task import build_task

    config = RunConfig().with_overrides({"model.name": str(tiny_model_dir),
                                         "data.path": str(toy_data_dir), "privacy.dp": True})
    task = build_task(config)

    split = norms(task, examples=4)

    assert split["head"] > 0 and split["lora"] > 0  # a zero B still gets a gradient
    share = split["head"] ** 2 / (split["head"] ** 2 + split["lora"] ** 2)
    assert abs(split["head_share_of_squared_norm"] - share) < 1e-3
    assert split["lora_values"] == sum(a.size for k, a in task.initial_adapter.items()
                                       if "lora_" in k)  # B only: FFA-LoRA under DP-SGD
    assert not any("lora_A" in k for k in task.initial_adapter)


def test_the_head_only_levers_learn_a_separable_task_and_noise_costs_the_class_means(
        monkeypatch):
    import torch

    import benchmarks.head_only_dp as bench
    from benchmarks.head_only_dp import accuracy, noisy_class_means, private_head

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 2
    x = torch.randn(2000, 8, generator=generator)
    x[:, 0] += 3 * (2 * labels - 1)  # the class is the sign of the first feature
    with torch.no_grad():
        head = private_head(x, labels, 2, epochs=4, lr=5e-2)
        assert accuracy(head(x), labels) > 0.95
        plain = private_head(x, labels, 2, epochs=4, lr=5e-2, private=False)
        assert accuracy(plain(x), labels) > 0.95  # the reference the DP gap is read against
        assert not torch.allclose(plain.weight, head.weight)
        # 200 rows a client is one batch of rate 1: without noise every seed trains the same head
        with monkeypatch.context() as patched:
            patched.setattr(bench, "noise_for_target", None)  # and no noise is searched for
            again = [private_head(x[:1000], labels[:1000], 2, 4, 5e-2, seed, private=False)
                     for seed in (1, 2)]
        assert torch.equal(again[0].weight, again[1].weight)
        unit = torch.nn.functional.normalize(x, dim=1)
        exact = noisy_class_means(x, labels, 2, None)
        assert torch.allclose(exact.norm(dim=1), torch.ones(2))
        assert accuracy(unit @ exact.T, labels) > 0.95
        noisy = noisy_class_means(x, labels, 2, 0.01)  # noise far above one class's sum
        assert (noisy - exact).norm() > 0.5


def test_the_head_gap_by_rows_keys_each_size_once_and_reads_the_gap_from_the_seeds(
        tiny_model_dir, toy_data_dir, monkeypatch):
    import statistics

    from transformers import AutoModel

    import benchmarks.head_only_dp as bench
    from fedtune.common.model import load_tokenizer

    monkeypatch.setattr(bench, "noise_for_target", lambda *_: 1.0)  # the accountant's own tests
    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    found = bench.by_rows(str(toy_data_dir), model, load_tokenizer(str(tiny_model_dir)), 5e-2,
                          [40, 20, 40, 500])  # 72 training rows, 18 test
    assert found["test_rows"] == 18 and found["seeds"] == [0, 1, 2]
    assert list(found["by_train_rows"]) == ["20", "40", "72"]  # sorted, once, capped at the data
    for row in found["by_train_rows"].values():
        dp, plain = row["dp_by_seed"], row["no_dp_by_seed"]
        assert len(dp) == len(plain) == 3 and all(0 <= a <= 1 for a in dp + plain)
        assert row["gap_points"] == round(100 * (statistics.mean(plain) - statistics.mean(dp)), 1)
        assert len(set(plain)) == 1  # one batch of rate 1 a client and no noise: seeds agree
    for bad in ("2000,3", "2000,many"):  # fewer rows than clients; not a number
        with pytest.raises(argparse.ArgumentTypeError, match="whole number of at least 5"):
            bench.row_counts(bad)


def test_a_crypto_only_secagg_cost_run_keeps_the_accuracy_pair_with_its_own_date():
    from benchmarks.secagg_cost import kept_accuracy

    pair = {"plain": {"accuracy": 0.4}, "accuracy_difference": 0.0}
    kept = kept_accuracy({"date": "2026-11-30T19:07:34Z", "accuracy": pair})
    assert kept == {**pair, "date": "2026-11-30"}
    dated = {**pair, "date": "2026-12-05"}
    assert kept_accuracy({"date": "2027-01-01T00:00:00Z", "accuracy": dated}) == dated
    assert kept_accuracy({}) is None


def test_the_audit_at_the_defaults_keeps_each_seed_apart_and_a_later_claim_run_keeps_them(
        tmp_path, monkeypatch):
    import benchmarks.audit as bench
    import benchmarks.privacy_utility as subsample
    import benchmarks.record as record

    calls = []

    def fake_run(flags, out, defect=None):
        calls.append(flags)
        return {"fedtune": " ".join(flags), "epsilon_lower_bound": 1.0 + len(calls)}

    def fake_prepare(name, scratch, rows, test_rows):
        return scratch / name, {"train_rows": rows, "test_rows": test_rows}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(subsample, "prepare", fake_prepare)
    monkeypatch.setattr(bench, "prepare", lambda scratch: str(scratch / "banking77"))
    monkeypatch.setattr(bench, "plot", lambda path, results: None)
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    for argv in (["--defaults", "--only", "sst2"], ["--defaults", "--only", "sst2", "--seed", "2"],
                 ["--settings", "no-dp"]):
        monkeypatch.setattr(sys, "argv", ["audit", *argv])
        bench.main()

    assert "--seed" not in calls[0] and calls[1][-2:] == ["--seed", "2"]
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["defaults"]["sst2"]["epsilon_lower_bound"] == 2.0
    assert saved["defaults_seeds"]["2"]["sst2"]["epsilon_lower_bound"] == 3.0
    assert saved["results"]["no-dp"]["epsilon_lower_bound"] == 4.0
    assert saved["results"]["no-dp"]["date"] == saved["defaults"]["sst2"]["date"]

    monkeypatch.setattr(bench, "run", lambda flags, out, defect=None: {"error": "exit -9"})
    for argv in (["--defaults", "--only", "sst2"], ["--settings", "no-dp,dp-eps8"]):
        monkeypatch.setattr(sys, "argv", ["audit", *argv])
        bench.main()  # a failed run keeps the figure measured before
    kept = json.loads((tmp_path / "audit.json").read_text())
    assert kept["defaults"] == saved["defaults"]
    assert kept["results"]["no-dp"] == saved["results"]["no-dp"]
    assert kept["results"]["dp-eps8"]["error"] == "exit -9"  # nothing to keep: the error shows
    for argv in (["--defaults", "--seed", "-1"], ["--seed", "1"]):
        monkeypatch.setattr(sys, "argv", ["audit", *argv])
        with pytest.raises(SystemExit):
            bench.main()


def test_a_privacy_utility_run_carries_the_day_it_was_measured(tmp_path, monkeypatch):
    import benchmarks.privacy_utility as bench
    from benchmarks.fedtune_run import Finished
    from benchmarks.record import today

    monkeypatch.setattr(bench, "fedtune", lambda command, flags, out: Finished(3.0, None))
    monkeypatch.setattr(bench, "last_round", lambda out: {"accuracy": 0.5, "macro_f1": 0.4})
    result = bench.run("simulate", ["--seed", "0"], tmp_path)
    assert result["accuracy"] == 0.5 and result["seconds"] == 3.0
    assert result["date"] == today()
    monkeypatch.setattr(bench, "fedtune", lambda command, flags, out: Finished(1.0, "exit 2"))
    assert bench.run("simulate", [], tmp_path) == {"error": "exit 2", "seconds": 1.0}


def test_privacy_utility_refuses_to_replace_a_grid_measured_on_other_sizes(
        privacy_utility, tmp_path, monkeypatch):
    bench, calls = privacy_utility
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/none",
                                      "--rows", "10", "--test-rows", "5"])
    bench.main()
    saved = (tmp_path / "privacy_utility.json").read_text()
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8"])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert refused.value.code == 2 and len(calls) == 3
    assert (tmp_path / "privacy_utility.json").read_text() == saved
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8", "--replace"])
    bench.main()
    grid = json.loads((tmp_path / "privacy_utility.json").read_text())["grid"]
    assert list(grid["sst2"]["cells"]) == ["iid/8"] and grid["sst2"]["sizes"]["train_rows"] == 0
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/none",
                                      "--rows", "10", "--results", "privacy_utility-10-rows"])
    bench.main()  # another size in a file of its own: the saved grid stays as it was
    beside = json.loads((tmp_path / "privacy_utility-10-rows.json").read_text())
    assert beside["shape"]["rows"] == 10 and (tmp_path / "privacy_utility-10-rows.png").exists()
    assert json.loads((tmp_path / "privacy_utility.json").read_text())["grid"] == grid


def test_privacy_utility_settings_go_to_every_run_and_keep_their_grid_apart(
        privacy_utility, tmp_path, monkeypatch):
    bench, calls = privacy_utility
    settings = tmp_path / "head_at_random.toml"
    settings.write_text('[model]\nhead_init = "random"\n')
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8"])
    bench.main()
    plain = (tmp_path / "privacy_utility.json").read_text()
    assert all("--config" not in flags for _, _, flags in calls)
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8", "--config",
                                      str(settings)])
    with pytest.raises(SystemExit) as refused:  # the saved grid holds runs without them
        bench.main()
    assert refused.value.code == 2 and len(calls) == 3
    assert (tmp_path / "privacy_utility.json").read_text() == plain
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--results", "privacy_utility-random-head"])
    bench.main()
    assert len(calls) == 6 and all(flags[flags.index("--config") + 1] == str(settings)
                                   for _, _, flags in calls[3:])
    saved = json.loads((tmp_path / "privacy_utility-random-head.json").read_text())
    assert saved["shape"]["config"] == settings.read_text()
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8", "--config",
                                      str(tmp_path / "missing.toml")])
    with pytest.raises(SystemExit) as unreadable:
        bench.main()
    assert unreadable.value.code == 2
    settings.write_text('[model]\nhead_init = "names"\n')  # no run would start: none is tried
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8", "--config",
                                      str(settings), "--results", "privacy_utility-random-head"])
    with pytest.raises(SystemExit) as invalid:
        bench.main()
    assert invalid.value.code == 2 and len(calls) == 6


def test_untrained_runs_nothing_and_keeps_the_floor_beside_the_cells(
        privacy_utility, tmp_path, monkeypatch, capsys):
    bench, calls = privacy_utility
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--cells", "sst2:iid/8"])
    bench.main()
    path = tmp_path / "privacy_utility.json"
    body = json.loads(path.read_text())
    body["failed"] = [{"data": "sst2", "cell": "iid/1", "seed": 0, "error": "exit 2"}]
    path.write_text(json.dumps(body))  # the last invocation's failure stays listed
    floor = {"label_names": {"accuracy": 0.6, "macro_f1": 0.5},
             "random": {"accuracy": 0.5, "macro_f1": 0.3}}
    monkeypatch.setattr(bench, "untrained", lambda data, max_length: floor)
    monkeypatch.setattr(sys, "argv", ["privacy_utility", "--untrained", "--only", "sst2,banking77"])
    bench.main()
    saved = json.loads(path.read_text())
    grid = saved["grid"]
    assert len(calls) == 3  # no run: the epsilon-8 cell is the one measured before
    assert saved["failed"] == body["failed"]
    assert list(grid["sst2"]["cells"]) == ["iid/8"]
    assert grid["sst2"]["untrained"]["label_names"] == floor["label_names"]
    assert grid["banking77"]["untrained"]["random"] == floor["random"]  # kept without cells
    settings = tmp_path / "head_at_random.toml"
    settings.write_text('[model]\nhead_init = "random"\n')  # valid: refused for being there
    for extra in (["--config", str(settings)], ["--cells", "sst2:iid/8"]):
        monkeypatch.setattr(sys, "argv", ["privacy_utility", "--untrained", *extra])
        with pytest.raises(SystemExit) as refused:
            bench.main()
        assert refused.value.code == 2
        assert "--untrained takes no --config or --cells" in capsys.readouterr().err


@pytest.mark.slow
def test_the_untrained_head_from_the_names_reads_each_name_as_its_own_label(tmp_path):
    from benchmarks.privacy_utility import untrained
    from tests.conftest import write_jsonl

    names = ["weather forecast", "football match", "chocolate cake recipe"]
    (tmp_path / "labels.json").write_text(json.dumps(dict(enumerate(names))))
    rows = [{"text": name, "label": label} for label, name in enumerate(names)]
    write_jsonl(tmp_path / "train.jsonl", rows * 2)
    write_jsonl(tmp_path / "test.jsonl", rows)
    floor = untrained(tmp_path, 0)
    assert floor["label_names"] == {"accuracy": 1.0, "macro_f1": 1.0}  # cosine 1 with its own
    assert set(floor) == {"label_names", "random"}
    assert 0.0 <= floor["random"]["accuracy"] <= 1.0


def test_a_benchmark_stopped_while_saving_keeps_the_figures_it_saved_before(tmp_path, monkeypatch):
    import benchmarks.record as record
    from fedtune.common import atomic_file

    monkeypatch.setattr(record, "RESULTS", tmp_path)
    path = record.save("grid", {"accuracy": 0.8}, quick=False)

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_file.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        record.save("grid", {"accuracy": 0.9}, quick=False)
    assert record.load("grid", quick=False)["accuracy"] == 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
