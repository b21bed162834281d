"""``python -m pdm_edge``: the ``pdm-edge`` command."""

from pdm_edge.cli import main

main(prog_name="pdm-edge")
