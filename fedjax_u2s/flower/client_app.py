"""The Flower ClientApp: a SuperNode's answers to the ServerApp.

``describe`` (a query) answers with the client id the node declares
(``--node-config client-id=i``; -1 when it declares none). ``train`` runs
:func:`fedjax_u2s.flower.node.local_update` on the node's own data and
answers with the adapter delta and scalar metrics; nothing else leaves the
node (no text, no token ids, no generated pair: ``tests/test_flower.py``
inspects the replies). A node holding raw text generates its U2S pairs in
its first ``train`` message (:mod:`fedjax_u2s.flower.node_u2s`). Under a
FedPIT config (``configs/fedpit.py``) ``train`` is
:func:`fedjax_u2s.flower.node_fedpit.local_update` (self-generation, the
global phase, the private local phase), and ``finish`` (a query after the
last round) writes the node's global, local and personal adapters into its
own dir; its reply carries no array.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
  """The node's declared client id (-1: none). Imports no JAX: every message
  runs in a fresh process, and this one should take a second, not ten."""
  cid = context.node_config.get("client-id")
  if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)
                          or cid < 0):
    raise ValueError(f"--node-config client-id={cid!r}: must be an integer >= 0.")
  if not context.node_config.get("data-dir"):
    raise ValueError("This SuperNode has no data: start it with --node-config "
                     "'data-dir=\"/path/to/its/data\"'.")
  return Message(RecordDict({"node": ConfigRecord(
      {"client-id": -1 if cid is None else int(cid)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from fedjax_u2s.flower import node as node_lib
  from fedjax_u2s.flower import wire
  # pylint: enable=g-import-not-at-top
  node_config = dict(context.node_config)
  _use_cache(node_config)
  rnd = msg.content["round"]
  config = node_lib.config_from_json(str(rnd["config-json"]))
  model = node_lib.load_model(config)
  template = node_lib.adapter_template(config, model.config)
  client = int(rnd["client-id"])
  declared = node_lib.client_id(node_config)
  if declared is not None and declared != client:
    raise ValueError(f"This node is client {declared}; the server asked it to "
                     f"train as client {client}.")
  params = wire.from_record(msg.content["params"], template, "the global adapter")
  control = client_control = None
  if "control" in msg.content.array_records:
    control = wire.from_record(msg.content["control"], template, "the control")
    client_control = wire.from_record(msg.content["client-control"], template,
                                      "the client control")
  kw = dict(params=params, client=client, round_=int(rnd["round"]),
            cursor=int(rnd["cursor"]), key_data=np.asarray(rnd["key-data"], np.uint32),
            control=control, client_control=client_control)
  data_dir = str(node_config.get("data-dir", ""))
  if config.get("pipeline") == "fedpit":
    from fedjax_u2s.flower import node_fedpit  # pylint: disable=g-import-not-at-top
    result = node_fedpit.local_update(
        config, data_dir, local_key_data=np.asarray(
            rnd["local-key-data"], np.uint32) if "local-key-data" in rnd else None,
        num_clients=int(rnd.get("num-clients", 0)), **kw)
  else:
    result = node_lib.local_update(config, data_dir, node_config=node_config, **kw)
  content = RecordDict({"metrics": wire.metric_record(result.metrics)})
  if result.delta is not None:  # None: a FedPIT node with nothing to upload.
    content["delta"] = wire.to_record(result.delta)
  if result.control_delta is not None:
    content["control-delta"] = wire.to_record(result.control_delta)
  return Message(content, reply_to=msg)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
  """FedPIT, after the last round: the node writes its adapters into its dir."""
  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node as node_lib
  from fedjax_u2s.flower import node_fedpit
  from fedjax_u2s.flower import wire
  # pylint: enable=g-import-not-at-top
  node_config = dict(context.node_config)
  _use_cache(node_config)
  rnd = msg.content["round"]
  config = node_lib.config_from_json(str(rnd["config-json"]))
  client = int(rnd["client-id"])
  declared = node_lib.client_id(node_config)
  if declared is not None and declared != client:
    raise ValueError(f"This node is client {declared}; the server asked it to "
                     f"finish as client {client}.")
  model = node_lib.load_model(config)
  params = wire.from_record(msg.content["params"],
                            node_lib.adapter_template(config, model.config),
                            "the global adapter")
  done = node_fedpit.finish(config, str(node_config.get("data-dir", "")),
                            params=params, client=client, rounds=int(rnd["round"]),
                            num_clients=int(rnd["num-clients"]))
  print(f"[node] client {client}: adapters written to {done['state']}", flush=True)
  return Message(RecordDict({"done": wire.metric_record({"exported": 1})}),
                 reply_to=msg)


def _use_cache(node_config: dict) -> None:
  """JAX's persistent compilation cache in ``cache-dir``, when set."""
  cache = str(node_config.get("cache-dir", "") or "")
  if cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
