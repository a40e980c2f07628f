"""The federated-optimization config: one definition, fields and defaults.

:class:`AlgorithmConfig` is the single source of ``config.federated``:
:func:`fedjax_u2s.config_lib.federated_config` builds the ConfigDict of every
experiment from its defaults, and :func:`fedjax_u2s.federated.algorithms.build`
reads a ConfigDict back with :meth:`AlgorithmConfig.from_config`, which
refuses missing and unknown fields and checks every value up front.

This module imports neither JAX nor optax, so config files stay light.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """What distinguishes one registered algorithm.

  Attributes:
    server_optimizer: a kind of
      :func:`fedjax_u2s.federated.aggregation.make_server_optimizer`.
    prox: the client objective has the FedProx proximal term.
    scaffold: clients use SCAFFOLD control variates.
  """
  server_optimizer: str
  prox: bool = False
  scaffold: bool = False


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec("sgd"),
    "fedprox": AlgorithmSpec("sgd", prox=True),
    "fedavgm": AlgorithmSpec("momentum"),
    "fedadagrad": AlgorithmSpec("adagrad"),
    "fedadam": AlgorithmSpec("adam"),
    "fedyogi": AlgorithmSpec("yogi"),
    "scaffold": AlgorithmSpec("sgd", scaffold=True),
}

CLIENT_OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """``config.federated``: the algorithm, its optimizers and the round schedule.

  Static and hashable (closed over by the jitted round). Every field has one
  default, here; the values are validated on construction.
  """
  # fedavg|fedprox|fedavgm|fedadagrad|fedadam|fedyogi|scaffold (ALGORITHMS).
  algorithm: str = "fedavg"
  # Communication rounds (also the cosine schedule's horizon).
  num_rounds: int = 20
  # Clients sampled uniformly without replacement each round.
  clients_per_round: int = 4
  # Clients per vmapped step (per device on a mesh); chunks are scanned so
  # memory holds one chunk; 0 = all clients in one step. 1 is fastest and
  # lightest on a CPU; on a GPU put all clients in one step.
  clients_per_chunk: int = 1
  # Server step on the mean client delta (1.0 with fedavg = plain FedAvg).
  server_lr: float = 1.0
  # Heavy-ball momentum of fedavgm.
  server_momentum: float = 0.9
  # First-moment decay of fedadagrad / fedadam / fedyogi.
  server_b1: float = 0.9
  # Second-moment decay of fedadam / fedyogi.
  server_b2: float = 0.99
  # Adaptivity tau of fedadagrad / fedadam / fedyogi (Reddi et al.).
  server_tau: float = 1e-3
  # FedProx proximal weight mu (read by fedprox only).
  prox_mu: float = 0.01
  # Local optimizer, state reset every round: adamw | sgd.
  client_optimizer: str = "adamw"
  # Peak client learning rate.
  client_lr: float = 2e-4
  # Decoupled weight decay of the local optimizer.
  client_weight_decay: float = 0.0
  # AdamW beta1 of the local optimizer.
  client_b1: float = 0.9
  # AdamW beta2 of the local optimizer.
  client_b2: float = 0.999
  # Global-norm clip of each client step's gradient; 0 = off.
  grad_clip: float = 1.0
  # Client lr across rounds: constant | cosine (to 0 at num_rounds).
  lr_schedule: str = "cosine"
  # Rounds of linear warmup of the client lr.
  warmup_rounds: int = 1

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first field out of range."""
    def bad(field, allowed):
      raise ValueError(f"config.federated.{field}={getattr(self, field)!r}: "
                       f"must be {allowed}.")

    def choice(field, allowed):
      if getattr(self, field) not in allowed:
        bad(field, f"one of {', '.join(allowed)}")

    choice("algorithm", tuple(ALGORITHMS))
    choice("client_optimizer", CLIENT_OPTIMIZERS)
    choice("lr_schedule", LR_SCHEDULES)
    for field in ("num_rounds", "clients_per_round"):
      if getattr(self, field) < 1:
        bad(field, "an integer >= 1")
    for field in ("clients_per_chunk", "warmup_rounds"):
      if getattr(self, field) < 0:
        bad(field, "an integer >= 0")
    for field in ("client_lr", "server_lr", "server_tau"):
      if not getattr(self, field) > 0:
        bad(field, "> 0")
    for field in ("prox_mu", "client_weight_decay", "grad_clip"):
      if not getattr(self, field) >= 0:
        bad(field, ">= 0 (0 = off)")
    for field in ("server_momentum", "server_b1", "server_b2", "client_b1",
                  "client_b2"):
      if not 0 <= getattr(self, field) < 1:
        bad(field, "in [0, 1)")

  def to_dict(self) -> dict[str, Any]:
    """The fields in definition order (for ``ml_collections.ConfigDict``)."""
    return dataclasses.asdict(self)

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, cfg: Any) -> "AlgorithmConfig":
    """From ``config.federated`` (a ConfigDict or mapping), every field required.

    Raises:
      ValueError: on a missing or unknown field (naming it and the allowed
        fields), a value of the wrong type, or a value out of range.
    """
    if isinstance(cfg, cls):
      return cfg
    if not hasattr(cfg, "items"):
      raise TypeError(f"config.federated: expected a ConfigDict or mapping, "
                      f"got {type(cfg).__name__}.")
    values = dict(cfg.items())
    names = cls.field_names()
    allowed = f"the fields are: {', '.join(names)}"
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"config.federated has unknown field(s) "
                       f"{', '.join(unknown)}; {allowed}.")
    missing = [n for n in names if n not in values]
    if missing:
      raise ValueError(f"config.federated is missing field(s) "
                       f"{', '.join(missing)}; {allowed}.")
    kw = {}
    for f in dataclasses.fields(cls):
      kw[f.name] = _coerce(f.name, values[f.name], type(f.default))
    return cls(**kw)

  @property
  def spec(self) -> AlgorithmSpec:
    return ALGORITHMS[self.algorithm]


def _coerce(name: str, value: Any, kind: type) -> Any:
  """``value`` as ``kind`` (int -> float allowed; nothing lossy or from bool)."""
  ok = not isinstance(value, (bool, np.bool_))
  if kind is float and ok and isinstance(value, numbers.Real):
    return float(value)
  if kind is int and ok and isinstance(value, numbers.Integral):
    return int(value)
  if kind is str and isinstance(value, str):
    return value
  raise ValueError(f"config.federated.{name}={value!r}: must be of type "
                   f"{kind.__name__}, got {type(value).__name__}.")
