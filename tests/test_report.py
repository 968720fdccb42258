"""The report on small real studies (tiny trainings on generated CIFAR-10, two seeds each, and a dropout study on
generated Fashion-MNIST): every trial and configuration first, the paper tables' rows, the mean/std arithmetic,
missing and extra rows, Table 7, the figures, index.md, and bad input."""

from __future__ import annotations

import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import write_fashion_mnist
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from optuna.trial import TrialState
from sweeps import run_tiny_sweep

from dse.latency import figures
from dse.models import parse_name, resolve_config
from dse.paper import paper_table, size_note
from dse.report import load_studies, non_dominated, plot_pareto, write_report
from dse.report.__main__ import main
from dse.report.frame import MEASURED_ALONE, clean, completed
from dse.report.results import KNOBS
from dse.report.tables import PAPER_TABLES, targets
from dse.report.write import our_notes

REPO = Path(__file__).resolve().parents[1]
ALL_FORMATS = ("markdown", "csv", "latex")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """Two studies: `base` (Table 1: SqueezeNet-v1.1 and Shallow SqueezeNext-06-0.4x) with one deployment
    record, and `drop` (Table 4's model at dropout 0.25, a p the paper lacks); two seeds each."""
    tmp = tmp_path_factory.mktemp("report")
    seeds = ("space.seeds=[0,1]", "sweep.seeds=2")
    base_url, base = run_tiny_sweep(
        tmp, "+space=baselines", "space.points=[SqueezeNet-v1.1,Shallow SqueezeNext-06-0.4x]", *seeds, name="base"
    )
    drop_url, drop = run_tiny_sweep(tmp, "+space=dropout", "space.grid={model.dropout:[0.25]}", *seeds, name="drop")
    study = optuna.load_study(study_name=base, storage=base_url)
    deployed = next(t for t in study.trials if t.user_attrs["paper_name"] == "Shallow SqueezeNext-06-0.4x")
    record = {
        "trial": deployed.number,
        "paper_name": "Shallow SqueezeNext-06-0.4x",
        "fp32_acc": 0.5,
        "int8_acc": 0.475,
        "onnx_fp32_bytes": 250_000,
        "onnx_int8_bytes": 80_000,
        "latency_fp32_ms": 1.5,
        "latency_int8_ms": 0.9,
        "latency_how": "onnxruntime, batch 1, 1 thread",
        "bundle": "bundles/x",
    }
    study.set_user_attr(f"deploy:{deployed.number}", record)
    return {"tmp": tmp, "base": (base, base_url), "drop": (drop, drop_url), "deployed": record}


@pytest.fixture(scope="module")
def base_report(studies) -> Path:
    name, url = studies["base"]
    return write_report(load_studies([name], [url]), studies["tmp"] / "out", ALL_FORMATS)


@pytest.fixture(scope="module")
def both_report(studies) -> Path:
    (base, base_url), (drop, drop_url) = studies["base"], studies["drop"]
    return write_report(load_studies([base, drop], [base_url, drop_url]), studies["tmp"] / "out", ("markdown", "csv"))


@pytest.fixture(scope="module")
def fashion_report(studies) -> Path:
    """A dropout study on generated Fashion-MNIST: two values of p, one architecture, one seed."""
    tmp = studies["tmp"]
    write_fashion_mnist(tmp / "fashion", n_train=160, n_test=40)
    url, name = run_tiny_sweep(
        tmp,
        "+space=dropout",
        "data=fashion_mnist",
        "space.grid={model.dropout:[0.1,0.2]}",
        "train.epochs=1",
        name="fashion",
        data_root=tmp / "fashion",
    )
    return write_report(load_studies([name], [url]), tmp / "out", ALL_FORMATS)


@pytest.fixture
def drawn(monkeypatch) -> dict[str, Figure]:
    """The figures the report saves (still written), by file name."""
    figures, save = {}, Figure.savefig

    def keep(self, path, *args, **kwargs):
        figures[Path(path).name] = self
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def csv(folder: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(folder / (f"table{table}.csv" if table.isdigit() else f"{table}.csv"))


def md_line(folder: Path, table: str, model: str) -> str:
    return next(
        line for line in (folder / f"table{table}.md").read_text().splitlines() if line.startswith(f"| {model} ")
    )


def test_every_paper_row_of_tables_1_to_6_has_a_configuration():
    assert all(t is not None for table in PAPER_TABLES for t in targets(table))
    assert [t is None for t in targets("7")] == [True, False, False, False]  # "Squeezed CNN" names no model


def test_table1_has_the_papers_rows_in_order_and_missing_rows_as_missing(base_report):
    t1, paper = csv(base_report, "1"), paper_table(1)
    assert t1["paper_model"].tolist() == paper["model"].tolist()
    assert (
        t1["paper_acc"].tolist() == paper["acc"].tolist() and t1["paper_size_mb"].tolist() == paper["size_mb"].tolist()
    )
    ran = {"SqueezeNet-v1.1", "Shallow SqueezeNext-06-0.4x"}
    assert dict(zip(t1["paper_model"], t1["n"])) == {m: 2 if m in ran else 0 for m in paper["model"]}
    missing = t1[t1["n"] == 0]
    assert missing[["acc_mean", "acc_diff", "size_mb", "s_per_epoch_mean", "params"]].isna().all().all()
    line = md_line(base_report, "1", "SqueezeNext-23-2x")
    assert "not run" in line and "0.00" not in line


def test_mean_and_std_are_those_of_the_trials(studies, base_report):
    name, url = studies["base"]
    trials = optuna.load_study(study_name=name, storage=url).get_trials(states=[TrialState.COMPLETE])
    t1 = csv(base_report, "1")
    for model, paper_model in (("SqueezeNet-v1.1", "SqueezeNet-v1.1"), ("Shallow SqueezeNext-06-0.4x",) * 2):
        mine = [t.user_attrs for t in trials if t.user_attrs["paper_name"] == model]
        acc = [100 * a["test_acc"] for a in mine]
        speed = [a["s_per_epoch"] for a in mine]
        row = t1[t1["paper_model"] == paper_model].iloc[0]
        assert row["our_model"] == model and row["n"] == 2 and row["seeds"] == "0 1"
        assert row["acc_mean"] == pytest.approx(statistics.mean(acc))
        assert row["acc_std"] == pytest.approx(statistics.stdev(acc))
        assert row["acc_diff"] == pytest.approx(statistics.mean(acc) - row["paper_acc"])
        assert row["s_per_epoch_mean"] == pytest.approx(statistics.mean(speed))
        assert row["s_per_epoch_std"] == pytest.approx(statistics.stdev(speed))
        assert row["size_mb"] == pytest.approx(mine[0]["size_mb"]) and row["params"] == mine[0]["params"]
        val = [100 * a["curves"][-1]["val_acc"] for a in mine]
        assert row["val_acc_mean"] == pytest.approx(statistics.mean(val))
        cell = f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}"
        assert cell in md_line(base_report, "1", paper_model)


def test_table3_sets_other_depths_beside_our_model_of_the_same_width(base_report):
    t3 = csv(base_report, "3").set_index("paper_model")
    assert t3.loc["Shallow SqueezeNext-12-0.4x", "our_model"] == "Shallow SqueezeNext-06-0.4x"
    assert t3.loc["Shallow SqueezeNext-12-0.4x", "n"] == 2
    assert t3.loc["Shallow SqueezeNext-14-0.5x", "our_model"] == "Shallow SqueezeNext-06-0.5x"
    assert t3.loc["Shallow SqueezeNext-14-0.5x", "n"] == 0


def test_rows_the_paper_lacks_come_after_its_rows(base_report, both_report):
    assert both_report.name == "base+drop"
    t4 = csv(both_report, "4")
    assert t4["paper_model"].iloc[:5].tolist() == paper_table(4)["model"].tolist() and (t4["n"].iloc[:5] == 0).all()
    extra = t4.iloc[5:]
    assert len(extra) == 1 and extra["paper_model"].isna().all()
    assert extra.iloc[0][["p", "n", "our_model"]].tolist() == [0.25, 2, "Shallow SqueezeNext-06-0.2x"]
    assert "(not in the paper)" in (both_report / "table4.md").read_text()
    assert len(csv(both_report, "1")) == 9  # the dropout study reproduces Table 4 only: nothing of it in Table 1
    assert len(csv(base_report, "4")) == 5


def test_table7_shows_recorded_bundles_and_else_says_not_yet_run(studies, base_report, both_report):
    t7, record = csv(base_report, "7"), studies["deployed"]
    assert t7["paper_model"].iloc[:4].tolist() == paper_table(7)["model"].tolist() and t7["trial"].iloc[:4].isna().all()
    ours = t7.iloc[4]
    assert ours["trial"] == record["trial"] and ours["fp32_acc"] == pytest.approx(50.0)
    assert ours["int8_acc"] == pytest.approx(47.5) and ours["onnx_int8_mb"] == pytest.approx(0.08)
    name, url = studies["drop"]
    folder = write_report(load_studies([name], [url]), studies["tmp"] / "drop-only")
    assert "**Not yet run**" in (folder / "table7.md").read_text()
    assert "not yet run" in (folder / "index.md").read_text()


@pytest.mark.parametrize("png", ["figure9.png", "pareto.png"])
def test_figures_are_written(base_report, png):
    data = (base_report / png).read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000


def test_formats_csv_and_latex(base_report, both_report):
    tex = (base_report / "table1.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"acc \% ours" in tex and "±" not in tex
    assert not (both_report / "table1.tex").exists() and (both_report / "table1.csv").exists()


def test_index_links_everything_with_provenance(studies, base_report):
    text = (base_report / "index.md").read_text()
    for target in [f"table{t}.md" for t in "1234567"] + ["table1.csv", "table1.tex", "figure9.png", "pareto.png"]:
        assert f"]({target})" in text
    name, url = studies["base"]
    attrs = optuna.load_study(study_name=name, storage=url).trials[0].user_attrs
    assert attrs["provenance"]["git_commit"] in text and attrs["split"]["indices_sha256"] in text
    assert "python -m dse.sweep" in text and "+space=baselines" in text
    assert "2 of 9 paper rows run" in text and "No pruned trials." in text


def test_report_is_a_pure_function_of_the_db(studies, base_report):
    name, url = studies["base"]
    again = write_report(load_studies([name], [url]), studies["tmp"] / "again", ALL_FORMATS)
    for path in sorted(base_report.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("pruned", [False, True])
def test_a_study_with_no_finished_trials_gives_an_empty_valid_report(tmp_path, capsys, pruned):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="empty", storage=url, directions=["maximize", "minimize", "minimize"])
    if pruned:
        trial = study.ask()
        trial.set_user_attr("epochs_planned", 5)
        trial.set_user_attr("curves", [{"epoch": 1, "train_acc": 0.1, "val_acc": 0.1}])
        trial.set_user_attr("pruned_reason", "pareto: dominated at epoch 1")
        study.tell(trial, state=TrialState.PRUNED)
    main(["--study", "empty", "--storage", url, "--out", str(tmp_path / "out")])
    folder = tmp_path / "out" / "empty"
    assert f"0 complete of {int(pruned)} trials" in capsys.readouterr().out
    index = (folder / "index.md").read_text()
    assert "No complete trial" in index
    assert ("1 pruned trial(s); epochs saved (planned − run): 4 of 5" if pruned else "No pruned trials.") in index
    assert (folder / "table1.md").read_text().count("| not run ") == 9
    assert all((folder / png).read_bytes().startswith(PNG) for png in ("figure9.png", "pareto.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--study", "nope"], r"no study 'nope' in sqlite:///.*base\.db; studies there: base$"),
        (["--study", "base", "--storage", "sqlite:///{tmp}/missing.db"], r"no study DB at .*missing\.db"),
        (
            ["--study", "base", "--storage", "sqlite:///{tmp}/garbage.db"],
            r"garbage\.db is not a readable SQLite DB .*corrupt or another file",
        ),
        (["--study", "base", "--storage", "postgresql://nobody@127.0.0.1:1/dse"], r"cannot reach storage"),
        (["--study", "base", "drop", "--storage", "a", "b", "c"], r"3 storages for 2 studies"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(studies, tmp_path, capsys, args, message):
    (tmp_path / "garbage.db").write_text("not a database")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--storage" not in args:
        args += ["--storage", studies["base"][1]]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("dse.report: ")
    assert re.search(message, err.strip())
    assert (tmp_path / "garbage.db").read_text() == "not a database"
    assert not (tmp_path / "out").exists()


def test_command_line_exits_2_without_a_traceback(studies):
    name, url = studies["base"]
    run = subprocess.run(
        [sys.executable, "-m", "dse.report", "--study", "nope", "--storage", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.startswith("dse.report: no study 'nope'")
    )


def test_report_never_imports_the_trainer_or_the_sweep():
    code = "import sys, dse.report; print(sorted(m for m in sys.modules if m in ('dse.train', 'dse.sweep')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


def test_non_dominated_minimises_every_coordinate():
    assert non_dominated([(1, 5), (2, 2), (3, 3), (5, 1), (2, 2)]) == [0, 1, 3, 4]


def test_the_paper_space_fills_every_row_of_tables_1_to_6_and_nothing_else():
    space = yaml.safe_load((REPO / "conf" / "space" / "paper.yaml").read_text())
    ran = set()
    for point in space["points"]:
        name, overrides = (point, []) if isinstance(point, str) else (point["model"], point["overrides"])
        knobs = dict(o.split("=") for o in overrides)
        cfg = parse_name(name)
        cfg.dropout = float(knobs["model.dropout"]) if "model.dropout" in knobs else None
        full = resolve_config(cfg)
        ran.add(
            clean(
                (
                    full.name,
                    full.blocks,
                    full.width,
                    full.dropout,
                    full.activation,
                    full.inplace,
                    knobs.get("data", "cifar10"),
                    knobs.get("train", "sgd"),
                )
            )
        )
    wanted = {t for table in PAPER_TABLES for t in targets(table)}
    assert ran == wanted


def test_validation_accuracy_is_the_last_epochs_when_the_study_does_not_optimise_it():
    trial = {
        "study": "s",
        "number": 0,
        "state": "COMPLETE",
        "val_acc": None,
        "test_acc": 0.5,
        "seed": 0,
        "paper_name": "Shallow SqueezeNext-06-0.4x",
        "family": "shallow_squeezenext",
        "blocks": [1, 1, 1, 1],
        "width": 0.4,
        "dropout": 0.3,
        "activation": "elu",
        "inplace": True,
        "dataset": "cifar10",
        "optimizer": "sgd",
        "lr": 0.01,
        "epochs_planned": 2,
        "split": {"train": 100},
        "curves": [{"val_acc": 0.25}, {"val_acc": 0.75}],
    }
    done = completed(pd.DataFrame([trial]))
    assert done["val_pct"].tolist() == [75.0] and done["test_pct"].tolist() == [50.0]


# ---------------------------------------------------------------- our own results first


def test_the_trials_table_lists_every_trial_with_the_swept_knobs_and_the_front(studies, base_report):
    name, url = studies["base"]
    study = optuna.load_study(study_name=name, storage=url)
    trials = {t.number: t for t in study.get_trials(states=[TrialState.COMPLETE])}
    table = csv(base_report, "trials").set_index("trial")
    assert sorted(table.index) == sorted(trials) and len(table) == 4
    wanted = {
        *KNOBS,
        "state",
        "model",
        "seed",
        "params",
        "mmacs",
        "val_acc",
        "test_acc",
        "size_mb",
        "int8_mb",
        "latency_ms",
        "latency_iqr_ms",
        "s_per_epoch",
        "front",
    }
    assert wanted <= set(table.columns)
    latency = figures(study.user_attrs)
    for number, t in trials.items():
        row, a = table.loc[number], t.user_attrs
        assert row["val_acc"] == pytest.approx(100 * t.values[0]) and row["test_acc"] == pytest.approx(
            100 * a["test_acc"]
        )
        assert (row["model"], row["family"], row["params"], row["state"]) == (
            a["paper_name"],
            a["family"],
            a["params"],
            "COMPLETE",
        )
        assert row["size_mb"] == pytest.approx(a["size_mb"]) and row["mmacs"] == pytest.approx(a["macs"] / 1e6)
        assert row["latency_ms"] == pytest.approx(latency[a["latency_key"]]["ms"])
        assert row["latency_iqr_ms"] == pytest.approx(latency[a["latency_key"]]["iqr_ms"])
    numbers = list(trials)
    front = {numbers[i] for i in non_dominated([(-t.values[0], t.values[1], t.values[2]) for t in trials.values()])}
    assert set(table.index[table["front"]]) == front
    assert table["params"].is_monotonic_increasing  # smallest models first


def test_index_leads_with_every_trial(base_report):
    text = (base_report / "index.md").read_text()
    assert text.index("## Our results") < text.index("## Studies") < text.index("## The paper's tables")
    first = text[text.index("| trial") :].split("\n\n")[0].splitlines()[2:]  # the first table's rows
    assert len(first) == 4 and "[csv](trials.csv)" in text and "[latex](configs.tex)" in text
    assert "(+ mean ± std" not in text and "### Every configuration (mean ± std over seeds) (2;" in text


def test_the_configurations_table_gives_mean_and_std_over_seeds(studies, both_report):
    table = csv(both_report, "configs")
    assert len(table) == 3 and (table["n"] == 2).all()
    trials = csv(both_report, "trials")
    trials.index = [f"{s}#{n}" for s, n in zip(trials["study"], trials["trial"])]
    for row in table.to_dict("records"):
        mine = trials.loc[row["trials"].split()]
        assert set(mine["model"]) == {row["model"]} and len(mine) == 2
        assert row["val_mean"] == pytest.approx(mine["val_acc"].mean()) and row["val_std"] == pytest.approx(
            mine["val_acc"].std()
        )
        assert row["test_mean"] == pytest.approx(mine["test_acc"].mean())


def test_a_study_on_another_dataset_says_so_in_one_line(fashion_report):
    text = (fashion_report / "index.md").read_text()
    assert (
        "Table 5](table5.md), [Table 6](table6.md): the paper ran these on CIFAR-10 and CIFAR-100; these "
        "studies ran on Fashion-MNIST, so there is nothing of ours to set beside them"
    ) in text
    assert "paper rows run" not in text.replace("0 bundle", "")  # no per-table 'not run' counts for Tables 1-6
    for (
        table
    ) in PAPER_TABLES:  # the one line replaces the rows (README: "one line for Tables 1-6 instead of their rows")
        heading, line = (fashion_report / f"table{table}.md").read_text().strip().split("\n\n")
        assert heading.startswith(f"# Table {table}. ") and "\n" not in line and "not run" not in line
        assert line.startswith(
            "None of these studies ran on CIFAR-10 (they ran on Fashion-MNIST)".replace(
                "CIFAR-10", "CIFAR-100" if table == "6" else "CIFAR-10"
            )
        )
        assert "(trials.md, trials.csv, trials.tex)" in line
        assert r"\texttt{dse/paper.yaml}" in (fashion_report / f"table{table}.tex").read_text()
        assert (
            len(csv(fashion_report, table)) == len(paper_table(table)) and (csv(fashion_report, table)["n"] == 0).all()
        )


def test_a_dropout_study_has_one_latency_and_a_figure_against_p(fashion_report):
    trials = csv(fashion_report, "trials")
    assert (
        sorted(trials["p"]) == [0.1, 0.2] and trials["latency_ms"].nunique() == trials["latency_iqr_ms"].nunique() == 1
    )
    text = (fashion_report / "index.md").read_text()
    assert "- on the front: Fashion-MNIST: Shallow SqueezeNext-06-0.2x p=0." in text
    assert "paper (published" not in text  # no paper points drawn for Fashion-MNIST
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(fashion_report / "pareto.png")
    drawn = (image[..., :3] < 0.9).any(axis=-1).mean()  # share of pixels that are not white
    assert drawn > 0.02


# ---------------------------------------------------------------- a newcomer's first hour (issue 23)


def _cells(folder: Path, table: str, model: str) -> dict:
    """One row of a printed paper table, by column."""
    lines = (folder / f"table{table}.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    return dict(zip(header, (c.strip() for c in md_line(folder, table, model).strip("|").split("|"))))


def test_sizes_are_compared_only_where_the_papers_sizes_agree(base_report):
    assert _cells(base_report, "1", "Shallow SqueezeNext-06-0.4x")["Δ MB"] == "not comparable"
    assert _cells(base_report, "1", "SqueezeNet-v1.1")["Δ MB"].startswith(("+", "-"))
    t1 = csv(base_report, "1").set_index("paper_model")
    assert t1.loc["Shallow SqueezeNext-06-0.4x", "size_mb"] > 0 and pd.isna(
        t1.loc["Shallow SqueezeNext-06-0.4x", "size_diff"]
    )
    assert t1.loc["SqueezeNet-v1.1", "size_diff"] == pytest.approx(t1.loc["SqueezeNet-v1.1", "size_mb"] - 2.961)
    assert list(t1["size_comparable"]) == [not m.startswith("Shallow") for m in t1.index]
    notes = (base_report / "table1.md").read_text().split("\n\n")[-1].splitlines()
    assert f"- {size_note(['1'])}" in notes
    assert (
        "Table 1 lists Shallow SqueezeNext-06-0.4x at 0.272 MB, no larger than the narrower Shallow "
        "SqueezeNext-06-0.2x at 0.273 MB" in size_note(["1"])
    )


def _mentioned(text: str) -> set[str]:
    """The files a Markdown text links to or names (tables, figures, CSV and LaTeX files)."""
    links = set(re.findall(r"\]\(([^)\s]+)\)", text))
    return links | set(re.findall(r"\b[\w+.-]+\.(?:md|csv|tex|png)\b", text)) - {"dse/paper.yaml"}


def test_the_default_report_writes_every_file_it_links_or_names(studies, tmp_path):
    (base, base_url), (drop, drop_url) = studies["base"], studies["drop"]
    folder = write_report(load_studies([base, drop], [base_url, drop_url]), tmp_path)  # the default: Markdown only
    for page in folder.glob("*.md"):
        text = page.read_text()
        assert not {m for m in _mentioned(text) if not (folder / m).exists()}, page.name
        assert "CSV" not in text, page.name


def test_figures_of_one_seed_promise_no_band_and_no_error_bar(studies, fashion_report, tmp_path, drawn):
    write_report(load_studies(["fashion"], [f"sqlite:///{studies['tmp'] / 'fashion.db'}"]), tmp_path)
    figure9, pareto = drawn["figure9.png"], drawn["pareto.png"]
    assert "band" not in figure9.get_suptitle() and "one seed per model" in figure9.get_suptitle()
    assert figure9.axes[0].get_title().startswith("Shallow SqueezeNext (paper: Figure 9 (c))\n")
    assert not any(isinstance(c, PolyCollection) for c in figure9.axes[0].collections)
    assert "std" not in pareto.axes[0].get_ylabel() and "one seed" in pareto.axes[0].get_ylabel()
    assert not pareto.axes[0].containers  # no error bars


def test_figures_of_several_seeds_draw_their_bands_and_error_bars(studies, tmp_path, drawn):
    name, url = studies["base"]
    write_report(load_studies([name], [url]), tmp_path)
    figure9, pareto = drawn["figure9.png"], drawn["pareto.png"]
    assert "band: min to max" in figure9.get_suptitle()
    assert all(any(isinstance(c, PolyCollection) for c in ax.collections) for ax in figure9.axes)
    assert [ax.get_title().split("\n")[0] for ax in figure9.axes] == [
        "SqueezeNet (paper: Figure 9 (a))",
        "Shallow SqueezeNext (paper: Figure 9 (c))",
    ]
    assert "(bar: ± std)" in pareto.axes[0].get_ylabel() and len(pareto.axes[0].containers) == 1


def test_the_pareto_plot_labels_every_point(tmp_path, drawn):
    widths = {0.125: (60.0, 0.07), 0.2: (70.0, 0.10), 0.3: (65.0, 0.16), 0.5: (50.0, 0.33)}  # W: val %, MB
    groups = pd.DataFrame(
        [
            {
                "family": "shallow_squeezenext",
                "blocks": (1, 1, 1, 1),
                "width": w,
                "dropout": 0.3,
                "activation": "elu",
                "inplace": True,
                "optimizer": "sgd",
                "lr": 0.01,
                "dataset": "cifar10",
                "model": f"Shallow SqueezeNext-06-{w}x",
                "n": 1,
                "val_mean": acc,
                "val_std": math.nan,
                "size_mb": mb,
                "latency_ms": 1.0 + mb,
            }
            for w, (acc, mb) in widths.items()
        ]
    )
    front = plot_pareto(groups, tmp_path / "pareto.png")
    ax = drawn["pareto.png"].axes[0]
    assert len(front) == 2 and sorted(t.get_text() for t in ax.texts) == ["W=0.125", "W=0.2", "W=0.3", "W=0.5"]
    assert not ax.containers and "std" not in ax.get_ylabel()


def test_the_latency_note_says_which_trials_lack_their_architectures_figure(base_report):
    assert "older dse" not in (base_report / "index.md").read_text()
    assert all("no figure of their architecture" not in n for n in our_notes(csv(base_report, "trials")))
    trials = pd.DataFrame(
        {"study": ["old", "old", "new"], "latency_how": [MEASURED_ALONE, MEASURED_ALONE, "in one sitting"]}
    )
    note = our_notes(trials)[1]
    assert "2 trial(s) of old have no figure of their architecture" in note and "`latency:<architecture>`" in note
    assert "the latency each trial measured itself" in note and "older dse" not in note


@pytest.mark.parametrize(
    "study, message",
    [
        (
            "width-fashion_mnist-quik",
            "no study DB at studies/width-fashion_mnist-quik.db (storage "
            "'sqlite:///studies/width-fashion_mnist-quik.db'); studies in studies/: baselines-cifar10-quick, "
            "width-fashion_mnist-quick; did you mean width-fashion_mnist-quick?; run a sweep first or pass the right storage",
        ),
        (
            "nothing-like-it",
            "studies in studies/: baselines-cifar10-quick, width-fashion_mnist-quick; run a sweep first",
        ),
    ],
)
def test_a_missing_study_db_names_the_studies_there_and_the_closest(tmp_path, monkeypatch, capsys, study, message):
    (tmp_path / "studies").mkdir()
    for name in ("width-fashion_mnist-quick", "baselines-cifar10-quick"):
        (tmp_path / "studies" / f"{name}.db").touch()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["--study", study])
    assert message in capsys.readouterr().err


def test_an_unknown_study_in_a_db_names_the_closest(studies, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--study", "bsae", "--storage", studies["base"][1], "--out", str(tmp_path)])
    assert capsys.readouterr().err.strip().endswith("studies there: base; did you mean base?")


def test_a_study_whose_trials_were_all_pruned_says_why_in_the_report(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = optuna.create_study(study_name="tiny", storage=url, directions=["maximize", "minimize", "minimize"])
    for kb in (233.4, 75.5):
        trial = study.ask()
        trial.set_user_attr("size_mb", kb / 1e3)
        trial.set_user_attr("pruned_reason", f"over budget: size {kb} KB > 1 KB")
        study.tell(trial, state=TrialState.PRUNED)
    main(["--study", "tiny", "--storage", url, "--out", str(tmp_path / "out")])
    why = "all 2 trials pruned: over budget (size 75.5 KB > 1 KB)"
    assert f"no complete trial: {why}" in capsys.readouterr().out
    index = (tmp_path / "out" / "tiny" / "index.md").read_text()
    assert f"**No complete trial**: {why}." in index and "run (or finish) the sweep" not in index
