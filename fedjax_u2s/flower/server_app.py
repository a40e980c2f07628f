"""The Flower ServerApp: ``flwr run flower-app <superlink>`` runs :func:`main`.

The run config (``flower-app/pyproject.toml`` ``[tool.flwr.app.config]``,
overridden with ``flwr run ... -c 'key=value'``) names the experiment config
and the server's workdir; :func:`fedjax_u2s.flower.server.serve` does the rest.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedjax_u2s.flower import server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
  settings = server.settings_from_run_config(dict(context.run_config))
  server.serve(grid, settings)
