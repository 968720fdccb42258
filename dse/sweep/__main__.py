"""`python -m dse.sweep +space=NAME [overrides]`: plan and run a sweep, or list the studies (`--list [NAME]`); bad
input ends with one line naming it (HYDRA_FULL_ERROR=1: Hydra's own), Ctrl-C with one line saying how to resume."""

from __future__ import annotations

import logging
import signal
import sys

import optuna
import sqlalchemy
from omegaconf import DictConfig

from dse.config import register_schemas
from dse.data import DataError
from dse.storage import StudyError, transient
from dse.sweep.compose import compose, folder_override
from dse.sweep.plan import plan_sweep
from dse.sweep.progress import list_studies
from dse.sweep.run import interrupted, run_sweep

__all__ = ["main"]

_CONFIG_DIR = ("--config-dir", "-cd")  # Hydra's flag for one more config folder: taken here, as hydra.searchpath


def _sweep(cfg: DictConfig | None, cli: list[str]) -> None:
    """Compose (unless Hydra did), plan and run the sweep of these overrides; errors end with one line."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGINT, interrupted)
    try:
        plan = plan_sweep(compose(cli) if cfg is None else cfg, cli)
        outcome = run_sweep(plan)
    except (ValueError, StudyError, DataError) as e:
        raise SystemExit(f"dse.sweep: {e}") from None
    except KeyboardInterrupt:
        print(
            "dse.sweep: interrupted; finished trials are kept in the study; run the same command again to resume "
            "(interrupted trials continue from their last checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        if not transient(e):
            raise
        raise SystemExit(
            f"dse.sweep: the storage was unreachable for over study.storage_retry_seconds; "
            f"run the same command again to resume ({type(e).__name__})"
        ) from None
    if not outcome.ok:
        raise SystemExit(f"dse.sweep: {outcome.problems()}")


def _hydra_app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    _sweep(cfg, list(HydraConfig.get().overrides.task))


def _config_dirs(args: list[str]) -> list[str]:
    """`--config-dir DIR` (or `--config-dir=DIR`, `-cd DIR`) as a `hydra.searchpath` override."""
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in _CONFIG_DIR:
            if not eq:
                if i + 1 == len(args):
                    raise SystemExit(f"dse.sweep: {flag} needs a folder, e.g. {flag} ./myconf")
                value, i = args[i + 1], i + 1
            out.append(folder_override(value))
        else:
            out.append(args[i])
        i += 1
    return out


def main() -> None:
    """`python -m dse.sweep +space=NAME [overrides]`, or `python -m dse.sweep --list [NAME]`. Hydra's own flags
    (`--help`, `--cfg job`, `--info`) go to Hydra's app."""
    import hydra

    args = sys.argv[1:]
    if "--list" in args:  # before Hydra, which would take it for an override
        raise SystemExit(list_studies(args))
    args = _config_dirs(args)
    register_schemas()
    if any(a.startswith("-") for a in args):
        sys.argv[1:] = args
        hydra.main(version_base="1.3", config_path="../../conf", config_name="sweep")(_hydra_app)()
        return
    # What Hydra's app set up (conf/sweep.yaml: hydra/job_logging=stdout): the library's log lines on stdout.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    _sweep(None, args)


if __name__ == "__main__":
    main()
