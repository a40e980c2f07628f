"""Federated algorithms as pure ``init`` / ``apply`` functions over ServerState.

One engine serves every algorithm of the registry :data:`ALGORITHMS`; they
differ only in the client objective (FedProx), the control variates
(SCAFFOLD) and the server optimizer (FedAvgM, FedAdagrad, FedAdam, FedYogi)::

    algorithm = algorithms.build(fed_config, loss_fn)
    state = algorithm.init(lora_params, jax.random.key(0), num_clients)
    state, metrics = jax.jit(algorithm.apply)(state, base_params, client_batches)

``apply`` processes the ``C`` clients as a ``lax.scan`` over chunks of
``clients_per_chunk`` vmapped clients (per device when built with
``num_client_shards``, as :func:`fedjax_u2s.federated.parallel.build` does),
so memory stays bounded by one chunk; the example-weighted sum of deltas is accumulated in the scan
carry. Client ``i`` of round ``r`` draws its randomness from
``fold_in(fold_in(key, r), i)``, so results depend neither on the chunk size
nor on the number of devices (up to float summation order).

With ``config.federated.dp.enabled`` the round is DP-FedAvg
(:mod:`fedjax_u2s.federated.privacy`): each client's delta is clipped to
``dp.clip_norm`` (folded into its aggregation weight), the clipped deltas are
summed with uniform weights (example counts are ignored), Gaussian noise is
added to the sum, which is divided by ``clients_per_round``, and the result
goes to the server optimizer as usual. The noise of round ``r`` comes from
``privacy.noise_key(root, r)``, so it is fresh every round and identical on
resume.

With a ``local_loss_fn`` the algorithm also has ``apply_isolated``, FedPIT's
parameter-isolated round: besides the global adapter (trained on the data
of ``client_batches`` and aggregated exactly as above), every client keeps a
private **local** adapter, stacked ``[num_clients, ...]`` outside the server
state. After the global phase each sampled client trains its local adapter
on ``local_batches`` (its real examples, plus synthetic ones) with the
round's received global adapter frozen beside the base. The local phase is a
separate scan whose outputs go back to the caller only: nothing of it enters
the server step, so the aggregated update is the same function of the
global phase's data as in ``apply`` (the real examples of the local phase
cannot reach it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.federated import aggregation
from fedjax_u2s.federated import client as client_lib
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import privacy
from fedjax_u2s.federated import state as state_lib
from fedjax_u2s.federated.config import (ALGORITHMS, LR_SCHEDULES,
                                         AlgorithmConfig, AlgorithmSpec)
from fedjax_u2s.federated.state import ClientBatches, ServerState

PyTree = Any

# The config and the registry live in the light federated.config module (no
# JAX) so experiment configs can build config.federated from them.
__all__ = ["ALGORITHMS", "LR_SCHEDULES", "AlgorithmConfig", "AlgorithmSpec",
           "FederatedAlgorithm", "RoundSums", "add_clients", "build",
           "client_learning_rate", "client_optimizer", "empty_sums",
           "keep_old_if_nonfinite", "local_key", "personal_loss",
           "server_optimizer", "server_step", "train_local_adapter"]

# fold_in stream of the local phase's randomness (the global phase uses the
# root key folded with the round directly), so the two phases never share
# dropout masks.
LOCAL_STREAM = 0x10CA1


def client_learning_rate(cfg: AlgorithmConfig, round_: jax.Array) -> jax.Array:
  """The client learning rate of round ``round_`` (0-based; traceable).

  Linear warmup ``lr * (r + 1) / warmup_rounds`` over the first
  ``warmup_rounds`` rounds, then constant or cosine decay to 0 at
  ``num_rounds``.
  """
  r = jnp.asarray(round_, jnp.float32)
  lr = jnp.float32(cfg.client_lr)
  if cfg.lr_schedule == "cosine":
    horizon = max(cfg.num_rounds - cfg.warmup_rounds, 1)
    progress = jnp.clip((r - cfg.warmup_rounds) / horizon, 0.0, 1.0)
    lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  if cfg.warmup_rounds > 0:
    lr = lr * jnp.minimum(1.0, (r + 1.0) / cfg.warmup_rounds)
  return lr


def client_optimizer(cfg: AlgorithmConfig, round_: jax.Array
                     ) -> tuple[optax.GradientTransformation, jax.Array]:
  """The client optimizer of round ``round_`` and its learning rate.

  Every local phase (global, FedPIT's local, a Flower node's) builds it here.
  """
  lr = client_learning_rate(cfg, round_)
  return client_lib.make_client_optimizer(
      cfg.client_optimizer, lr, b1=cfg.client_b1, b2=cfg.client_b2,
      weight_decay=cfg.client_weight_decay), lr


class FederatedAlgorithm(NamedTuple):
  """Pure functions of one algorithm (jit them at the call site).

  Attributes:
    init: ``(params, rng, num_clients) -> ServerState``.
    apply: ``(server_state, frozen, client_batches) -> (server_state, metrics)``.
    evaluate: ``(params, frozen, batch [N, B, ...]) -> (loss_sum, weight)``.
    config: the :class:`AlgorithmConfig`.
    apply_isolated: ``(server_state, local_adapters, frozen, client_batches,
      local_batches) -> (server_state, local_adapters, metrics)``, FedPIT's
      round (see the module docstring); None unless built with a
      ``local_loss_fn``.
  """
  init: Callable[..., ServerState]
  apply: Callable[..., tuple[ServerState, dict[str, jax.Array]]]
  evaluate: Callable[..., tuple[jax.Array, jax.Array]]
  config: AlgorithmConfig
  apply_isolated: Callable[..., tuple[ServerState, PyTree, dict[str, jax.Array]]] | None = None


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
  """[C, ...] -> [C // chunk, chunk, ...] with client ``i * n + j`` at ``[j, i]``.

  The chunk axis takes clients ``n`` apart, so when ``C`` is split in
  contiguous blocks over devices every scan step has clients on every device.
  """
  n = x.shape[0] // chunk
  return jnp.swapaxes(x.reshape((chunk, n) + x.shape[1:]), 0, 1)


def _unchunked(x: jax.Array) -> jax.Array:
  """Inverse of :func:`_chunked`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((-1,) + x.shape[2:])


class RoundSums(NamedTuple):
  """What the clients of a round add up (the scan carry of a round).

  What the server step receives, and all it receives: the round's sums of
  global-adapter deltas, never a client's data or local adapter. The Flower
  server (:mod:`fedjax_u2s.flower.server`) builds the same sums from the
  replies with :func:`add_clients`.

  Attributes:
    delta: example-weighted sum of client deltas (a params tree); with DP the
      plain sum of clipped deltas.
    weight: sum of client weights (examples); with DP the number of real
      (non-padding) clients.
    clipped: with DP, how many clients' deltas were clipped (else 0).
    nonfinite: some client produced a non-finite loss or gradient.
    control_delta: SCAFFOLD: sum of client control deltas (else None).
    client_controls: SCAFFOLD: the controls of all clients [N, ...] (else None).
  """
  delta: PyTree
  weight: jax.Array
  clipped: jax.Array
  nonfinite: jax.Array
  control_delta: PyTree | None
  client_controls: PyTree | None


def build(fed_config: Any, loss_fn: objectives.LossFn, *,
          num_client_shards: int = 1,
          chunk_sharding: Callable[[PyTree], PyTree] | None = None,
          local_loss_fn: objectives.LossFn | None = None
          ) -> FederatedAlgorithm:
  """Builds the algorithm named by ``fed_config.algorithm``.

  Args:
    fed_config: ``config.federated`` (a ConfigDict with every field of
      :class:`AlgorithmConfig`), or an :class:`AlgorithmConfig`.
    loss_fn: see :data:`objectives.LossFn`.
    num_client_shards: devices the client axis is split over
      (:mod:`fedjax_u2s.federated.parallel` sets it); a scan step then holds
      ``clients_per_chunk * num_client_shards`` clients.
    chunk_sharding: optional function applied to each chunk's inputs inside
      the scan (a sharding constraint on the client axis).
    local_loss_fn: the loss of a client's local adapter, a
      :data:`objectives.LossFn` whose frozen argument is ``(frozen, global
      params)``; given, the algorithm has ``apply_isolated``.

  Returns:
    A :class:`FederatedAlgorithm`.
  """
  cfg = AlgorithmConfig.from_config(fed_config)
  server_opt = server_optimizer(cfg)
  apply = functools.partial(_apply, cfg=cfg, server_opt=server_opt,
                            loss_fn=loss_fn, num_client_shards=num_client_shards,
                            chunk_sharding=chunk_sharding)
  apply_isolated = None
  if local_loss_fn is not None:
    apply_isolated = functools.partial(
        _apply_isolated, apply=apply, cfg=cfg, local_loss_fn=local_loss_fn,
        num_client_shards=num_client_shards, chunk_sharding=chunk_sharding)
  return FederatedAlgorithm(
      init=functools.partial(_init, cfg=cfg, server_opt=server_opt),
      apply=apply, evaluate=functools.partial(_evaluate, loss_fn=loss_fn),
      config=cfg, apply_isolated=apply_isolated)


def _init(params: PyTree, rng: jax.Array, num_clients: int, *,
          cfg: AlgorithmConfig, server_opt: optax.GradientTransformation
          ) -> ServerState:
  """Round-0 server state for a population of ``num_clients`` clients.

  ``params`` is copied, so donating the state to ``apply`` leaves the
  caller's arrays alive.
  """
  params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
  client_controls = None
  if cfg.spec.scaffold:
    client_controls = jax.tree.map(
        lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)
  return ServerState(
      params=params, opt_state=server_opt.init(params),
      control=jax.tree.map(jnp.zeros_like, params),
      client_controls=client_controls, round=jnp.zeros((), jnp.int32),
      rng=state_lib.key_data(rng))


def server_optimizer(cfg: AlgorithmConfig) -> optax.GradientTransformation:
  """The server optimizer of ``cfg``'s algorithm."""
  return aggregation.make_server_optimizer(
      cfg.spec.server_optimizer, learning_rate=cfg.server_lr,
      momentum=cfg.server_momentum, b1=cfg.server_b1, b2=cfg.server_b2,
      tau=cfg.server_tau)


def _apply(server_state: ServerState, frozen: PyTree,
           client_batches: ClientBatches, *, cfg: AlgorithmConfig,
           server_opt: optax.GradientTransformation, loss_fn: objectives.LossFn,
           num_client_shards: int,
           chunk_sharding: Callable[[PyTree], PyTree] | None
           ) -> tuple[ServerState, dict[str, jax.Array]]:
  """One round: local training of every client, aggregation, server step."""
  num_real = client_batches.num_examples.shape[0]
  xs, num_chunks = _chunk_clients(cfg, client_batches, num_client_shards)
  sums, (c_loss, c_tokens) = _train_clients(
      cfg, loss_fn, chunk_sharding, server_state, frozen, xs, num_chunks)
  new_state, mean_delta = server_step(cfg, server_opt, server_state, sums)
  new_state, nonfinite = keep_old_if_nonfinite(server_state, new_state,
                                                sums.nonfinite)
  c_loss = _unchunked(c_loss)[:num_real]
  c_tokens = _unchunked(c_tokens)[:num_real]
  metrics = _round_metrics(c_loss, c_tokens, mean_delta, nonfinite)
  if cfg.dp.enabled:
    metrics["dp_clipped_fraction"] = sums.clipped / jnp.maximum(sums.weight, 1.0)
  return new_state, metrics


def _apply_isolated(server_state: ServerState, local_adapters: PyTree,
                    frozen: PyTree, client_batches: ClientBatches,
                    local_batches: ClientBatches, *, apply: Callable[..., Any],
                    cfg: AlgorithmConfig, local_loss_fn: objectives.LossFn,
                    num_client_shards: int,
                    chunk_sharding: Callable[[PyTree], PyTree] | None
                    ) -> tuple[ServerState, PyTree, dict[str, jax.Array]]:
  """FedPIT's round: the global round of ``apply``, then the local phase.

  ``local_batches`` holds the same clients in the same order as
  ``client_batches``. If anything went non-finite, neither the server state
  nor any local adapter changes.
  """
  new_state, metrics = apply(server_state, frozen, client_batches)
  num_real = local_batches.num_examples.shape[0]
  xs, num_chunks = _chunk_clients(cfg, local_batches, num_client_shards)
  new_local, local_bad, (l_loss, l_tokens) = _train_local(
      cfg, local_loss_fn, chunk_sharding, server_state, frozen, local_adapters,
      xs, num_chunks)
  nonfinite = metrics["nonfinite"] | local_bad | ~client_lib.all_finite(new_local)
  new_state = jax.tree.map(lambda o, n: jnp.where(nonfinite, o, n),
                           server_state, new_state)
  new_local = jax.tree.map(lambda o, n: jnp.where(nonfinite, o, n),
                           local_adapters, new_local)
  l_loss = _unchunked(l_loss)[:num_real]
  l_tokens = _unchunked(l_tokens)[:num_real]
  l_total = jnp.sum(l_tokens)
  metrics.update(nonfinite=nonfinite,
                 local_loss=jnp.sum(l_loss) / jnp.maximum(l_total, 1.0),
                 local_num_tokens=l_total,
                 client_local_loss=l_loss / jnp.maximum(l_tokens, 1.0))
  return new_state, new_local, metrics


def _train_local(cfg: AlgorithmConfig, local_loss_fn: objectives.LossFn,
                 chunk_sharding: Callable[[PyTree], PyTree] | None,
                 server_state: ServerState, frozen: PyTree, adapters: PyTree,
                 xs: PyTree, num_chunks: int
                 ) -> tuple[PyTree, jax.Array, tuple[jax.Array, jax.Array]]:
  """The local phase: each client's private adapter on its own data.

  A scan over chunks of vmapped clients, like the global phase; each client
  starts from its own row of ``adapters`` (with the round's received global
  adapter frozen beside the base) and its trained adapter is written back to
  that row. Padding clients write nowhere. The client optimizer and the
  learning-rate schedule are the global phase's.

  Returns:
    The updated stacked adapters, whether a real client went non-finite, and
    per-client loss sums and token counts ``[num_chunks, chunk]``.
  """
  root = server_state.key()
  optimizer, lr = client_optimizer(cfg, server_state.round)
  beside = (frozen, server_state.params)
  num_clients = jax.tree.leaves(adapters)[0].shape[0]

  def one_client(start, batch, step_mask, client_id):
    return train_local_adapter(cfg, local_loss_fn, start, beside, batch, step_mask,
                               local_key(root, server_state.round, client_id),
                               optimizer, lr)

  def body(carry, chunk_xs):
    stacked, bad = carry
    if chunk_sharding is not None:
      chunk_xs = chunk_sharding(chunk_xs)
    batch, step_mask, weights, ids = chunk_xs
    mine = jax.tree.map(lambda t: t[ids], stacked)
    trained, out = jax.vmap(one_client)(mine, batch, step_mask, ids)
    real = weights > 0
    slot = jnp.where(real, ids, num_clients)  # Out of range: dropped.
    stacked = jax.tree.map(lambda t, v: t.at[slot].set(v, mode="drop"),
                           stacked, trained)
    return (stacked, bad | jnp.any(out.nonfinite & real)), (out.loss_sum,
                                                           out.num_tokens)

  (adapters, bad), sums = jax.lax.scan(body, (adapters, jnp.array(False)), xs,
                                       length=num_chunks)
  return adapters, bad, sums


def train_local_adapter(cfg: AlgorithmConfig, local_loss_fn: objectives.LossFn,
                        start: PyTree, beside: PyTree, batch: PyTree,
                        step_mask: jax.Array, key: jax.Array,
                        optimizer: optax.GradientTransformation, lr: jax.Array
                        ) -> tuple[PyTree, client_lib.ClientOutput]:
  """One client's local phase: its local adapter ``start`` trained on ``batch``.

  ``beside`` is ``(frozen base, the round's received global adapter)``;
  ``key`` the client's local-phase key (``fold_in(fold_in(fold_in(root,
  LOCAL_STREAM), round), client)``), ``optimizer`` and ``lr`` the round's
  (:func:`client_optimizer`). The local phase of :func:`build`'s
  ``apply_isolated`` and a Flower FedPIT node
  (:mod:`fedjax_u2s.flower.node_fedpit`) both run this.

  Returns:
    ``(trained adapter, the client update's output)``.
  """
  out = client_lib.client_update(
      start, beside, batch, step_mask, key, loss_fn=local_loss_fn,
      optimizer=optimizer, learning_rate=lr, grad_clip=cfg.grad_clip)
  return jax.tree.map(jnp.add, start, out.delta), out


def local_key(root: jax.Array, round_: jax.Array | int, client: jax.Array | int
              ) -> jax.Array:
  """Client ``client``'s local-phase key of round ``round_`` (root: the server's)."""
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(root, LOCAL_STREAM), round_), client)


def personal_loss(loss_fn: objectives.LossFn) -> objectives.LossFn:
  """FedPIT's local-adapter loss: the personal model base + global + local.

  One adapter of twice the rank (:func:`fedjax_u2s.lora.concat_rank`), the
  global half frozen: the returned loss takes ``(own local adapter, (base,
  global adapter), batch, rng)``, the ``local_loss_fn`` of :func:`build`.
  """
  def local_loss_fn(own, frozen, batch, rng):
    base, global_lora = frozen
    return loss_fn(lora_lib.concat_rank(global_lora, own), base, batch, rng)
  return local_loss_fn


def _chunk_clients(cfg: AlgorithmConfig, client_batches: ClientBatches,
                   shards: int) -> tuple[PyTree, int]:
  """Pads the clients to whole chunks and lays them out for the scan.

  Returns:
    ``(batch, step_mask, num_examples, client_ids)`` with leaves
    ``[num_chunks, chunk, ...]``, and ``num_chunks``.
  """
  num_real = client_batches.num_examples.shape[0]
  if cfg.clients_per_chunk > 0:
    chunk = cfg.clients_per_chunk * shards
  else:
    chunk = math.ceil(num_real / shards) * shards
  cb = state_lib.pad_clients(client_batches, chunk)
  num_chunks = cb.num_examples.shape[0] // chunk
  xs = jax.tree.map(functools.partial(_chunked, chunk=chunk),
                    (cb.batch, jnp.asarray(cb.step_mask, bool),
                     jnp.asarray(cb.num_examples, jnp.float32),
                     jnp.asarray(cb.client_ids, jnp.int32)))
  return xs, num_chunks


def _train_clients(cfg: AlgorithmConfig, loss_fn: objectives.LossFn,
                   chunk_sharding: Callable[[PyTree], PyTree] | None,
                   server_state: ServerState, frozen: PyTree, xs: PyTree,
                   num_chunks: int) -> tuple[RoundSums, tuple[jax.Array, jax.Array]]:
  """Local training of every client: a scan over chunks of vmapped clients.

  Returns:
    The round's :class:`RoundSums`, and each client's loss sum and token count
    ``[num_chunks, chunk]``.
  """
  spec = cfg.spec
  params = server_state.params
  round_key = jax.random.fold_in(server_state.key(), server_state.round)
  optimizer, lr = client_optimizer(cfg, server_state.round)
  control = server_state.control if spec.scaffold else None
  prox_mu = cfg.prox_mu if spec.prox else 0.0

  def one_client(batch, step_mask, client_id, client_control):
    return client_lib.client_update(
        params, frozen, batch, step_mask,
        jax.random.fold_in(round_key, client_id), loss_fn=loss_fn,
        optimizer=optimizer, learning_rate=lr, grad_clip=cfg.grad_clip,
        prox_mu=prox_mu, server_control=control,
        client_control=client_control)

  def body(sums: RoundSums, chunk_xs):
    if chunk_sharding is not None:
      chunk_xs = chunk_sharding(chunk_xs)
    batch, step_mask, weights, ids = chunk_xs
    ci = (jax.tree.map(lambda t: t[ids], sums.client_controls)
          if spec.scaffold else None)
    out = jax.vmap(one_client)(batch, step_mask, ids, ci)
    sums = add_clients(cfg, sums, out.delta, weights, ids, out.nonfinite,
                       out.control_delta)
    return sums, (out.loss_sum, out.num_tokens)

  sums0 = empty_sums(cfg, params, server_state.client_controls)
  return jax.lax.scan(body, sums0, xs, length=num_chunks)


def empty_sums(cfg: AlgorithmConfig, params: PyTree,
               client_controls: PyTree | None) -> RoundSums:
  """The sums before any client is added (``client_controls``: the state's)."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return RoundSums(zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                   jnp.array(False), zeros if cfg.spec.scaffold else None,
                   client_controls)


def add_clients(cfg: AlgorithmConfig, sums: RoundSums, deltas: PyTree,
                weights: jax.Array, ids: jax.Array, nonfinite: jax.Array,
                control_deltas: PyTree | None) -> RoundSums:
  """``sums`` plus a group of clients (leaves ``[k, ...]``).

  Example-weighted, or with DP each delta clipped to ``dp.clip_norm`` and
  weighted 1 (0 for padding, whose weight is 0), so the sum is that of the
  clipped deltas; SCAFFOLD's control deltas summed and written to each
  client's row.
  """
  clipped = sums.clipped
  if cfg.dp.enabled:
    real = (weights > 0).astype(jnp.float32)
    factors, norms = privacy.clip_factors(deltas, cfg.dp.clip_norm)
    weights = real * factors
    clipped = clipped + jnp.sum(real * (norms > cfg.dp.clip_norm))
    weight = sums.weight + jnp.sum(real)
  else:
    weight = sums.weight + jnp.sum(weights)
  delta = aggregation.accumulate(sums.delta, deltas, weights)
  control_delta, client_controls = sums.control_delta, sums.client_controls
  if cfg.spec.scaffold:
    control_delta = jax.tree.map(lambda s, d: s + jnp.sum(d, axis=0),
                                 control_delta, control_deltas)
    client_controls = jax.tree.map(lambda t, d: t.at[ids].add(d),
                                   client_controls, control_deltas)
  return RoundSums(delta, weight, clipped, sums.nonfinite | jnp.any(nonfinite),
                   control_delta, client_controls)


def server_step(cfg: AlgorithmConfig, server_opt: optax.GradientTransformation,
                server_state: ServerState, sums: RoundSums
                ) -> tuple[ServerState, PyTree]:
  """The server optimizer on the mean delta, and SCAFFOLD's control.

  The mean is example-weighted, or with DP the noised sum of clipped deltas
  over the fixed ``clients_per_round`` (:func:`privacy.noised_mean`).

  Returns:
    The next server state and the mean delta.
  """
  params = server_state.params
  if cfg.dp.enabled:
    mean_delta = privacy.noised_mean(
        sums.delta, privacy.noise_key(server_state.key(), server_state.round),
        clip_norm=cfg.dp.clip_norm, noise_multiplier=cfg.dp.noise_multiplier,
        expected_clients=cfg.clients_per_round)
  else:
    mean_delta = aggregation.weighted_mean(sums.delta, sums.weight)
  new_params, new_opt_state = aggregation.server_update(
      params, server_state.opt_state, mean_delta, server_opt)
  new_control = server_state.control
  if cfg.spec.scaffold:
    num_clients = jax.tree.leaves(server_state.client_controls)[0].shape[0]
    new_control = jax.tree.map(lambda c, s: c + s / num_clients,
                               server_state.control, sums.control_delta)
  new_state = ServerState(
      params=new_params, opt_state=new_opt_state, control=new_control,
      client_controls=sums.client_controls, round=server_state.round + 1,
      rng=server_state.rng)
  return new_state, mean_delta


def keep_old_if_nonfinite(old: ServerState, new: ServerState,
                           client_nonfinite: jax.Array
                           ) -> tuple[ServerState, jax.Array]:
  """``old`` (the round not applied) if anything went non-finite, else ``new``."""
  nonfinite = client_nonfinite | ~client_lib.all_finite(
      (new.params, new.opt_state, new.control, new.client_controls))
  state = jax.tree.map(lambda o, n: jnp.where(nonfinite, o, n), old, new)
  return state, nonfinite


def _round_metrics(c_loss: jax.Array, c_tokens: jax.Array, mean_delta: PyTree,
                   nonfinite: jax.Array) -> dict[str, jax.Array]:
  """The round's metrics from per-client loss sums and token counts [C]."""
  num_tokens = jnp.sum(c_tokens)
  return {
      "loss": jnp.sum(c_loss) / jnp.maximum(num_tokens, 1.0),
      "num_tokens": num_tokens,
      "client_loss": c_loss / jnp.maximum(c_tokens, 1.0),
      "client_tokens": c_tokens,
      "update_norm": optax.tree.norm(mean_delta),
      "nonfinite": nonfinite,
  }


def _evaluate(params: PyTree, frozen: PyTree, batch: PyTree, *,
              loss_fn: objectives.LossFn) -> tuple[jax.Array, jax.Array]:
  """Summed loss and weight over ``N`` micro-batches (leaves [N, B, ...])."""
  def body(acc, b):
    l, w = loss_fn(params, frozen, b, None)
    return (acc[0] + l.astype(jnp.float32), acc[1] + w.astype(jnp.float32)), None
  zero = jnp.zeros((), jnp.float32)
  (loss_sum, weight), _ = jax.lax.scan(body, (zero, zero), batch)
  return loss_sum, weight
