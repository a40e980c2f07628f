"""Real federation over Flower: a ServerApp and a ClientApp over our own pieces.

``server.py`` (sampling, aggregation, server optimizers, checkpoints,
metrics) and ``node.py`` (a node's data and its local update) use the
simulation's functions; ``wire.py`` is what crosses the wire;
``server_app.py`` / ``client_app.py`` are the Flower entry points named in
``flower-app/pyproject.toml``; ``rehearsal.py`` writes per-node data dirs for
a one-machine rehearsal (``launch/flower_local.sh``). docs/DEPLOY.md.
"""
