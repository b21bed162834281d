"""The ``pdm-edge`` command line (click): the root group and one module per command group.

============== ===========================================================================
module         commands
============== ===========================================================================
``config``     ``config check``
``ingest``     ``ingest`` (print the windows of the ingestion stage)
``publish``    ``simulate``, ``replay`` (publish signals over MQTT)
``run``        ``run`` (the appliance: :mod:`pdm_edge.runtime.service`)
``demo``       ``demo`` (a thin wrapper over :mod:`pdm_edge.runtime.demo`)
``store``      ``store check``
``labels``     ``label add|list``
``models``     ``models list|show|promote|rollback|train|export|import|keygen``
``fleet``      ``fleet server|join|import|export|status|eval-femto``
``report``     ``report SITE/MACHINE``
``eval``       ``eval`` (the evaluation protocol, :mod:`pdm_edge.evaluation`)
``bench``      ``bench`` (:mod:`pdm_edge.bench`)
============== ===========================================================================

Shared pieces (configuration context, error handling, options) are in :mod:`._common`. Every
command that talks to MQTT takes ``--broker HOST:PORT``; its default comes from the
configuration file: ``--config``, else ``$PDM_EDGE_CONFIG``, else ``./pdm-edge.toml``, else
``/etc/pdm-edge/pdm-edge.toml``. Errors that pdm-edge raises on purpose
(:class:`~pdm_edge.errors.PdmEdgeError`) are printed as one line and exit with status 2
(configuration) or 1 (anything else), never as a traceback. Commands import what they run
inside their function, so ``pdm-edge --help`` stays quick.
"""

from __future__ import annotations

import logging
import os

import click

from pdm_edge import __version__
from pdm_edge.cli import bench, config, demo, eval, fleet, ingest, labels, models, publish, report, run, store
from pdm_edge.cli._common import Ctx
from pdm_edge.config import PRIVATE_UMASK

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pdm-edge")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration TOML [default: $PDM_EDGE_CONFIG, ./pdm-edge.toml, /etc/pdm-edge/pdm-edge.toml].")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """pdm-edge: predictive maintenance beside the machine."""
    os.umask(PRIVATE_UMASK)  # every state file 0600, every directory 0700 (issue 15 row 12)
    ctx.obj = Ctx(config_path)
    logging.basicConfig(level=log_level or os.environ.get("PDM_EDGE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _cmd in (config.config_group, ingest.ingest, publish.simulate, publish.replay, store.store_group, eval.eval_cmd,
             run.run_cmd, demo.demo, report.report_cmd, labels.label_group, models.models_group, bench.bench_cmd,
             fleet.fleet_group):
    main.add_command(_cmd)
