"""Memory planner: what one federated round needs on each device, before
anything is allocated.

::

    python -m fedjax_u2s.plan --config=configs/plans/llama3_8b.py:v5e-8
    python -m fedjax_u2s.plan --config=configs/fedit_instructions.py \\
        --devices=8 --device_memory_gb=16 --model_parallel=2 --search

The round (``federated/parallel.py``'s jitted ``apply``, the one training
runs) is lowered and compiled ahead of time over ``jax.ShapeDtypeStruct``
inputs from ``jax.eval_shape`` (base, server state, client batches, each with
its mesh sharding): no weight is allocated. Per device it reports

* the base shard (the base split over ``mesh.model_parallel`` devices),
* the server state (global adapter, server optimizer; replicated),
* the round's client batches (split over the clients axis),
* the clients of one step: adapter, gradient, delta and client optimizer
  state of the ``clients_per_chunk`` clients a device trains at once (these
  live inside the compiled step, so they are part of the next line too),
* activations and temporaries: ``memory_analysis().temp_size_in_bytes`` of
  the compiled step,

and the peak, ``arguments + outputs - aliased + temporaries``, against the
device memory. ``--search`` finds the largest ``clients_per_chunk`` (clients
per device group per step) that fits.

Where it compiles: on this machine's backend. To plan for N devices that are
not here, the CPU backend emulates them
(``--xla_force_host_platform_device_count``, set by ``main`` before JAX
starts). The CPU compiler's buffer assignment is not the TPU's or the GPU's
(different fusions, no tile padding of small minor dimensions such as a LoRA
rank), so the temporaries are an estimate of the accelerator's, not its
measurement; the parts computed from shapes are exact. docs/benchmarks.md
says how far the two went apart where we could compare.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Any

PyTree = Any

GB = 1e9  # Memories in decimal GB: a device's "16 GB" of HBM is >= 16e9 bytes.

# Hardware of the presets (configs/plans/): devices, GB per device, and the
# model axis the presets use there (the most that splits a model's heads
# evenly, bounded by the devices).
HARDWARE = {
    "v5e-8": dict(devices=8, device_memory_gb=16.0, model_parallel=8,
                  kind="TPU v5e-8 (8 x 16 GB HBM)"),
    "v4-8": dict(devices=4, device_memory_gb=32.0, model_parallel=4,
                 kind="TPU v4-8 (4 x 32 GB HBM)"),
    "gpu80": dict(devices=1, device_memory_gb=80.0, model_parallel=1,
                  kind="one 80 GB GPU"),
}


def preset_config(hf_config: dict, hardware: str, *, max_model_parallel: int = 8):
  """An experiment config for planning a 7-8B model on ``hardware``.

  bfloat16 weights and compute, layers rematerialised, logits in chunks
  (the settings such a model trains with); rank-16 LoRA on q, k, v, o; 4
  local steps of 4 examples of 512 tokens, packed; 32 clients a round.
  ``plan.hf_config`` holds the shapes; ``model.name`` must be set to real
  weights to train.
  """
  from fedjax_u2s import config_blocks  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  if hardware not in HARDWARE:
    raise ValueError(f"Unknown hardware {hardware!r}; choose from {sorted(HARDWARE)}.")
  hw = HARDWARE[hardware]
  c = config_blocks.base_config()
  c.model.name = hf_config.get("_name_or_path", "")
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.train.max_length = 512
  c.train.batch_size = 4
  c.train.local_steps = 4
  c.train.logits_chunk_size = 128
  c.federated.clients_per_round = 32
  c.mesh.num_devices = hw["devices"]
  c.mesh.model_parallel = min(hw["model_parallel"], max_model_parallel)
  c.plan = ml_collections.ConfigDict()
  c.plan.hf_config = dict(hf_config)   # Shapes: the public config.json's numbers.
  c.plan.hardware = hw["kind"]         # For the printout.
  c.plan.devices = hw["devices"]       # Devices to plan for (emulated on the CPU).
  c.plan.device_memory_gb = hw["device_memory_gb"]  # Per device.
  return c


def _tree_bytes(tree: PyTree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _shard_bytes(structs: PyTree, shardings: PyTree) -> int:
  """Bytes one device holds of ``structs`` laid out by ``shardings``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for x, s in zip(jax.tree.leaves(structs), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(x.shape))
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device of one round (see the module docstring).

  Attributes:
    devices, model_parallel, clients_per_chunk: the mesh and the step.
    clients_per_step: clients trained at once over the mesh
      (``clients_per_chunk`` x clients-axis devices).
    base_shard, server_state, client_batches: arguments, from shapes.
    step_clients: adapters, gradients, deltas and client optimizer states
      of the clients of one step on a device (inside ``temporaries``).
    arguments, outputs, aliased, temporaries, code: ``memory_analysis()``.
    device_memory: bytes of one device.
  """
  devices: int
  model_parallel: int
  clients_per_chunk: int
  clients_per_step: int
  base_shard: int
  server_state: int
  client_batches: int
  step_clients: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  device_memory: int
  cpu_upcast: int = 0
  backend: str = ""

  @property
  def compiled_peak(self) -> int:
    """Arguments, outputs not written over donated inputs, temporaries, code,
    as compiled here."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def peak(self) -> int:
    """:attr:`compiled_peak` less the float32 copies of bfloat16 weights that
    only the CPU compiler makes (:attr:`cpu_upcast`; 0 elsewhere)."""
    return self.compiled_peak - self.cpu_upcast

  @property
  def fits(self) -> bool:
    return self.peak <= self.device_memory

  def table(self) -> str:
    """A markdown table of the parts, in GB per device."""
    g = lambda b: f"{b / GB:.3f}"
    rows = [
        ("base shard", self.base_shard),
        ("server state (adapter, server optimizer; replicated)", self.server_state),
        ("client batches of the round", self.client_batches),
        (f"clients of one step ({self.clients_per_chunk} per device): adapters, "
         "gradients, deltas, optimizer states [in temporaries]", self.step_clients),
        ("arguments (compiled)", self.arguments),
        ("outputs not aliased to donated inputs", self.outputs - self.aliased),
        ("activations and temporaries (compiled)", self.temporaries),
    ]
    if self.cpu_upcast:
      rows += [("peak as compiled on the CPU", self.compiled_peak),
               ("of which f32 copies of bf16 weights (CPU only: TPU and GPU "
                "multiply bf16)", self.cpu_upcast)]
    rows += [("peak", self.peak), ("device memory", self.device_memory)]
    head = (f"devices {self.devices} = {self.devices // self.model_parallel} clients "
            f"x {self.model_parallel} model; {self.clients_per_step} clients per step; "
            f"{'FITS' if self.fits else 'DOES NOT FIT'}\n\n")
    return head + "| per device | GB |\n|---|---:|\n" + "\n".join(
        f"| {name} | {g(b)} |" for name, b in rows)


def model_config_from(config) -> Any:
  """The model's shapes: ``config.plan.hf_config`` (a config.json dict),
  else the named model's own config (``registry``)."""
  from fedjax_u2s.models import registry  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  m = config.model
  kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.get("remat", False))
  plan_cfg = config.get("plan")
  hf = plan_cfg.get("hf_config") if plan_cfg else None
  hf = hf.to_dict() if hasattr(hf, "to_dict") else hf
  if hf:
    return ModelConfig.from_hf_config(hf, source="config.plan.hf_config", **kw)
  path = registry.resolve(m.name)
  if os.path.isdir(path):
    return ModelConfig.from_json_file(os.path.join(path, "config.json"), **kw)
  raise ValueError(
      f"config.model.name={m.name!r} is a GGUF file; the planner needs its shapes "
      "as config.plan.hf_config (the numbers of its config.json).")


def batch_structs(config, num_clients: int) -> PyTree:
  """``ClientBatches`` of ``num_clients`` as shape structs, the worst case of
  ``config.train`` (every step full; packed rows at ``pack_length``)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated.state import ClientBatches  # pylint: disable=g-import-not-at-top
  t = config.train
  steps = t.local_steps or t.max_local_steps or 1
  if t.pack:
    length = t.pack_length or t.batch_size * t.max_length
    rows = max(1, t.batch_size * t.max_length // length)
    keys = ("tokens", "input_mask", "loss_mask", "segment_ids", "positions")
  else:
    length, rows = t.max_length, t.batch_size
    keys = ("tokens", "input_mask", "loss_mask")
  shape = (num_clients, steps, t.grad_accum, rows, length)
  dtypes = dict(tokens=jnp.int32, input_mask=jnp.bool_, loss_mask=jnp.bool_,
                segment_ids=jnp.int32, positions=jnp.int32)
  s = jax.ShapeDtypeStruct
  return ClientBatches(
      batch={k: s(shape, dtypes[k]) for k in keys},
      step_mask=s((num_clients, steps), jnp.bool_),
      num_examples=s((num_clients,), jnp.float32),
      client_ids=s((num_clients,), jnp.int32))


def estimate(config, *, devices: int | None = None, device_memory_gb: float | None = None,
             model_parallel: int | None = None, clients_per_chunk: int | None = None,
             model_config: Any = None) -> Plan:
  """The :class:`Plan` of one round of ``config`` (nothing allocated).

  Args:
    config: an experiment config (``model``, ``lora``, ``federated``,
      ``train``, ``mesh``; ``plan`` for the shapes and the device memory).
    devices: mesh size (default ``config.mesh.num_devices``, else all).
    device_memory_gb: one device's memory (default ``config.plan``'s, else
      what the backend reports, else 16).
    model_parallel, clients_per_chunk: override the config's.
    model_config: the base's ``ModelConfig`` (default :func:`model_config_from`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_u2s import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s import train as train_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated import algorithms  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated import objectives  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated import parallel  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.federated.config import AlgorithmConfig  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models import llama  # pylint: disable=g-import-not-at-top

  plan_cfg = config.get("plan") or {}
  devices = devices or config.mesh.num_devices or jax.device_count()
  mp = model_parallel or config.mesh.get("model_parallel", 1)
  mesh = parallel.make_mesh(devices, model_parallel=mp)
  if device_memory_gb is None:
    device_memory_gb = plan_cfg.get("device_memory_gb") or _backend_memory_gb() or 16.0
  mc = model_config or model_config_from(config)
  fed = AlgorithmConfig.from_config(config.federated)
  if clients_per_chunk is not None:
    fed = dataclasses.replace(fed, clients_per_chunk=clients_per_chunk)
  chunk = max(fed.clients_per_chunk, 1)
  clients_axis = parallel.client_axis_size(mesh)
  lcfg = train_lib.lora_config_from(config.lora)
  loss_fn = functools.partial(objectives.causal_lm_loss, model_config=mc,
                              lora_config=lcfg,
                              logits_chunk_size=config.train.logits_chunk_size)
  base = llama.param_shapes(mc)
  base_sharding = parallel.base_sharding(base, mesh)
  alg = parallel.build(fed, loss_fn, mesh, base_sharding=base_sharding)
  key = jax.random.key(0)
  lora = jax.eval_shape(lambda: lora_lib.init(key, mc, lcfg))
  num_clients = max(fed.clients_per_round, 1)
  state = jax.eval_shape(lambda p: alg.init(p, key, num_clients), lora)
  rep = parallel.replicated_sharding(mesh)
  # The round's clients, padded as train.py pads them.
  c = -(-fed.clients_per_round // (chunk * clients_axis)) * chunk * clients_axis
  batches = batch_structs(config, c)
  with_sharding = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  state_in = with_sharding(state, jax.tree.map(lambda _: rep, state))
  base_in = with_sharding(base, base_sharding)
  cli = parallel.client_sharding(mesh)
  batches_in = with_sharding(batches, jax.tree.map(lambda _: cli, batches))
  compiled = alg.apply.lower(state_in, base_in, batches_in).compile()
  mem = compiled.memory_analysis()
  upcast = 0
  if jax.default_backend() == "cpu":
    upcast = cpu_weight_upcast(compiled.as_text(), base, base_sharding)
  optimizer, _ = algorithms.client_optimizer(fed, 0)
  per_client = 3 * _tree_bytes(lora) + _tree_bytes(jax.eval_shape(optimizer.init, lora))
  return Plan(
      devices=devices, model_parallel=mp, clients_per_chunk=chunk,
      clients_per_step=chunk * clients_axis,
      base_shard=_shard_bytes(base, base_sharding),
      server_state=_tree_bytes(state),
      client_batches=_shard_bytes(batches, jax.tree.map(lambda _: cli, batches)),
      step_clients=chunk * per_client,
      arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
      aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
      code=int(mem.generated_code_size_in_bytes),
      device_memory=int(device_memory_gb * GB), cpu_upcast=upcast,
      backend=jax.default_backend())


def cpu_weight_upcast(hlo: str, base: PyTree, base_sharding: PyTree) -> int:
  """Bytes of the float32 copies of bfloat16 base shards in a CPU program.

  XLA:CPU has no bfloat16 matmul: it converts each bf16 weight to f32 first,
  and hoists the conversion of a stacked ``[L, ...]`` weight out of the
  layer scan, so the CPU program holds an f32 copy of the whole shard that a
  TPU or GPU program never makes. Counted per bf16 leaf whose shard shape is
  the result of a ``convert`` to f32 in ``hlo`` (its compiled text).
  """
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  converted = {tuple(int(d) for d in m.group(1).split(","))
               for m in re.finditer(r"= f32\[([0-9,]+)\]\S* (?:convert|fusion)\(", hlo)}
  # A fusion counts only if it is a conversion: its name says so.
  converted = {shape for shape in converted
               if re.search(r"%\S*convert\S* = f32\[" + ",".join(map(str, shape)) + r"\]", hlo)}
  total = 0
  for x, sh in zip(jax.tree.leaves(base), jax.tree.leaves(base_sharding)):
    shape = tuple(sh.shard_shape(tuple(x.shape)))
    if x.dtype == jnp.bfloat16 and len(shape) > 1 and shape in converted:
      total += 4 * math.prod(shape)
  return total


def _backend_memory_gb() -> float | None:
  """One device's memory as the backend reports it (None on the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  limit = (stats or {}).get("bytes_limit")
  return limit / GB if limit else None


def search(config, *, max_clients_per_chunk: int | None = None, **kw
           ) -> tuple[Plan | None, list[Plan]]:
  """The largest ``clients_per_chunk`` whose round fits, and every plan tried.

  Each try is a compile (tens of seconds for a 7-8B model), so: compile 1
  and 2 clients, extrapolate the peak linearly (each client of a step adds
  its adapters, optimizer states and activations), check the prediction
  ``k`` and ``k + 1``, and bisect between the known bounds only where the
  line was wrong. Never past the round's clients (``clients_per_round``
  over the clients axis). Returns ``(None, tried)`` when one client does
  not fit.
  """
  tried: dict[int, Plan] = {}

  def at(k: int) -> Plan:
    if k not in tried:
      tried[k] = estimate(config, clients_per_chunk=k, **kw)
    return tried[k]

  first = at(1)
  clients_axis = first.devices // first.model_parallel
  top = max_clients_per_chunk or max(
      1, -(-config.federated.clients_per_round // clients_axis))
  if not first.fits:
    return None, list(tried.values())
  lo, hi = 1, top + 1  # at(lo) fits; hi does not (top + 1: beyond the round).
  if top >= 2:
    slope = at(2).peak - first.peak
    if not at(2).fits:
      hi = 2
    elif slope <= 0:
      lo = 2
    else:
      lo = 2
      guess = min(top, max(2, 1 + (first.device_memory - first.peak) // slope))
      for k in (guess, guess + 1):
        if lo < k < hi:
          if at(k).fits:
            lo = k
          else:
            hi = k
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if at(mid).fits:
      lo = mid
    else:
      hi = mid
  return tried[lo], [tried[k] for k in sorted(tried)]


def main(argv: list[str] | None = None) -> None:
  """``python -m fedjax_u2s.plan --config=FILE[:ARG] [--devices=N]
  [--device_memory_gb=G] [--model_parallel=M] [--clients_per_chunk=K]
  [--search] [--config.x=y ...]``."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m fedjax_u2s.plan",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:ARG]")
  parser.add_argument("--devices", type=int, default=0,
                      help="mesh size (default config.plan.devices / mesh.num_devices)")
  parser.add_argument("--device_memory_gb", type=float, default=0.0)
  parser.add_argument("--model_parallel", type=int, default=0)
  parser.add_argument("--clients_per_chunk", type=int, default=0)
  parser.add_argument("--search", action="store_true",
                      help="find the largest clients_per_chunk that fits")
  args, rest = parser.parse_known_args(argv)
  path, _, arg = args.config.partition(":")
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unknown argument {item!r} (overrides are --config.a.b=value)")
    k, v = item[len("--config."):].split("=", 1)
    overrides[k] = v
  from fedjax_u2s import config_blocks  # pylint: disable=g-import-not-at-top
  config = config_blocks.load(path, arg, **_parse_values(overrides))
  plan_cfg = config.get("plan") or {}
  devices = args.devices or plan_cfg.get("devices") or config.mesh.num_devices or 0
  if devices:
    _emulate_devices(devices)
  import jax  # pylint: disable=g-import-not-at-top
  if devices and jax.device_count() < devices:
    raise SystemExit(f"--devices={devices}: only {jax.device_count()} "
                     f"{jax.default_backend()} devices here.")
  kw = dict(devices=devices or None, device_memory_gb=args.device_memory_gb or None,
            model_parallel=args.model_parallel or None)
  print(f"# {args.config}: {jax.device_count()} {jax.default_backend()} devices "
        "to compile on")
  if args.search or plan_cfg.get("search", False):
    best, tried = search(config, **kw)
    for p in tried:
      print(f"clients_per_chunk={p.clients_per_chunk}: peak {p.peak / GB:.3f} GB "
            f"of {p.device_memory / GB:.1f} -> {'fits' if p.fits else 'no'}")
    if best is None:
      print("\nEven one client per device group does not fit.\n")
      print(tried[0].table())
    else:
      print(f"\nLargest that fits: clients_per_chunk={best.clients_per_chunk} "
            f"({best.clients_per_step} clients per step)\n")
      print(best.table())
  else:
    print(estimate(config, clients_per_chunk=args.clients_per_chunk or None, **kw).table())


def _parse_values(overrides: dict[str, str]) -> dict[str, Any]:
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for k, v in overrides.items():
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _emulate_devices(n: int) -> None:
  """Asks the CPU backend for ``n`` devices. Read when JAX starts its
  backends (the first device query), so it must run before that; harmless on
  an accelerator, whose devices are the real ones."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"


if __name__ == "__main__":
  main()
