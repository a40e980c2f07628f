"""The Flower app over real processes on loopback: a SuperLink, 3 SuperNodes, `flwr run`.

Every process is started and stopped here. A tiny random Llama with
SmolLM2's tokenizer (testing.write_tiny_chat_model) keeps each round to
seconds; the data are the fedit smoke job's, split over the nodes by
fedjax_u2s.flower.rehearsal exactly as the in-process simulation splits them.

Checked: the final adapter equals the simulation's bit for bit (FedAvg, and
FedAdam through a ServerApp killed after round 1 and restarted); the bytes of
every round equal the simulation's accounting; the replies carry no text
and no token ids; a SuperNode stopped mid-round leaves a round applied with
the client that answered, a finished run, intact checkpoints and metrics
naming the dropped client. U2S nodes (raw text in their data dirs) generate
their own pairs on the node, the same pairs and the same adapter as the
in-process u2s job, and neither their text nor their pairs leave them.
The shared federation of the first tests runs over TLS (our own CA) with
SuperNode authentication (plain HTTP only where openssl or ssh-keygen is
missing): its registered nodes train every run there, and a node with an
unregistered key, or none, is refused.
"""

import collections
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from fedjax_u2s import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from fedjax_u2s import config_blocks
from fedjax_u2s import testing
from fedjax_u2s.flower import rehearsal
from fedjax_u2s.flower import server as server_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fedit_instructions.py")
U2S_CONFIG = os.path.join(REPO, "configs", "u2s_wiki.py")
APP = os.path.join(REPO, "flower-app")
BIN = os.path.dirname(sys.executable)
NUM_NODES = 3
ROUNDS = 2
# Seconds a `flwr run` (or a simulation) may take: generous, since on the
# shared 2-core machines a U2S run took over 240 s under a load average of 12.
RUN_TIMEOUT = 600


def _overrides(model, **extra):
  out = {"model.name": model, "partition.num_clients": NUM_NODES,
         "federated.num_rounds": ROUNDS, "train.tensorboard": False}
  if "pack" in config_blocks.base_config().train:
    # A node packs its rows alone, the simulation packs a round's clients
    # together (node.packing): bit-equality needs unpacked rows.
    out["train.pack"] = False
  return {**out, **extra}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(flwr_home):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
  env["FLWR_HOME"] = flwr_home
  return env


# ca: the CA certificate (SuperNodes and `flwr` verify the SuperLink with it);
# cert, key: the SuperLink's certificate and key; node_keys: private key paths
# (OpenSSH ECDSA; `<path>.pub` beside each).
Pki = collections.namedtuple("Pki", ["ca", "cert", "key", "node_keys"])


def pki_tools_missing():
  """The first of openssl / ssh-keygen that is not installed, or None."""
  return next((t for t in ("openssl", "ssh-keygen") if shutil.which(t) is None),
              None)


def write_pki(out, num_node_keys):
  """A CA, a server certificate for localhost/127.0.0.1 and node key pairs.

  With docs/DEPLOY.md's commands (openssl, ssh-keygen), all offline; skips
  when either tool is missing.
  """
  missing = pki_tools_missing()
  if missing:
    pytest.skip(f"{missing} is not installed")
  os.makedirs(out, exist_ok=True)
  path = lambda name: os.path.join(out, name)

  def sh(*cmd):
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"

  # RSA 2048 rather than DEPLOY.md's 4096: the same commands, a faster test.
  sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2",
     "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA")
  sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
     "-out", "server.csr", "-subj", "/CN=localhost")
  with open(path("san.ext"), "w") as f:
    f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
  sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey",
     "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-sha256",
     "-extfile", "san.ext")
  keys = []
  for i in range(num_node_keys):
    sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", f"node{i}.key")
    keys.append(path(f"node{i}.key"))
  return Pki(path("ca.crt"), path("server.pem"), path("server.key"), keys)


class Deployment:
  """A SuperLink and one SuperNode per node dir, each in its own session.

  With `tls` (a `Pki`): the SuperLink serves HTTPS with its certificate and
  admits only registered SuperNodes (`--enable-supernode-auth`); the first
  len(node_dirs) node keys are registered with `flwr supernode register`
  before the nodes start, as docs/DEPLOY.md says.
  """

  def __init__(self, root, node_dirs, cache_dir, tls=None):
    self.root, self.node_dirs, self.cache_dir = root, node_dirs, cache_dir
    self.tls = tls
    self.num_nodes = len(node_dirs)
    self.port = _free_port()
    home = os.path.join(root, "flwr_home")
    os.makedirs(home, exist_ok=True)
    security = (f'root-certificates = "{tls.ca}"\n' if tls else "insecure = true\n")
    with open(os.path.join(home, "config.toml"), "w") as f:
      f.write(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
              f'address = "127.0.0.1:{self.port}"\n{security}')
    self.env = _env(home)
    security = ["--insecure"] if tls is None else [
        "--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert,
        "--ssl-keyfile", tls.key, "--enable-supernode-auth"]
    self.link = self._spawn(["flower-superlink", *security,
                             "--disable-runtime-dependency-installation",
                             "--port", str(self.port)], "superlink")
    self._wait_port(self.port)
    if tls is not None:
      for i in range(self.num_nodes):
        self.flwr("supernode", "register", tls.node_keys[i] + ".pub")
    self.nodes = {i: self.start_node(i) for i in range(len(node_dirs))}

  def flwr(self, *args):
    """`flwr ARGS test` (the Control API); its stdout, or an error with its output."""
    out = subprocess.run(["flwr", *args, "test"], capture_output=True, text=True,
                         env=self.env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout

  def _spawn(self, cmd, name):
    log = open(os.path.join(self.root, f"{name}.log"), "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=self.env, cwd=REPO, start_new_session=True)

  def _wait_port(self, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          return
      time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")

  def start_node(self, i, key=None, name=None):
    """SuperNode i (data dir i); with TLS, signed with node key `key` (default
    i; False: no key)."""
    cfg = (f'data-dir="{self.node_dirs[i]}" client-id={i} '
           f'cache-dir="{self.cache_dir}"')
    security = ["--insecure"] if self.tls is None else [
        "--root-certificates", self.tls.ca]
    if self.tls is not None and key is not False:
      security += ["--auth-supernode-private-key",
                   self.tls.node_keys[i if key is None else key]]
    return self._spawn(["flower-supernode", *security, "--superlink",
                        f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                        "--node-config", cfg], name or f"node{i}")

  def stop(self, proc, sig=signal.SIGTERM, timeout=30):
    if proc.poll() is None:
      os.killpg(proc.pid, sig)
      try:
        proc.wait(timeout)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)

  def run(self, workdir, overrides, background=False, **run_config):
    items = {"workdir": workdir, "num-nodes": self.num_nodes,
             "connect-timeout": 90.0,
             "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
             **run_config}
    conf = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                    for k, v in items.items())
    cmd = ["flwr", "run", APP, "test", "--stream", "-c", conf]
    if background:
      return self._spawn(cmd, f"run-{os.path.basename(workdir)}")
    return subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                          cwd=REPO, timeout=RUN_TIMEOUT)

  def descendants(self, proc, name):
    try:
      kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
      return []
    out = []
    for k in kids:
      try:
        if any(name in part for part in k.cmdline()):
          out.append(k)
      except psutil.Error:
        pass
    return out

  def close(self):
    procs = list(self.nodes.values()) + [self.link]
    # SuperExecs start their own sessions: collect every descendant first.
    kids = []
    for p in procs:
      try:
        kids += psutil.Process(p.pid).children(recursive=True)
      except psutil.NoSuchProcess:
        pass
    for p in procs:
      self.stop(p)
    for k in kids:
      try:
        k.kill()
      except psutil.NoSuchProcess:
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_path):
  del smollm2_path  # The tiny model uses SmolLM2's tokenizer; skips when absent.
  root = str(tmp_path_factory.mktemp("flower"))
  model = testing.write_tiny_chat_model(os.path.join(root, "tiny"))
  config = testing.load_config(CONFIG, "smoke", **_overrides(model))
  made = rehearsal.write_node_dirs(config, os.path.join(root, "nodes"))
  # HTTPS with node authentication (test_tls_and_supernode_auth checks the
  # refusals): one key more than nodes, never registered, for an intruder.
  pki = None if pki_tools_missing() else write_pki(os.path.join(root, "pki"),
                                                   NUM_NODES + 1)
  dep = Deployment(root, made["nodes"], os.path.join(root, "jax_cache"), tls=pki)
  # The simulations run beside the first Flower runs (those wait on polls).
  sims = {name: _start_simulation(root, model, name, **extra) for name, extra in
          (("fedavg", {}), ("fedadam", {"federated.algorithm": "fedadam"}))}
  try:
    yield {"root": root, "model": model, "eval": made["eval_file"], "dep": dep,
           "sims": sims}
  finally:
    for proc, _ in sims.values():
      if proc.poll() is None:
        proc.kill()
    dep.close()


def _start_simulation(root, model, name, **extra):
  """The in-process simulation (the fedit job, main command) with the same config."""
  workdir = os.path.join(root, f"sim-{name}")
  flags = [f"--config.{k}={v}" for k, v in _overrides(model, **extra).items()]
  log = open(os.path.join(root, f"sim-{name}.log"), "wb")
  proc = subprocess.Popen(
      [sys.executable, "-m", "fedjax_u2s.main", f"--config={CONFIG}:smoke",
       f"--workdir={workdir}", *flags], stdout=log, stderr=subprocess.STDOUT,
      cwd=REPO, env=_env(os.path.join(root, "flwr_home")))
  return proc, workdir


def _simulation(setup, name):
  proc, workdir = setup["sims"][name]
  assert proc.wait(RUN_TIMEOUT) == 0, open(workdir + ".log").read()[-3000:]
  return workdir


def _adapter(workdir):
  return safetensors.numpy.load_file(
      os.path.join(workdir, "adapter", "adapter_model.safetensors"))


def _assert_same_adapter(a, b):
  a, b = _adapter(a), _adapter(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_fedavg_equals_simulation_bytes_and_no_text_on_the_wire(setup):
  dep, root = setup["dep"], setup["root"]
  work = os.path.join(root, "fl-fedavg")
  audit = os.path.join(root, "audit")
  result = dep.run(work, _overrides(setup["model"]), **{
      "eval-file": setup["eval"], "audit-dir": audit})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  sim = _simulation(setup, "fedavg")
  _assert_same_adapter(work, sim)

  rows, sim_rows = _rows(work), _rows(sim)
  assert [r["round"] for r in rows] == [r["round"] for r in sim_rows]
  for r, s in zip(rows[1:], sim_rows[1:]):
    assert r["clients"] == s["clients"] and r["answered"] == s["clients"]
    assert r["dropped"] == []
    # Bytes: the simulation's accounting, n_sampled * adapter bytes each way.
    assert r["bytes_down"] == s["bytes_down"] and r["bytes_up"] == s["bytes_up"]
    assert r["wire_bytes_up"] >= r["bytes_up"]
    assert r["train_loss"] == s["train_loss"]
    assert r["eval_loss"] == s["eval_loss"]
  assert rows[0]["eval_loss"] == sim_rows[0]["eval_loss"]

  # What the server received: adapter-shaped float32 deltas and numbers only.
  names = {f"{t}.{m}" for t in ("q", "k", "v", "o") for m in ("a", "b")}
  manifests = sorted(glob.glob(os.path.join(audit, "round*.json")))
  assert len(manifests) == sum(len(r["answered"]) for r in rows[1:])
  for path in manifests:
    m = json.load(open(path))
    assert set(m) == {"delta", "metrics"}
    assert all(a["dtype"] == "float32" for a in m["delta"]["arrays"].values())
    assert set(m["delta"]["arrays"]) == names
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in m["metrics"]["values"].values())
  for path in glob.glob(os.path.join(audit, "describe-*.json")):
    m = json.load(open(path))
    assert m == {"node": {"kind": "config", "values": {
        "client-id": m["node"]["values"]["client-id"]}}}
  blob = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(audit, "*.bin")))
  for node_dir in glob.glob(os.path.join(root, "nodes", "node*")):
    for line in open(os.path.join(node_dir, "instructions.jsonl")):
      for msg in json.loads(line)["messages"]:
        words = msg["content"][:40].encode("utf-8")
        assert words not in blob


def test_fedadam_serverapp_killed_and_restarted_equals_simulation(setup):
  dep, root = setup["dep"], setup["root"]
  work = os.path.join(root, "fl-fedadam")
  overrides = _overrides(setup["model"], **{"federated.algorithm": "fedadam"})
  run = dep.run(work, overrides, background=True)
  first = os.path.join(work, "checkpoints", "1")
  deadline = time.monotonic() + RUN_TIMEOUT
  while not os.path.isdir(first) and time.monotonic() < deadline:
    assert run.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.2)
  servers = dep.descendants(dep.link, "flwr-serverapp")
  assert servers
  max(servers, key=lambda p: p.create_time()).kill()  # This run's; no cleanup.
  dep.stop(run)
  assert not os.path.exists(os.path.join(work, "adapter"))

  result = dep.run(work, overrides)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "resuming from the checkpoint of round 1" in result.stdout
  rows = _rows(work)
  assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
  _assert_same_adapter(work, _simulation(setup, "fedadam"))


def test_supernode_stopped_mid_round(setup):
  dep, root = setup["dep"], setup["root"]
  work = os.path.join(root, "fl-dropout")
  victim = 1  # sample_clients(0, r, 3, 2) picks clients [1, 2] in rounds 1 and 2.
  log = os.path.join(root, f"node{victim}.log")
  seen = open(log).read().count("Receiving: train message")
  run = dep.run(work, _overrides(setup["model"]), background=True,
                **{"min-replies": 1})
  node = dep.nodes[victim]
  deadline = time.monotonic() + RUN_TIMEOUT
  # This run's first train message reached the node (earlier runs' are
  # counted out).
  while open(log).read().count("Receiving: train message") <= seen:
    assert time.monotonic() < deadline and run.poll() is None
    time.sleep(0.1)
  time.sleep(1.0)
  dep.stop(node)  # Mid-round: its ClientApp is starting or training.
  assert run.wait(RUN_TIMEOUT) == 0
  rows = _rows(work)
  assert [r["round"] for r in rows] == [1, 2]
  for r in rows:
    assert r["clients"] == [1, 2] and r["answered"] == [2]
    assert [d["client"] for d in r["dropped"]] == [victim]
  assert "left the federation" in rows[0]["dropped"][0]["reason"] or (
      "error" in rows[0]["dropped"][0]["reason"])
  assert rows[1]["dropped"][0]["reason"] == "no node online"
  summary = json.load(open(os.path.join(work, "flower_run.json")))
  assert summary["rounds"] == ROUNDS and len(summary["dropped"]) == 2
  # Every checkpoint reads back whole.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(work, "checkpoints"))
  assert ckpt.all_rounds() == [1, 2]
  for r in ckpt.all_rounds():
    out = ckpt._manager.restore(r, args=ocp.args.Composite(  # pylint: disable=protected-access
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    assert out["meta"]["round"] == r
  ckpt.close()
  assert not os.path.exists(os.path.join(work, "checkpoints_corrupt"))
  assert os.path.exists(os.path.join(work, "adapter", "adapter_model.safetensors"))
  dep.nodes[victim] = dep.start_node(victim)  # Leave the federation whole.


def test_run_config_is_checked():
  with pytest.raises(ValueError, match="min-replies"):
    server_lib.settings_from_run_config({
        "config": "configs/fedit_instructions.py:smoke", "overrides": "",
        "workdir": "/tmp/x", "num-nodes": 3, "min-replies": 5,
        "round-timeout": 10.0, "connect-timeout": 10.0, "eval-file": "",
        "audit-dir": ""})
  assert server_lib.parse_overrides("a.b=3 c=fedadam d=(1,2) e=True") == {
      "a.b": 3, "c": "fedadam", "d": (1, 2), "e": True}


@pytest.mark.parametrize("overrides", [
    {"algorithm": "fedavg"},
    {"algorithm": "fedadam"},
    {"algorithm": "fedprox", "prox_mu": 0.5},
    {"algorithm": "scaffold", "client_optimizer": "sgd"},
    {"algorithm": "fedavgm", "dp": {"enabled": True, "clip_norm": 0.05,
                                    "noise_multiplier": 0.7, "delta": 1e-5}},
], ids=lambda o: o["algorithm"] + ("-dp" if "dp" in o else ""))
def test_node_and_server_steps_equal_the_simulated_round(overrides):
  """Without processes: the node's program and the server's step, composed,
  are the simulation's round bit for bit (every server optimizer, FedProx,
  SCAFFOLD's controls, DP's clip and noise), over two rounds."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated import algorithms  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated.config import AlgorithmConfig  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  cfg = testing.federated_config(**{"clients_per_round": 2, "client_lr": 0.1,
                                    "warmup_rounds": 0, **overrides})
  fed = AlgorithmConfig.from_config(cfg)
  algo = algorithms.build(fed, testing.squares_loss)
  batches = testing.hand_round_batches()
  sim = algo.init({"w": jnp.array([0.3], jnp.float32)}, jax.random.key(7), 4)
  fl = jax.tree.map(jnp.array, sim)
  program = node_lib.client_program(fed, testing.squares_loss)
  apply = jax.jit(algo.apply)
  for _ in range(2):
    sim, _ = apply(sim, None, batches)
    r = int(fl.round)
    deltas, controls = [], []
    for i, cid in enumerate(np.asarray(batches.client_ids)):
      cc = (jax.tree.map(lambda x: x[cid][None], fl.client_controls)
            if fed.spec.scaffold else jax.tree.map(lambda x: x[None] * 0, fl.params))
      out = program(fl.params, None, jax.tree.map(lambda x: x[i][None], batches.batch),
                    batches.step_mask[i][None], server_lib.client_key_data(fl, r, cid),
                    jnp.asarray(r, jnp.int32), fl.control, cc)
      deltas.append(jax.tree.map(lambda x: np.asarray(x)[0], out.delta))
      controls.append(jax.tree.map(lambda x: np.asarray(x)[0], out.control_delta)
                      if fed.spec.scaffold else None)
    stack = lambda ts: jax.tree.map(lambda *x: np.stack(x), *ts)
    fl, _, _, bad = server_lib.aggregate_and_step(
        fl, stack(deltas), np.asarray(batches.num_examples, np.float32),
        np.asarray(batches.client_ids, np.int32), np.zeros(2, bool),
        stack(controls) if fed.spec.scaffold else None, fed=fed)
    assert not bool(bad)
    for a, b in zip(jax.tree.leaves(sim), jax.tree.leaves(fl)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_node_data_dir_and_wire_records_are_checked(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import wire  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="data-dir"):
    node_lib.data_file("")
  with pytest.raises(ValueError, match="found none"):
    node_lib.data_file(str(tmp_path))
  (tmp_path / "instructions.jsonl").write_text("{}\n")
  (tmp_path / "instructions.csv").write_text("a\n")
  with pytest.raises(ValueError, match="exactly one"):
    node_lib.data_file(str(tmp_path))
  with pytest.raises(ValueError, match="client-id"):
    node_lib.client_id({"client-id": -2})
  # A node can only send the adapter's own float arrays.
  like = {"q": {"a": jax.ShapeDtypeStruct((2, 3), np.float32),
                "b": jax.ShapeDtypeStruct((3, 2), np.float32)}}
  tree = {"q": {"a": np.ones((2, 3), np.float32), "b": np.zeros((3, 2), np.float32)}}
  back = wire.from_record(wire.to_record(tree), like, "delta")
  np.testing.assert_array_equal(back["q"]["a"], tree["q"]["a"])
  assert wire.array_bytes(__import__("flwr.app", fromlist=["RecordDict"]).RecordDict(
      {"d": wire.to_record(tree)})) == wire.tree_bytes(tree) == 48
  tokens = {"q": {"a": np.ones((2, 3), np.int32), "b": tree["q"]["b"]}}
  with pytest.raises(ValueError, match="int32"):
    wire.from_record(wire.to_record(tokens), like, "delta")
  with pytest.raises(ValueError, match="unexpected"):
    wire.from_record(wire.to_record({**tree, "text": np.zeros(1, np.float32)}),
                     like, "delta")


# ----------------------------------------------------------------------------
# U2S generation on the nodes.

# What the scripted model writes after the prefilled "Instruction:": a pair
# the parser and the (relaxed) filters accept. Every token occurs once, so a
# model that maps each token to the next one writes it (" :" is not the
# prompt's last token ":").
SCRIPT = (" Describe the main topic of this passage.\nResponse : It covers one "
          "medical subject briefly!")


def _write_scripted_chat_model(path, script=SCRIPT, seed=0):
  """A tiny Llama with SmolLM2's tokenizer that writes ``script`` and stops.

  A random tiny model writes no parseable pair, and real SmolLM2 takes
  minutes: this one's embeddings and lm_head form a bigram table (every
  token of ``script`` leads to the next, the last to EOS, any other token
  to the first, with logit margin 30), while its layers keep their small
  random weights, so the LoRA adapter on them trains to non-zero deltas.
  The real generation path (prompting, retrieval, sampler, parser,
  filters, writer) runs unchanged.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_u2s import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models import hf_loader  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models import llama  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models import registry  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.from_gguf(registry.resolve("smollm2-135m-instruct"))
  ids = tok.encode(script) + [tok.eos_ids[0]]
  assert len(set(ids)) == len(ids), [tok.decode([i]) for i in ids]
  config = testing.tiny_llama_config(vocab_size=tok.vocab_size,
                                     max_position_embeddings=2048,
                                     name="scripted-chat")
  d = config.hidden_size
  assert len(ids) < d
  params = llama.init_params(jax.random.key(seed), config)
  embed = np.zeros((tok.vocab_size, d), np.float32)
  embed[:, d - 1] = 1.0  # Any token: the "start" direction.
  lm_head = np.zeros((d, tok.vocab_size), np.float32)
  margin = 30.0 / np.sqrt(d)  # The final RMSNorm scales a one-hot by sqrt(d).
  lm_head[d - 1, ids[0]] = margin
  for i, (a, b) in enumerate(zip(ids[:-1], ids[1:])):
    embed[a] = 0.0
    embed[a, i] = 1.0
    lm_head[i, b] = margin
  params = dict(params, embed=jnp.asarray(embed), lm_head=jnp.asarray(lm_head),
                final_norm=jnp.ones((d,), jnp.float32))
  hf_loader.save_hf_dir(path, config, params)
  tok.save(path)
  return path


def _u2s_overrides(model):
  """configs/u2s_wiki.py:smoke on 2 clients of 1 piece each, the scripted
  model, filters that take its pair (it is about no piece), unpacked rows."""
  return {"model.name": model, "corpus.topics": "('medicine','math')",
          "corpus.num_clients": 0, "chunking.max_pieces_per_client": 1,
          "u2s.max_new_tokens": 24, "u2s.batch_size": 1,
          "u2s.filters.min_grounding": -1.0,
          "u2s.filters.max_unsupported_facts": -1, "u2s.filters.min_support": 0.0,
          "federated.num_rounds": ROUNDS, "federated.clients_per_round": 2,
          "train.pack": False, "train.tensorboard": False}


_U2S_SIMULATION = """
import sys
from fedjax_u2s import config_blocks
from fedjax_u2s.flower import server
from fedjax_u2s.pipelines import common, u2s
config = config_blocks.load(sys.argv[1], "smoke", **server.parse_overrides(sys.argv[2]))
model = common.load_model(config)
gen = u2s.generate(config, sys.argv[3], model)
train_sets, heldout = u2s.client_examples(config, sys.argv[3], gen["corpus"])
common.tune_and_export(config, sys.argv[3], model, train_sets, heldout)
"""


def test_u2s_nodes_generate_their_own_pairs(tmp_path, smollm2_path):
  """Each node turns its own text into pairs in its own dir; the run ends with
  the in-process u2s job's pairs and adapter (generation and training stages
  of pipelines/u2s.py, evaluation left out); no text or pair on the wire."""
  del smollm2_path
  from fedjax_u2s.data import wiki  # pylint: disable=g-import-not-at-top
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  root = str(tmp_path)
  model = _write_scripted_chat_model(os.path.join(root, "scripted"))
  overrides = _u2s_overrides(model)
  text = " ".join(f"{k}={v}" for k, v in overrides.items())
  sim = os.path.join(root, "sim")
  sim_log = open(os.path.join(root, "sim.log"), "wb")
  sim_proc = subprocess.Popen(
      [sys.executable, "-c", _U2S_SIMULATION, U2S_CONFIG, text, sim],
      stdout=sim_log, stderr=subprocess.STDOUT, cwd=REPO,
      env=_env(os.path.join(root, "flwr_home")))
  config = testing.load_config(U2S_CONFIG, "smoke",
                               **server_lib.parse_overrides(text))
  made = rehearsal.write_node_dirs(config, os.path.join(root, "nodes"))
  assert made["eval_file"] == "" and len(made["nodes"]) == 2
  dep = Deployment(root, made["nodes"], os.path.join(root, "jax_cache"))
  try:
    work = os.path.join(root, "fl")
    audit = os.path.join(root, "audit")
    result = dep.run(work, overrides, config=f"{U2S_CONFIG}:smoke",
                     **{"num-nodes": 2, "audit-dir": audit})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  finally:
    dep.close()
  assert sim_proc.wait(RUN_TIMEOUT) == 0, open(os.path.join(root, "sim.log")).read()[-3000:]

  # Each node generated its own pairs, in its own dir: the simulation's.
  keys = ("instruction", "response", "demo_ids", "batch_seed", "row_seed",
          "generator", "start", "end")
  for i, node_dir in enumerate(made["nodes"]):
    gen = os.path.join(node_dir, "generated")
    node = json.load(open(os.path.join(gen, "node.json")))
    assert node["done"] and node["kept"] == 1 and node["fingerprint"]["client_id"] == i
    mine = [json.loads(l) for l in open(os.path.join(gen, f"client_{i:04d}.jsonl"))]
    theirs = [json.loads(l) for l in open(
        os.path.join(sim, "generated", f"client_{i:04d}.jsonl"))]
    assert [{k: r[k] for k in keys} for r in mine] == [
        {k: r[k] for k in keys} for r in theirs]
    assert mine[0]["instruction"] == "Describe the main topic of this passage."
    assert json.load(open(os.path.join(gen, "stats.json")))["totals"]["kept"] == 1
  _assert_same_adapter(work, sim)
  assert any(np.abs(v).max() > 0 for v in _adapter(work).values())
  rows, sim_rows = _rows(work), _rows(sim)
  for r, s in zip(rows, sim_rows):
    assert r["answered"] == [0, 1] and r["train_loss"] == s["train_loss"]

  # The replies: the delta and numbers only; no text, no pair.
  manifests = sorted(glob.glob(os.path.join(audit, "round*.json")))
  assert len(manifests) == 2 * ROUNDS
  for path in manifests:
    m = json.load(open(path))
    assert set(m) == {"delta", "metrics"}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in m["metrics"]["values"].values())
  first = [json.load(open(os.path.join(audit, f"round1-client{i}.json")))
           for i in range(2)]
  assert [m["metrics"]["values"]["u2s-kept"] for m in first] == [1, 1]
  blob = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(audit, "*.bin")))
  for node_dir in made["nodes"]:
    for path in glob.glob(os.path.join(node_dir, "text", "*.txt")):
      assert open(path, "rb").read()[:40] not in blob
    for line in open(glob.glob(os.path.join(node_dir, "generated", "client_*.jsonl"))[0]):
      pair = json.loads(line)
      for field in ("instruction", "response"):
        assert pair[field][:20].encode("utf-8") not in blob


def test_u2s_node_refuses_pairs_made_otherwise(tmp_path):
  """A node's generated/ made with other settings is not mixed into a run."""
  from fedjax_u2s.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node_u2s  # pylint: disable=g-import-not-at-top
  config = testing.load_config(U2S_CONFIG, "smoke")
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_text("Some text.")
  assert node_lib.holds_text(str(tmp_path))
  gen = tmp_path / "generated"
  gen.mkdir()
  old = node_u2s.generation_fingerprint(config, 0, "text", {})
  (gen / "node.json").write_text(json.dumps({"fingerprint": old, "done": True,
                                             "pieces": 1}))
  other = testing.load_config(U2S_CONFIG, "smoke", **{"seed": 1})
  with pytest.raises(ValueError, match=r"differing: \['config.seed'\]"):
    node_u2s.ensure_pairs(other, str(tmp_path), 0, {})
  with pytest.raises(ValueError, match=r"differing: \['client_id'\]"):
    node_u2s.ensure_pairs(config, str(tmp_path), 1, {})
  (tmp_path / "instructions.jsonl").write_text("{}\n")
  with pytest.raises(ValueError, match="both an instruction file and raw text"):
    node_lib.holds_text(str(tmp_path))
  (tmp_path / "instructions.jsonl").unlink()
  (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match="more than one text source"):
    node_u2s.text_source(str(tmp_path))
  fedit = testing.load_config(CONFIG, "smoke")
  (tmp_path / "corpus.jsonl").unlink()
  with pytest.raises(ValueError, match="has no U2S settings"):
    node_u2s.ensure_pairs(fedit, str(tmp_path), 0, {})


@pytest.mark.slow  # MiniLM and three generations in-process: about a minute.
def test_u2s_node_generation_resumes_after_a_crash(tmp_path, smollm2_path,
                                                   monkeypatch):
  """A node that dies mid-generation resumes from its own files at its next
  message (its pieces read back, not re-chunked) and ends with the files of
  an uninterrupted run."""
  del smollm2_path
  from fedjax_u2s.data import wiki  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.flower import node_u2s  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.u2s import writer  # pylint: disable=g-import-not-at-top
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model = _write_scripted_chat_model(str(tmp_path / "scripted"))
  overrides = _u2s_overrides(model)
  overrides.update({"corpus.topics": "('medicine',)",
                    "chunking.max_pieces_per_client": 2})
  config = testing.load_config(U2S_CONFIG, "smoke", **server_lib.parse_overrides(
      " ".join(f"{k}={v}" for k, v in overrides.items())))
  dirs = {}
  for name in ("clean", "crash"):
    dirs[name] = rehearsal.write_node_dirs(config, str(tmp_path / name))["nodes"][0]
  clean = node_u2s.ensure_pairs(config, dirs["clean"], 0, {})
  assert (clean.kept, clean.rejected, clean.pieces) == (1, 1, 2)

  real = writer._append_lines  # pylint: disable=protected-access

  def flaky(path, records):
    if path.endswith(".rejected.jsonl") and records:  # Batch 1: the duplicate.
      raise OSError("node killed")
    real(path, records)

  monkeypatch.setattr(writer, "_append_lines", flaky)
  with pytest.raises(OSError, match="node killed"):
    node_u2s.ensure_pairs(config, dirs["crash"], 0, {})
  monkeypatch.setattr(writer, "_append_lines", real)
  gen = os.path.join(dirs["crash"], "generated")
  assert not json.load(open(os.path.join(gen, "node.json")))["done"]
  # Text added after the crash is not chunked into the interrupted run.
  with open(os.path.join(dirs["crash"], "text", "0000_Added.txt"), "w") as f:
    f.write("A new document the node received later. " * 20)
  again = node_u2s.ensure_pairs(config, dirs["crash"], 0, {})
  assert (again.kept, again.rejected, again.pieces) == (1, 1, 2)
  for name in ("client_0000.jsonl", "client_0000.rejected.jsonl", "stats.json"):
    assert open(os.path.join(gen, name)).read() == open(
        os.path.join(dirs["clean"], "generated", name)).read(), name
  pieces = lambda d: [(r["piece_id"], r["text"]) for r in writer.read_records(
      os.path.join(d, "generated", "pieces.jsonl"))]  # meta.path is the dir's.
  assert pieces(dirs["crash"]) == pieces(dirs["clean"])
  assert not any("Added" in piece_id for piece_id, _ in pieces(dirs["crash"]))
  # Done: read back without generating.
  assert node_u2s.ensure_pairs(config, dirs["crash"], 0, {}).seconds == 0.0


def _listed_nodes(dep):
  """`flwr supernode list --format json`: {node id: status}."""
  out = dep.flwr("supernode", "list", "--format", "json")
  return {n["node-id"]: n["status"] for n in json.loads(out[out.index("{"):])["nodes"]}


def test_tls_and_supernode_auth(setup):
  """docs/DEPLOY.md's multi-machine setup on loopback: HTTPS with our own CA,
  SuperNode authentication with registered ECDSA keys. The shared federation
  is that setup: its registered nodes trained every run above (the FedAvg
  and FedAdam ones to the simulation's adapter) and are listed, nothing
  else; a node trusting the CA but with a key never registered is refused,
  and so is one without a key, and neither is ever listed."""
  dep, root = setup["dep"], setup["root"]
  if dep.tls is None:
    pytest.skip(f"{pki_tools_missing()} is not installed: the federation runs "
                "without TLS")
  work = os.path.join(root, "fl-fedavg")
  if not os.path.exists(os.path.join(work, "flower_run.json")):  # Run alone (-k).
    work = os.path.join(root, "fl-tls")
    result = dep.run(work, _overrides(setup["model"], **{"federated.num_rounds": 1}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  last = _rows(work)[-1]
  assert last["answered"] == last["clients"] and last["dropped"] == []
  deadline = time.monotonic() + 90  # A node restarted just before rejoins.
  while True:
    registered = _listed_nodes(dep)
    online = sum(s == "online" for s in registered.values())
    if online == NUM_NODES or time.monotonic() > deadline:
      break
    time.sleep(1.0)
  assert online == NUM_NODES, registered
  # The intruder: a valid TLS client (it trusts the CA) with an unregistered
  # key. The SuperLink refuses to activate it and it exits.
  intruder = dep.start_node(0, key=NUM_NODES, name="intruder")
  assert intruder.wait(120) != 0
  log = open(os.path.join(root, "intruder.log")).read()
  assert "Failed to activate SuperNode" in log, log[-2000:]
  link_log = open(os.path.join(root, "superlink.log")).read()
  assert "No SuperNode found with the given public key" in link_log
  dep.stop(intruder)  # Its SuperExec, if any is left.
  keyless = dep.start_node(1, key=False, name="keyless")
  assert keyless.wait(120) != 0
  log = open(os.path.join(root, "keyless.log")).read()
  assert "All SuperNodes must be registered via the CLI" in log, log[-2000:]
  dep.stop(keyless)
  # Only the registered nodes ever joined: the intruder was never added.
  assert _listed_nodes(dep) == registered
