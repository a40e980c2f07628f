"""Round batching: per-client example streams -> padded ``ClientBatches``.

Each client walks through its examples epoch by epoch. The order of epoch
``e`` is :func:`epoch_order` ``(seed, client_id, e, n)``, a pure function, so
the only state a client carries between rounds is its **cursor**: the number
of examples it has consumed so far. Example ``p`` of a client's stream is
``epoch_order(seed, client_id, p // n, n)[p % n]``; resuming from saved
cursors reproduces the batches exactly.

One local step takes the next up to ``batch_size * grad_accum`` examples of
the stream, but never the same example twice: it stops early at an example
already in the step (which happens only across an epoch boundary), and fills
the remaining rows with padding rows (``input_mask``/``loss_mask`` all False,
tokens = pad id). So a client with fewer examples than a step holds puts each
of its examples once in every step (one epoch per step), plus padding rows.
Padding rows come after the real rows, so the last micro-batches of a step
may be all padding.

Number of local steps: ``local_steps=S`` gives every client S steps; or
``local_epochs=E`` gives client c the steps needed to consume
``ceil(E * n_c)`` examples -- ``ceil(E * n_c / (batch_size * grad_accum))``
when no step stops early, and ``ceil(E)`` when ``n_c`` is smaller than a step
-- capped at ``max_local_steps``; clients are padded to the largest count with
``step_mask`` False.

**Packing** (``pack=True``) keeps every step's examples exactly as above and
changes only how they are laid out: a step's examples go, longest first, into
the first row with room (first-fit decreasing, ties in stream order) of rows
of ``pack_length`` tokens (default ``batch_size * T``, the positions of one
unpacked micro-batch, so a micro-batch never holds more than it did). Each
example keeps its own causal attention and RoPE positions through two extra
leaves: ``segment_ids`` (1, 2, ... per example in its row, 0 at padding) and
``positions`` (0, 1, ... within each example). Because the client step
divides the summed token loss by the step's token count once, a step's loss
and gradient do not depend on how its examples are split into rows and
micro-batches: packed and unpacked training are the same computation up to
float summation order (LoRA dropout draws differ, being per position). An
unpacked batch is the special case of one segment per row (``segment_ids =
input_mask``), which the model assumes when the leaves are absent.

Packed shapes are ``[C, S, A', B', P]``: ``P`` is the longest packed row of
the round rounded up to :data:`PACK_MULTIPLE` (capped at ``pack_length``),
``B'`` rows per micro-batch (``batch_size * T // pack_length``, at least 1,
at most the rows any step needs) and ``A'`` micro-batches, enough for the step
needing most rows. Shapes therefore vary a little between rounds (one
compile each, cached by ``train.py``), and remain a pure function of the
cursors, so an exact resume reproduces them.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from fedjax_u2s.data.instructions import TokenizedSet
from fedjax_u2s.federated.state import ClientBatches

# Packed row lengths round up to a multiple of this: fewer distinct shapes
# (compiles) for a little padding.
PACK_MULTIPLE = 64


def epoch_order(seed: int, client_id: int, epoch: int, n: int) -> np.ndarray:
  """The order in which a client visits its ``n`` examples in one epoch."""
  rng = np.random.default_rng([int(seed), int(client_id), int(epoch)])
  return rng.permutation(n)


class _Stream:
  """A client's example stream from a cursor (epoch orders cached)."""

  def __init__(self, seed: int, client_id: int, n: int, cursor: int):
    self.seed, self.client_id, self.n, self.pos = seed, client_id, n, cursor
    self._order = functools.lru_cache(maxsize=4)(
        lambda e: epoch_order(seed, client_id, e, n))

  def take(self, limit: int) -> list[int]:
    """Up to ``limit`` next examples, stopping before a repeat."""
    out, seen = [], set()
    while len(out) < limit:
      i = int(self._order(self.pos // self.n)[self.pos % self.n])
      if i in seen:
        break
      out.append(i)
      seen.add(i)
      self.pos += 1
    return out


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """First-fit decreasing: indices into ``lengths`` grouped into rows.

  Items are placed longest first (ties in index order, so the result is a
  pure function of the input), each into the first row with room for it;
  every row holds at most ``capacity`` tokens. Within a row, items keep the
  order in which they were placed.

  Raises:
    ValueError: an item longer than ``capacity``.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
  rows: list[list[int]] = []
  fill: list[int] = []
  for i in order:
    n = int(lengths[i])
    if n > capacity:
      raise ValueError(f"pack_rows: an example of {n} tokens does not fit a "
                       f"packed row of {capacity}; raise pack_length.")
    for r, f in enumerate(fill):
      if f + n <= capacity:
        rows[r].append(i)
        fill[r] += n
        break
    else:
      rows.append([i])
      fill.append(n)
  return rows


def _pack_capacity(pack_length: int, batch_size: int, t: int) -> int:
  cap = pack_length or batch_size * t
  if cap < t:
    raise ValueError(f"pack_length ({pack_length}) is shorter than max_length "
                     f"({t}): a packed row must hold the longest example. Set "
                     "config.train.pack_length to 0 (batch_size * max_length) "
                     f"or to at least {t}.")
  return cap


def _packed_layout(fills: Sequence[Sequence[int]], cap: int, batch_size: int,
                   t: int) -> tuple[int, int, int]:
  """``(A', B', P)`` for groups of packed rows, given each row's tokens."""
  need = max([len(rows) for rows in fills] + [1])
  longest = max([f for rows in fills for f in rows] + [1])
  p = min(cap, -(-longest // PACK_MULTIPLE) * PACK_MULTIPLE)
  per_micro = min(max(1, batch_size * t // cap), need)
  return -(-need // per_micro), per_micro, p


def _fill_packed(out: dict, at: tuple, ts: TokenizedSet, items: Sequence[int],
                 rows: Sequence[Sequence[int]]) -> None:
  """Writes ``ts``'s examples ``items`` (grouped as ``rows`` of indices into
  ``items``) into the ``[..., R, P]`` arrays of ``out`` at index ``at``."""
  for r, row in enumerate(rows):
    pos = 0
    for seg, k in enumerate(row, start=1):
      ex = items[k]
      n = int(ts.input_mask[ex].sum())
      where = at + (r, slice(pos, pos + n))
      out["tokens"][where] = ts.tokens[ex, :n]
      out["input_mask"][where] = True
      out["loss_mask"][where] = ts.loss_mask[ex, :n]
      out["segment_ids"][where] = seg
      out["positions"][where] = np.arange(n)
      pos += n


def _packed_arrays(shape: tuple, pad_id: int) -> dict:
  return {"tokens": np.full(shape, pad_id, np.int32),
          "input_mask": np.zeros(shape, bool),
          "loss_mask": np.zeros(shape, bool),
          "segment_ids": np.zeros(shape, np.int32),
          "positions": np.zeros(shape, np.int32)}


def _lengths(ts: TokenizedSet, items: Sequence[int]) -> np.ndarray:
  """Real tokens of each example (the rows are right-padded)."""
  return ts.input_mask[list(items)].sum(axis=1)


def _check_sets(client_sets: Sequence[TokenizedSet], client_ids) -> int:
  lengths = {s.tokens.shape[1] for s in client_sets}
  if len(lengths) > 1:
    raise ValueError(f"Client sets have different max_length {sorted(lengths)};"
                     " tokenize them with one max_length.")
  for s, c in zip(client_sets, client_ids):
    if len(s) == 0:
      drops = getattr(s, "drops", None)
      if drops is not None and drops.read:
        # Tokenization emptied it: say why before blaming the partition.
        raise ValueError(f"Client {int(c)} has no examples: all {drops.read} "
                         f"of its examples were dropped by tokenize "
                         f"({drops.note()}).")
      raise ValueError(f"Client {int(c)} has no examples; drop it from the "
                       "partition or give it data.")
  return lengths.pop()


def round_batches(client_sets: Sequence[TokenizedSet],
                  client_ids: Sequence[int] | np.ndarray,
                  cursors: Sequence[int] | np.ndarray, *,
                  batch_size: int, grad_accum: int = 1,
                  local_steps: int | None = None,
                  local_epochs: float | None = None,
                  max_local_steps: int | None = None,
                  seed: int = 0, pack: bool = False,
                  pack_length: int = 0) -> tuple[ClientBatches, np.ndarray]:
  """One round's training batches for the sampled clients.

  Args:
    client_sets: the C sampled clients' tokenized data (one max_length).
    client_ids: int [C]; global client ids (they seed the orders).
    cursors: int [C]; examples each client has consumed so far (0 at start).
    batch_size: B, examples per micro-batch.
    grad_accum: A, micro-batches per local step.
    local_steps: S steps for every client; or
    local_epochs: E local epochs per client (see the module docstring).
    max_local_steps: cap on the steps of one client (with ``local_epochs``).
    seed: the run's data seed.
    pack: pack each step's examples into shared rows (module docstring):
      the same steps, fewer padded positions.
    pack_length: tokens per packed row; 0 = ``batch_size * T``.

  Returns:
    ``(batches, new_cursors)``: :class:`ClientBatches` with numpy leaves
    ``[C, S, A, B, T]`` (packed: ``[C, S, A', B', P]`` plus ``segment_ids``
    and ``positions``; ``step_mask`` bool [C, S], ``num_examples`` float32
    [C] = each client's dataset size, ``client_ids`` int32 [C]), and int64
    [C] cursors for the next round.

  Raises:
    ValueError: a client with no examples (names it, and says why when its
      set's ``drops`` shows tokenize dropped them all); mismatched lengths;
      neither or both of ``local_steps``/``local_epochs``.
  """
  client_ids = np.asarray(client_ids, np.int64).reshape(-1)
  cursors = np.asarray(cursors, np.int64).reshape(-1)
  c = len(client_sets)
  if not c:
    raise ValueError("round_batches needs at least one client.")
  if len(client_ids) != c or len(cursors) != c:
    raise ValueError(f"Got {c} client sets, {len(client_ids)} client ids and "
                     f"{len(cursors)} cursors; they must match.")
  if (local_steps is None) == (local_epochs is None):
    raise ValueError("Give exactly one of local_steps and local_epochs.")
  if batch_size < 1 or grad_accum < 1:
    raise ValueError(f"batch_size ({batch_size}) and grad_accum ({grad_accum}) "
                     "must be >= 1.")
  if local_steps is not None and local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}.")
  if local_epochs is not None and not local_epochs > 0:
    raise ValueError(f"local_epochs must be > 0, got {local_epochs}.")
  if max_local_steps is not None and max_local_steps < 1:
    raise ValueError(f"max_local_steps must be >= 1, got {max_local_steps}.")
  t = _check_sets(client_sets, client_ids)
  k = batch_size * grad_accum
  cap = max_local_steps if max_local_steps is not None else math.inf

  plans, new_cursors = [], np.empty(c, np.int64)
  for j, (ts, cid, cur) in enumerate(zip(client_sets, client_ids, cursors)):
    stream = _Stream(seed, cid, len(ts), int(cur))
    steps = []
    if local_steps is not None:
      for _ in range(min(local_steps, cap)):
        steps.append(stream.take(k))
    else:
      # round() first so that e.g. 0.1 * 30 is 3, not 3.0000000000000004.
      budget = math.ceil(round(local_epochs * len(ts), 9))
      while budget > 0 and len(steps) < cap:
        items = stream.take(min(k, budget))
        budget -= len(items)
        steps.append(items)
    plans.append(steps)
    new_cursors[j] = stream.pos
  s = max(len(p) for p in plans)
  pad_id = client_sets[0].pad_id
  step_mask = np.zeros((c, s), bool)
  for j, steps in enumerate(plans):
    step_mask[j, :len(steps)] = True
  num_examples = np.asarray([len(ts) for ts in client_sets], np.float32)

  if pack:
    row_cap = _pack_capacity(pack_length, batch_size, t)
    packed, fills = [], []  # Per client, per step: rows; their token counts.
    for ts, steps in zip(client_sets, plans):
      rows_of = []
      for items in steps:
        lengths = _lengths(ts, items)
        rows = pack_rows(lengths, row_cap)
        rows_of.append(rows)
        fills.append([int(sum(lengths[x] for x in r)) for r in rows])
      packed.append(rows_of)
    a_p, b_p, p = _packed_layout(fills, row_cap, batch_size, t)
    out = _packed_arrays((c, s, a_p * b_p, p), pad_id)
    for j, (ts, steps, prows) in enumerate(zip(client_sets, plans, packed)):
      for i, (items, rows) in enumerate(zip(steps, prows)):
        _fill_packed(out, (j, i), ts, items, rows)
    batch = {name: v.reshape(c, s, a_p, b_p, p) for name, v in out.items()}
    return ClientBatches(batch=batch, step_mask=step_mask,
                         num_examples=num_examples,
                         client_ids=client_ids.astype(np.int32)), new_cursors

  tokens = np.full((c, s, k, t), pad_id, np.int32)
  input_mask = np.zeros((c, s, k, t), bool)
  loss_mask = np.zeros((c, s, k, t), bool)
  for j, (ts, steps) in enumerate(zip(client_sets, plans)):
    for i, items in enumerate(steps):
      tokens[j, i, :len(items)] = ts.tokens[items]
      input_mask[j, i, :len(items)] = ts.input_mask[items]
      loss_mask[j, i, :len(items)] = ts.loss_mask[items]
  shape = (c, s, grad_accum, batch_size, t)
  batch = {"tokens": tokens.reshape(shape),
           "input_mask": input_mask.reshape(shape),
           "loss_mask": loss_mask.reshape(shape)}
  return ClientBatches(
      batch=batch, step_mask=step_mask, num_examples=num_examples,
      client_ids=client_ids.astype(np.int32)), new_cursors


def eval_batches(tokenized_set: TokenizedSet, batch_size: int, *,
                 pack: bool = False, pack_length: int = 0) -> dict:
  """All examples in order, as ``{tokens, input_mask, loss_mask}`` [N_b, B, T].

  The last batch is filled with padding rows (masks all False); a row is real
  iff ``input_mask[b, i].any()``.

  With ``pack``, all examples are packed as a round's step is (module
  docstring) into rows of ``pack_length`` tokens (0 = ``batch_size * T``),
  ``max(1, batch_size * T // pack_length)`` rows per batch, with the
  ``segment_ids`` and ``positions`` leaves: [N_b, B', P]. The summed loss
  and token count over all batches are those of the unpacked batches.
  """
  n, t = tokenized_set.tokens.shape
  if n == 0:
    raise ValueError("eval_batches got an empty set.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if pack:
    row_cap = _pack_capacity(pack_length, batch_size, t)
    items = list(range(n))
    lengths = _lengths(tokenized_set, items)
    rows = pack_rows(lengths, row_cap)
    fills = [int(sum(lengths[x] for x in r)) for r in rows]
    _, per_batch, p = _packed_layout([fills], row_cap, batch_size, t)
    nb = -(-len(rows) // per_batch)
    out = _packed_arrays((nb * per_batch, p), tokenized_set.pad_id)
    _fill_packed(out, (), tokenized_set, items, rows)
    return {name: v.reshape(nb, per_batch, p) for name, v in out.items()}
  nb = -(-n // batch_size)
  out = {}
  for name, fill in (("tokens", tokenized_set.pad_id), ("input_mask", False),
                     ("loss_mask", False)):
    src = getattr(tokenized_set, name)
    arr = np.full((nb * batch_size, t), fill, src.dtype)
    arr[:n] = src
    out[name] = arr.reshape(nb, batch_size, t)
  return out
