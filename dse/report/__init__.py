"""The report: every trial and configuration of the studies, the paper's Tables 1-7, Figure 9 and a Pareto plot,
regenerated from study DBs alone (read through `dse.study`; nothing here trains or imports the trainer)."""

from dse.front import non_dominated
from dse.report.frame import StudyData, aggregate, completed, load_studies
from dse.report.plots import plot_figure9, plot_pareto
from dse.report.results import configs_table, trials_table
from dse.report.tables import PAPER_TABLES, compare, deployments, formatted
from dse.report.write import FORMATS, write_report

__all__ = [
    "FORMATS",
    "PAPER_TABLES",
    "StudyData",
    "aggregate",
    "compare",
    "completed",
    "configs_table",
    "deployments",
    "formatted",
    "load_studies",
    "non_dominated",
    "plot_figure9",
    "plot_pareto",
    "trials_table",
    "write_report",
]
