"""experiments/fmnist_table.py: the budgets' runs, the table it writes, and its loud failures."""

import json
import os
import sys

import pytest

from tests.conftest import REPO, load_config_file

sys.path.insert(0, os.path.join(REPO, "experiments"))
import fmnist_table as table  # noqa: E402


def fields(command):
    """--config.FIELD=VALUE arguments of a maejax.main command, as a dict."""
    prefix = "--config."
    return dict(arg[len(prefix) :].split("=", 1) for arg in command if arg.startswith(prefix))


def test_every_budget_runs_the_recipes_with_only_its_step_counts_changed(tmp_path):
    for name, budget in table.BUDGETS.items():
        runs = dict(table.plan(budget, str(tmp_path)))
        pretrained = ["mae", "diffmae"] if budget.get("diffmae", True) else ["mae"]
        wanted = pretrained + [f"{task}_{s}" for task in ("finetune", "linprobe") for s in budget["starts"]]
        assert list(runs) == wanted, name
        for run_name, command in runs.items():
            task = run_name.split("_")[0]
            config = table.PRETRAIN_CONFIGS.get(run_name, table.recipe(budget, task))
            assert f"--config={config}" in command
            assert f"--workdir={tmp_path / run_name}" in command
            given = fields(command)
            steps = budget["pretrain"] if run_name in table.PRETRAIN_CONFIGS else budget[task]
            assert int(given["total_steps"]) == steps
            # schedule lengths, logging and the kNN evaluation's sets only: the recipe is the config file's
            lengths = {"total_steps", "checkpoint_every_steps", "eval_every_steps", "init_from"}
            if task == "linprobe" and "knn" in budget:
                bank, queries = budget["knn"]
                assert (int(given.pop("knn.num_train")), int(given.pop("knn.num_eval"))) == (bank, queries)
            assert set(given) <= lengths
            if run_name not in table.PRETRAIN_CONFIGS:
                start = run_name.split("_", 1)[1]
                assert given["init_from"] == ("random" if start == "random" else str(tmp_path / start))


def test_the_budgets_are_the_ones_the_readme_names():
    epochs = lambda steps: steps / table.STEPS_PER_EPOCH  # noqa: E731
    long = table.BUDGETS["long"]
    assert epochs(long["pretrain"]) >= 100 and epochs(long["finetune"]) >= 30
    assert long["knn"] == (60000, 10000)  # the whole of both Fashion-MNIST splits
    quick = table.BUDGETS["quick"]
    assert (quick["pretrain"], quick["finetune"], quick["linprobe"]) == (100, 150, 150)


def test_the_long_fine_tuning_recipe_is_the_short_one_with_mild_regularisation():
    from maejax import config as config_lib
    from maejax.task import changed_fields

    long = table.BUDGETS["long"]
    assert table.recipe(long, "finetune") == "configs/finetune_fmnist_long.py"
    assert table.recipe(long, "linprobe") == "configs/linprobe_fmnist.py"
    assert table.recipe(table.BUDGETS["cpu"], "finetune") == "configs/finetune_fmnist.py"
    short = load_config_file(os.path.join(REPO, "configs/finetune_fmnist.py"))
    recipe = load_config_file(os.path.join(REPO, table.recipe(long, "finetune")))
    as_saved = json.loads(config_lib.with_resolved_model(short).to_json_best_effort())
    assert changed_fields(as_saved, recipe) == sorted(
        ["total_steps", "eval_every_steps", "checkpoint_every_steps", "finetune.crop_scale"]
        + ["finetune.label_smoothing", "model.drop_path", "optimizer.layer_decay"]
    )
    assert recipe.total_steps == long["finetune"]  # its own schedule is the budget's
    assert tuple(recipe.finetune.crop_scale) == (0.8, 1.0)
    assert (recipe.finetune.label_smoothing, recipe.model.drop_path, recipe.optimizer.layer_decay) == (
        0.1,
        0.1,
        0.75,
    )


def write_metrics(workdir, rows):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_the_table_comes_from_the_runs_files_and_a_missing_number_stops_it(tmp_path):
    budget = {**table.BUDGETS["quick"], "starts": ("random", "mae")}
    for start, (ft, lp, knn) in {"random": (0.5, 0.4, 0.3), "mae": (0.625, 0.75, 0.875)}.items():
        write_metrics(
            tmp_path / f"finetune_{start}", [{"step": 1, "loss": 2.0}, {"step": 150, "eval_top1": ft}]
        )
        write_metrics(tmp_path / f"linprobe_{start}", [{"step": 150, "eval_top1": lp, "knn_top1": knn}])
    table.write_json(str(tmp_path / "pixel_logreg.json"), {"eval_top1": 0.844, "knn_top1": 0.8125})
    results = table.collect(budget, str(tmp_path))
    assert results["rows"]["mae"] == {"finetune_top1": 0.625, "linprobe_top1": 0.75, "knn_top1": 0.875}
    results.update(budget_name="quick", budget=budget, commit="abc1234", minutes=10.0)
    text = table.markdown(results)
    assert "| MAE | 62.5 | 75.0 | 87.5 |" in text and "| scratch (random init) | 50.0 | 40.0 | 30.0 |" in text
    assert "| raw pixels, logistic regression / kNN | - | 84.4 | 81.2 |" in text and "commit abc1234" in text
    assert "10,000 training / 2,000 test images" in text  # the kNN monitor's subsets at this budget

    write_metrics(tmp_path / "linprobe_mae_no_knn", [{"step": 150, "eval_top1": 0.5}])
    os.replace(
        tmp_path / "linprobe_mae_no_knn" / "metrics.jsonl", tmp_path / "linprobe_mae" / "metrics.jsonl"
    )
    with pytest.raises(SystemExit, match=r"mae: the runs logged no \['knn_top1'\]"):
        table.collect(budget, str(tmp_path))


def test_a_failing_run_stops_the_table_with_its_command_and_output(tmp_path):
    os.makedirs(tmp_path / "logs")
    command = [sys.executable, "-c", "import sys; print('the output'); sys.exit(3)"]
    with pytest.raises(SystemExit, match=r"(?s)broken failed \(exit 3\).*the output"):
        table.run("broken", command, str(tmp_path))
    table.run("fine", [sys.executable, "-c", "pass"], str(tmp_path))
    assert set(table.read_json(str(tmp_path / "seconds.json"))) == {"fine"}


def test_part_of_a_budget_runs_the_named_runs_and_tables_the_cells_it_has(tmp_path):
    budget = table.BUDGETS["long"]
    runs = table.select(table.plan(budget, str(tmp_path)), "linprobe_mae, mae")
    assert [name for name, _ in runs] == ["linprobe_mae", "mae"]
    unknown = r"--runs='mae,probe': unknown run\(s\) \['probe'\]; valid: mae, diffmae"
    with pytest.raises(SystemExit, match=unknown):
        table.select(table.plan(budget, str(tmp_path)), "mae,probe")

    write_metrics(tmp_path / "mae", [{"step": 100, "loss": 0.5}, {"step": 23438, "loss": 0.25}])
    write_metrics(tmp_path / "linprobe_mae", [{"step": 234, "eval_top1": 0.5, "knn_top1": 0.75}])
    results = {"budget_name": "long", "budget": budget, "commit": "abc1234"}
    results.update(table.partial(budget, str(tmp_path)))
    assert results["pretraining"] == {"mae": {"value": 0.25, "step": 23438, "of": 23438}, "diffmae": None}
    text = table.partial_markdown(results)
    assert "MAE pre-trained 23,438 of 23,438 steps (loss 0.2500)" in text and "commit abc1234" in text
    assert "| MAE | not run | 50.0 (step 234 of 2,344) | 75.0 (step 234 of 2,344) |" in text
    assert "| scratch (random init) | not run | not run | not run |" in text
    assert "raw pixels" not in text  # the floors not run yet
    assert "kNN: k = 20 on the frozen encoder's cls features, 60,000 training / 10,000 test images." in text


def test_report_tables_runs_stopped_part_way_and_runs_nothing(tmp_path, monkeypatch):
    write_metrics(tmp_path / "mae", [{"step": 23438, "loss": 0.25}])
    write_metrics(tmp_path / "finetune_mae", [{"step": 703, "eval_top1": 0.9}, {"step": 900, "loss": 0.3}])
    monkeypatch.setattr(table, "run", lambda *a: pytest.fail(f"--report ran {a[0]}"))
    monkeypatch.setattr(sys, "argv", ["fmnist_table.py", "--budget=long", f"--out={tmp_path}", "--report"])
    table.main()
    text = (tmp_path / "partial.md").read_text()
    assert "| MAE | 90.0 (step 703 of 7,032) | not run | not run |" in text
    assert json.loads((tmp_path / "partial.json").read_text())["rows"]["mae"]["finetune_top1"]["step"] == 703
    assert (tmp_path / "partial_curves.png").stat().st_size > 0  # the curves of the runs that exist


def test_the_pixel_floors_run_with_the_budgets_knn_sets_and_join_a_partial_table(tmp_path, monkeypatch):
    name, command = table.pixel_floors(table.BUDGETS["long"], str(tmp_path))
    assert name == "pixel_logreg" and command[-2:] == ["--knn_train=60000", "--knn_eval=10000"]
    assert table.pixel_floors(table.BUDGETS["cpu"], str(tmp_path))[1][-2:] == [
        "--knn_train=10000",
        "--knn_eval=2000",
    ]

    import pixel_logreg

    out = tmp_path / "pixel_logreg.json"
    argv = ["pixel_logreg.py", f"--out={out}", "--epochs=1", "--knn_train=3000", "--knn_eval=500"]
    monkeypatch.setattr(sys, "argv", argv)
    pixel_logreg.main()
    floor = json.loads(out.read_text())
    assert (floor["knn_train"], floor["knn_eval"]) == (3000, 500)
    # raw Fashion-MNIST pixels are far from chance (10 %) with either classifier
    assert floor["eval_top1"] > 0.7 and floor["knn_top1"] > 0.6

    monkeypatch.setattr(sys, "argv", ["fmnist_table.py", "--budget=long", f"--out={tmp_path}", "--report"])
    table.main()
    cells = f"{100 * floor['eval_top1']:.1f} | {100 * floor['knn_top1']:.1f}"
    assert f"| raw pixels, logistic regression / kNN | - | {cells} |" in (tmp_path / "partial.md").read_text()
