"""FedPIT over Flower: self-generation and a private local adapter on every node.

Real processes on loopback (a SuperLink, 3 SuperNodes, `flwr run`), as in
test_flower.py, with the scripted tiny model of test_flower.py (it writes a
pair the parser and the filters keep, so self-generation yields real
synthetic pairs and the global adapter trains on them). The federation runs
configs/fedpit.py:smoke with client-level DP, once halted after round 1
(ServerApp exits) with every SuperNode then restarted, and resumed; the
in-process job (pipelines/fedpit.train_and_export) runs the same config
uninterrupted. Checked, bit for bit: the server's global adapter, every
node's local adapter (restored from its own orbax checkpoints after the
restart; the never-sampled client's initial one), every node's synthetic
pairs, the metrics rows (losses, DP clipping and epsilon, bytes, generation
counts). On the wire: the replies hold the global delta and numbers only,
never the local adapter, a real example or a synthetic pair.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from fedjax_u2s import testing  # pylint: disable=g-import-not-at-top
from fedjax_u2s.flower import rehearsal
from fedjax_u2s.flower import server as server_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_flower as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = tf.REPO
CONFIG = os.path.join(REPO, "configs", "fedpit.py")
NUM_NODES = 3
ROUNDS = 2
GLOBAL_METRICS = {"num-examples", "cursor", "loss-sum", "num-tokens", "num-steps",
                  "nonfinite", "train-seconds", "setup-seconds", "generation-seconds"}

_SIMULATION = """
import os, sys
from fedjax_u2s import config_blocks
from fedjax_u2s.flower import server
from fedjax_u2s.pipelines import common, fedpit
config = config_blocks.load(sys.argv[1], "smoke", **server.parse_overrides(sys.argv[2]))
os.makedirs(sys.argv[3], exist_ok=True)
fedpit.train_and_export(config, sys.argv[3], common.load_model(config))
"""


def _overrides(model):
  """configs/fedpit.py:smoke on 3 clients (2 sampled a round: clients 1 and 2
  both rounds, so client 0 keeps its initial local adapter), fresh pairs every
  round (round 2's come from base + a noised global adapter), DP clipping
  every delta, unpacked rows (a node packs alone: test_flower._overrides)."""
  return {"model.name": model, "partition.num_clients": NUM_NODES,
          "federated.num_rounds": ROUNDS, "federated.clients_per_round": 2,
          "fedpit.selfgen.every": 1, "fedpit.selfgen.max_new_tokens": 24,
          "federated.dp.enabled": True, "federated.dp.clip_norm": 0.01,
          "federated.dp.noise_multiplier": 0.5, "train.pack": False,
          "train.tensorboard": False}


def _text(overrides):
  return " ".join(f"{k}={v}" for k, v in overrides.items())


def _load(path):
  return safetensors.numpy.load_file(os.path.join(path, "adapter_model.safetensors"))


def _assert_same(a, b):
  a, b = _load(a), _load(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def fedpit_run(tmp_path_factory, smollm2_path):
  """The federation (halted, nodes restarted, resumed) and the simulation."""
  del smollm2_path  # The scripted model uses SmolLM2's tokenizer.
  root = str(tmp_path_factory.mktemp("flower_fedpit"))
  model = tf._write_scripted_chat_model(os.path.join(root, "scripted"))  # pylint: disable=protected-access
  overrides = _overrides(model)
  sim = os.path.join(root, "sim")
  sim_log = os.path.join(root, "sim.log")
  sim_proc = subprocess.Popen(
      [sys.executable, "-c", _SIMULATION, CONFIG, _text(overrides), sim],
      stdout=open(sim_log, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
      env=tf._env(os.path.join(root, "flwr_home")))  # pylint: disable=protected-access
  config = testing.load_config(CONFIG, "smoke", **server_lib.parse_overrides(
      _text(overrides)))
  made = rehearsal.write_node_dirs(config, os.path.join(root, "nodes"))
  assert len(made["nodes"]) == NUM_NODES and made["eval_file"]
  dep = tf.Deployment(root, made["nodes"], os.path.join(root, "jax_cache"))
  work = os.path.join(root, "fl")
  audit = os.path.join(root, "audit")
  run = dict(config=f"{CONFIG}:smoke", **{"eval-file": made["eval_file"],
                                          "audit-dir": audit})
  try:
    first = dep.run(work, {**overrides, "train.halt_after_round": 1}, **run)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # Every SuperNode goes down and comes back: the local adapters live on disk.
    for i in range(NUM_NODES):
      dep.stop(dep.nodes[i])
      dep.nodes[i] = dep.start_node(i, name=f"node{i}-restarted")
    second = dep.run(work, overrides, **run)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from the checkpoint of round 1" in second.stdout
  finally:
    dep.close()
  assert sim_proc.wait(tf.RUN_TIMEOUT) == 0, open(sim_log).read()[-3000:]
  from fedjax_u2s.flower import node_fedpit  # pylint: disable=g-import-not-at-top
  states = [node_fedpit.state_dir(d, config) for d in made["nodes"]]
  return {"root": root, "work": work, "sim": sim, "audit": audit,
          "nodes": made["nodes"], "states": states, "config": config}


def test_global_and_local_adapters_equal_the_simulation(fedpit_run):
  r = fedpit_run
  _assert_same(os.path.join(r["work"], "adapter"), os.path.join(r["sim"], "adapter"))
  assert any(np.abs(v).max() > 0 for v in _load(os.path.join(r["work"], "adapter")).values())
  for c, state in enumerate(r["states"]):
    name = f"client_{c:04d}"
    _assert_same(os.path.join(state, "local_adapters", name),
                 os.path.join(r["sim"], "local_adapters", name))
    # The node's copy of the final global adapter is the server's.
    _assert_same(os.path.join(state, "adapter"), os.path.join(r["work"], "adapter"))
    # Personal = global + local as one PEFT adapter of rank 2r, alpha 2 alpha.
    personal = _load(os.path.join(state, "personal_adapter"))
    glob_, local = (_load(os.path.join(state, "adapter")),
                    _load(os.path.join(state, "local_adapters", name)))
    for k, v in personal.items():
      axis = 0 if "lora_A" in k else 1
      np.testing.assert_array_equal(v, np.concatenate([glob_[k], local[k]], axis=axis))
    cfg = json.load(open(os.path.join(state, "personal_adapter", "adapter_config.json")))
    lora = r["config"].lora
    assert (cfg["r"], cfg["lora_alpha"]) == (2 * lora.rank, 2 * lora.alpha)
  # Local state on disk: the rounds each client trained (client 0: none).
  rounds = [sorted(int(n) for n in os.listdir(os.path.join(s, "local_checkpoints")))
            if os.path.isdir(os.path.join(s, "local_checkpoints")) else []
            for s in r["states"]]
  assert rounds == [[], [1, 2], [1, 2]]
  # Client 0 was never sampled: its exported local adapter is the initial one
  # (b = 0), so a trained one differs from it.
  init = _load(os.path.join(r["states"][0], "local_adapters", "client_0000"))
  assert all(not v.any() for k, v in init.items() if "lora_B" in k)
  trained = _load(os.path.join(r["states"][1], "local_adapters", "client_0001"))
  assert any(v.any() for k, v in trained.items() if "lora_B" in k)
  summary = json.load(open(os.path.join(r["work"], "flower_run.json")))
  assert summary["node_exports"] == {"exported": [0, 1, 2], "missing": []}


def test_synthetic_pairs_and_metrics_equal_the_simulation(fedpit_run):
  r = fedpit_run
  for c, state in enumerate(r["states"]):
    for path in sorted(glob.glob(os.path.join(r["sim"], "synthetic", "round_*",
                                              f"client_{c:04d}.*"))):
      rel = os.path.relpath(path, os.path.join(r["sim"], "synthetic"))
      assert open(os.path.join(state, "synthetic", rel)).read() == open(path).read()
    made = sorted(os.path.relpath(p, state) for p in glob.glob(
        os.path.join(state, "synthetic", "round_*", "*")))
    assert made == sorted(os.path.relpath(p, r["sim"]) for p in glob.glob(
        os.path.join(r["sim"], "synthetic", "round_*", f"client_{c:04d}.*")))
  kept = [json.loads(l) for l in open(os.path.join(
      r["states"][1], "synthetic", "round_0001", "client_0001.jsonl"))]
  assert [p["instruction"] for p in kept] == ["Describe the main topic of this passage."]

  rows = [json.loads(l) for l in open(os.path.join(r["work"], "metrics.jsonl"))]
  sim_rows = [json.loads(l) for l in open(os.path.join(r["sim"], "metrics.jsonl"))]
  assert [x["round"] for x in rows] == [x["round"] for x in sim_rows] == [0, 1, 2]
  assert rows[0]["eval_loss"] == sim_rows[0]["eval_loss"]
  for a, b in zip(rows[1:], sim_rows[1:]):
    assert a["clients"] == b["clients"] == a["answered"] == [1, 2]
    for key in ("train_loss", "num_tokens", "eval_loss", "bytes_down", "bytes_up",
                "dp_clipped_fraction", "dp_epsilon", "synthetic", "synthetic_kept"):
      assert a[key] == b[key], key
    assert a["synthetic_kept"] == 2 and a["dp_clipped_fraction"] == 1.0
    assert "local_loss" not in a  # The local phase's numbers stay on the nodes.


def test_nothing_of_the_local_adapter_or_the_data_crosses_the_wire(fedpit_run):
  r = fedpit_run
  names = {f"{t}.{m}" for t in ("q", "k", "v", "o") for m in ("a", "b")}
  replies = sorted(glob.glob(os.path.join(r["audit"], "round*.json")))
  assert len(replies) == 2 * ROUNDS
  for path in replies:
    m = json.load(open(path))
    assert set(m) == {"delta", "metrics"}
    assert set(m["delta"]["arrays"]) == names
    # The global phase's numbers and generation counts; nothing of the local phase.
    keys = set(m["metrics"]["values"])
    assert GLOBAL_METRICS <= keys, keys
    assert all(k in GLOBAL_METRICS or k.startswith("synthetic-") for k in keys), keys
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in m["metrics"]["values"].values())
  for path in glob.glob(os.path.join(r["audit"], "finish-*.json")):
    assert json.load(open(path)) == {"done": {"kind": "metrics",
                                              "values": {"exported": 1}}}
  assert len(glob.glob(os.path.join(r["audit"], "finish-*.json"))) == NUM_NODES
  blob = b"".join(open(p, "rb").read()
                  for p in glob.glob(os.path.join(r["audit"], "*.bin")))
  # No local adapter, of any round, in any byte the nodes sent.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checked = 0
  for state in r["states"][1:]:
    base = os.path.join(state, "local_checkpoints")
    for step in os.listdir(base):
      with ocp.StandardCheckpointer() as ck:
        tree = ck.restore(os.path.join(base, step, "state"))
      for ab in tree["local"].values():
        for x in ab.values():
          row = np.asarray(x, np.float32).reshape(-1)[:16].tobytes()
          assert row not in blob
          checked += 1
  assert checked == 2 * 2 * 8
  # No real example, no synthetic pair.
  for node_dir, state in zip(r["nodes"], r["states"]):
    for line in open(os.path.join(node_dir, "instructions.jsonl")):
      for msg in json.loads(line)["messages"]:
        assert msg["content"][:40].encode("utf-8") not in blob
    for path in glob.glob(os.path.join(state, "synthetic", "round_*", "*.jsonl")):
      for line in open(path):
        pair = json.loads(line)
        for field in ("instruction", "response"):
          assert pair[field][:20].encode("utf-8") not in blob


def test_local_store_follows_the_servers_history(tmp_path):
  """A round asked for again starts from the state saved before it; newer
  states (a history the server rolled back) are dropped when it is saved."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node_fedpit  # pylint: disable=g-import-not-at-top
  store = node_fedpit.LocalStore(str(tmp_path / "local"))
  template = {"q": {"a": jax.ShapeDtypeStruct((2, 3), np.float32)}}
  tree = lambda v: {"q": {"a": np.full((2, 3), v, np.float32)}}
  assert store.before(5, template) is None
  for r in (1, 3, 4):
    store.save(node_fedpit.LocalState(tree(r), cursor=10 * r, round=r))
  got = store.before(2, template)
  assert (got.round, got.cursor) == (1, 10)
  np.testing.assert_array_equal(got.adapter["q"]["a"], tree(1)["q"]["a"])
  assert store.before(9, template).round == 4
  store.save(node_fedpit.LocalState(tree(7), cursor=70, round=3))  # Round 3 again.
  assert store.rounds() == [1, 3]
  np.testing.assert_array_equal(store.before(9, template).adapter["q"]["a"],
                                tree(7)["q"]["a"])
