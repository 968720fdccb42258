"""`python -m dse.sweep +space=NAME [overrides]`: plan and run a sweep through Hydra, or list the studies
(`--list [NAME]`); bad input ends with one line naming it, Ctrl-C with one line saying how to resume."""

from __future__ import annotations

import signal
import sys

import optuna
import sqlalchemy
from omegaconf import DictConfig

from dse.config import register_schemas
from dse.data import DataError
from dse.storage import StudyError, transient
from dse.sweep.plan import plan_sweep
from dse.sweep.progress import list_studies
from dse.sweep.run import interrupted, run_sweep

__all__ = ["main"]


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGINT, interrupted)
    cli = list(HydraConfig.get().overrides.task)
    try:
        plan = plan_sweep(cfg, cli)
        outcome = run_sweep(plan)
    except (ValueError, StudyError, DataError) as e:
        raise SystemExit(f"dse.sweep: {e}") from None
    except KeyboardInterrupt:
        print("dse.sweep: interrupted; finished trials are kept in the study; run the same command again to resume "
              "(interrupted trials continue from their last checkpoint)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        if not transient(e):
            raise
        raise SystemExit(f"dse.sweep: the storage was unreachable for over study.storage_retry_seconds; "
                         f"run the same command again to resume ({type(e).__name__})") from None
    if not outcome.ok:
        raise SystemExit(f"dse.sweep: {outcome.problems()}")


def main() -> None:
    """`python -m dse.sweep +space=NAME [overrides]`, or `python -m dse.sweep --list [NAME]`."""
    import hydra

    if "--list" in sys.argv[1:]:  # before Hydra, which would take it for an override
        raise SystemExit(list_studies(sys.argv[1:]))
    register_schemas()
    hydra.main(version_base="1.3", config_path="../../conf", config_name="sweep")(_main)()


if __name__ == "__main__":
    main()
