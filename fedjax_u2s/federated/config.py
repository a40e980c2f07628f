"""The federated-optimization config: one definition, fields and defaults.

:class:`AlgorithmConfig` is the single source of ``config.federated``:
:func:`fedjax_u2s.config_blocks.federated_config` builds the ConfigDict of every
experiment from its defaults, and :func:`fedjax_u2s.federated.algorithms.build`
reads a ConfigDict back with :meth:`AlgorithmConfig.from_config`, which
refuses missing and unknown fields and checks every value up front.
``config.federated.dp`` is a nested block, :class:`DPConfig` (client-level
differential privacy, :mod:`fedjax_u2s.federated.privacy`), read the same way.

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
class DPConfig:
  """``config.federated.dp``: client-level differential privacy (DP-FedAvg).

  A nested block (frozen and hashable like :class:`AlgorithmConfig`, which
  the jitted round closes over). When enabled, each sampled client's update
  (its delta from the global adapter, the whole LoRA pytree) is clipped to L2
  norm ``clip_norm``, Gaussian noise of std ``noise_multiplier * clip_norm``
  is added to the SUM of clipped updates and the sum is divided by
  ``clients_per_round``: uniform weights and a fixed denominator replace the
  example-count weighting (see :mod:`fedjax_u2s.federated.privacy`, which
  also states the accountant's sampling assumption).
  """
  # Clip, noise and account each round (McMahan et al. 2018, DP-FedAvg).
  enabled: bool = False
  # L2 bound C on each client's update (its whole adapter delta).
  clip_norm: float = 1.0
  # z: the sum of clipped updates gets N(0, (z * C)^2) noise; 0 = clip only
  # (epsilon inf).
  noise_multiplier: float = 1.0
  # The delta of the reported (epsilon, delta) guarantee.
  delta: float = 1e-5

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first field out of range (when enabled)."""
    if not self.enabled:
      return
    def bad(field, allowed):
      raise ValueError(f"config.federated.dp.{field}={getattr(self, field)!r}: "
                       f"must be {allowed} when config.federated.dp.enabled.")
    if not self.clip_norm > 0:
      bad("clip_norm", "> 0")
    if not self.noise_multiplier >= 0:
      bad("noise_multiplier", ">= 0 (0 = clip only, no guarantee)")
    if not 0 < self.delta < 1:
      bad("delta", "in (0, 1)")


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
  # Client-level differential privacy: enabled, clip_norm, noise_multiplier, delta.
  dp: DPConfig = dataclasses.field(default_factory=DPConfig)

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
    if not isinstance(self.dp, DPConfig):
      raise TypeError(f"config.federated.dp: expected a DPConfig, got "
                      f"{type(self.dp).__name__}.")
    if self.dp.enabled and self.spec.scaffold:
      raise ValueError(
          f"config.federated.dp.enabled=True with algorithm={self.algorithm!r}: "
          "SCAFFOLD sends each client's control-variate update to the server "
          "unclipped and un-noised (and keeps per-client controls there), which "
          "leaks per-client information outside the DP mechanism. Use fedavg, "
          "fedprox, fedavgm, fedadagrad, fedadam or fedyogi with DP.")

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
    return cls(**_fields_from(cls, cfg, "config.federated"))

  @property
  def spec(self) -> AlgorithmSpec:
    return ALGORITHMS[self.algorithm]


def _fields_from(cls: type, cfg: Any, where: str) -> dict[str, Any]:
  """The keyword arguments of dataclass ``cls`` from mapping ``cfg`` at ``where``.

  Every field is required and no other is allowed; nested dataclass fields
  (``dp``) are read from nested mappings the same way.
  """
  if not hasattr(cfg, "items"):
    raise TypeError(f"{where}: expected a ConfigDict or mapping, "
                    f"got {type(cfg).__name__}.")
  values = dict(cfg.items())
  names = tuple(f.name for f in dataclasses.fields(cls))
  allowed = f"the fields are: {', '.join(names)}"
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"{where} has unknown field(s) "
                     f"{', '.join(unknown)}; {allowed}.")
  missing = [n for n in names if n not in values]
  if missing:
    raise ValueError(f"{where} is missing field(s) "
                     f"{', '.join(missing)}; {allowed}.")
  kw = {}
  for f in dataclasses.fields(cls):
    value = values[f.name]
    if f.default_factory is not dataclasses.MISSING:  # A nested block.
      kind = type(f.default_factory())
      kw[f.name] = value if isinstance(value, kind) else kind(
          **_fields_from(kind, value, f"{where}.{f.name}"))
    else:
      kw[f.name] = _coerce(f"{where}.{f.name}", value, type(f.default))
  return kw


def _coerce(name: str, value: Any, kind: type) -> Any:
  """``value`` as ``kind`` (int -> float allowed; nothing lossy or from bool).

  ``name`` is the full dotted name of the field (for the error).
  """
  if kind is bool and isinstance(value, (bool, np.bool_)):
    return bool(value)
  ok = not isinstance(value, (bool, np.bool_))
  if kind is float and ok and isinstance(value, numbers.Real):
    return float(value)
  if kind is int and ok and isinstance(value, numbers.Integral):
    return int(value)
  if kind is str and isinstance(value, str):
    return value
  raise ValueError(f"{name}={value!r}: must be of type "
                   f"{kind.__name__}, got {type(value).__name__}.")
