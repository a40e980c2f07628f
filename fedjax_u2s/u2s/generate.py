"""U2S generation for one client: pieces -> filtered instruction-response pairs.

For each piece: embed it, select k demonstrations from the example pool,
render a few-shot prompt (:mod:`~fedjax_u2s.u2s.prompts`), sample, parse
(:mod:`~fedjax_u2s.u2s.parse`), filter (:mod:`~fedjax_u2s.u2s.filters`) and
append the verdict with its provenance (:mod:`~fedjax_u2s.u2s.writer`).

Resuming: batches are fixed slices of the client's full piece list, batch ``b``
samples with seed ``batch_seed(seed, client_id, b)`` and each row with its
position in the batch as row seed, so a piece's sample does not depend on which
of its batch-mates are still to do. A rerun skips the pieces already in the
client's files (kept or rejected) and regenerates the rest exactly: the final
files equal those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from fedjax_u2s import retrieval
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.u2s import filters as filters_lib
from fedjax_u2s.u2s import parse as parse_lib
from fedjax_u2s.u2s import prompts as prompts_lib
from fedjax_u2s.u2s import writer as writer_lib

PROMPT_TOO_LONG = "prompt_too_long"
SELECTIONS = ("retrieval", "random", "fixed")


def default_config() -> ml_collections.ConfigDict:
  """U2S generation settings (locked: a misspelt override raises)."""
  c = ml_collections.ConfigDict()
  c.num_demonstrations = 3        # k: demonstrations shown per piece.
  c.selection = "retrieval"       # How demos are picked: retrieval | random | fixed.
  c.prompt_style = "multiturn"    # Demos as chat turns ("multiturn") or one message ("single").
  c.prefill = True                # Open the assistant answer with "Instruction:".
  c.max_prompt_tokens = 2048      # Prompt budget; least similar demos dropped past it (0: none).
  c.batch_size = 8                # Prompts per sampler call.
  c.pad_batches = True            # Fill short batches with copies (fewer recompiles).
  c.max_new_tokens = 256          # Generation budget per piece.
  c.stop_strings = prompts_lib.STOP_STRINGS  # Stop after the response (EOS stops too).
  c.keep_raw = False              # Store the raw generation in every record.
  c.sampling = sampler_lib.config_block()  # Strategy, bucket, decode path.
  c.filters = filters_lib.default_filter_config()  # Thresholds, see filters.py.
  c.lock()
  return c


@dataclasses.dataclass(frozen=True)
class ClientStats:
  """What one :func:`generate_client` call did.

  Attributes:
    client_id: the client.
    num_pieces: pieces given.
    skipped: pieces already done by an earlier run.
    generated: pieces processed by this run (prompt-too-long ones included).
    kept: kept pairs in the client's file (this run and earlier ones).
    rejected: rejected pieces in the client's sidecar file.
    rejected_by_reason: reason -> count, over the sidecar file.
    demos_dropped: demonstrations dropped for the prompt budget (all runs).
    seconds: wall time of this call.
  """
  client_id: int
  num_pieces: int
  skipped: int
  generated: int
  kept: int
  rejected: int
  rejected_by_reason: dict[str, int]
  demos_dropped: int
  seconds: float


def _derive(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]
             & 0x7FFFFFFF)


def batch_seed(seed: int, client_id: int, batch_index: int) -> int:
  """A 31-bit sampling seed for one batch of one client."""
  return _derive(seed, client_id, batch_index)


def selection_seed(seed: int, client_id: int) -> int:
  """A 31-bit seed for one client's demonstration selection."""
  return _derive(seed, client_id)


def make_select_fn(selection: str, pool_embeddings: np.ndarray,
                   method: str = "auto") -> Callable[[np.ndarray, int, int], np.ndarray]:
  """A ``select_fn`` over :mod:`fedjax_u2s.retrieval` (index built once).

  Args:
    selection: ``"retrieval"``, ``"random"`` or ``"fixed"`` (config.selection).
    pool_embeddings: [P, D] L2-normalised pool embeddings.
    method: index backend (``"auto"``, ``"exact"``, ``"scann"``).
  """
  if selection not in SELECTIONS:
    raise ValueError(f"config.selection={selection!r} is not one of {SELECTIONS}.")
  index = retrieval.build_index(pool_embeddings, method=method)

  def select(query_embeddings, k, seed):
    return retrieval.select_demonstrations(selection, query_embeddings, index, k, seed)

  select.index = index  # Which backend ``auto`` chose, for logs and tests.
  return select


def _pool_rows(chosen, index_of: Mapping[str, int], n: int, k: int) -> np.ndarray:
  """[n, k] pool rows from a selector's row indices or demonstration ids."""
  chosen = np.asarray(chosen)
  if chosen.shape != (n, k):
    raise ValueError(f"select_fn returned shape {chosen.shape}; expected ({n}, {k}) "
                     "(one row of k demonstrations per piece).")
  if np.issubdtype(chosen.dtype, np.integer):
    rows = chosen.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(index_of)):
      raise ValueError(f"select_fn returned pool rows outside [0, {len(index_of)}).")
    return rows
  unknown = sorted({str(x) for x in chosen.ravel()} - set(index_of))
  if unknown:
    raise ValueError(f"select_fn returned demonstration ids not in the pool: "
                     f"{unknown[:5]}.")
  return np.vectorize(lambda x: index_of[str(x)], otypes=[np.int64])(chosen)


def _r(x: float) -> float:
  return round(float(x), 6)


def generate_client(pieces: Sequence[Any], *, client_id: int, pool,
                    pool_embeddings: np.ndarray,
                    select_fn: Callable[[np.ndarray, int, int], np.ndarray],
                    embedder, sampler, params, tokenizer,
                    config: ml_collections.ConfigDict, out_dir: str,
                    generator_name: str, seed: int,
                    on_batch: Callable[[int], Any] | None = None) -> ClientStats:
  """Generates, filters and writes one client's pairs; resumable.

  Args:
    pieces: the client's pieces (``piece_id``, ``doc_id``, ``text``,
      ``start``, ``end``), in a fixed order (it defines the batches).
    client_id: the client.
    pool: demonstrations (``id``, ``text``, ``instruction``, ``response``) in
      the row order of ``pool_embeddings`` (a sequence, as
      :func:`fedjax_u2s.u2s.pool.load_pool` returns).
    pool_embeddings: [P, D] L2-normalised embeddings of the pool texts.
    select_fn: ``select(query_embeddings [Q, D], k, seed) -> [Q, k]`` pool
      row indices (or demonstration ids), most similar first.
    embedder: ``.embed(texts) -> [N, D]`` L2-normalised.
    sampler: a :class:`fedjax_u2s.sampler.Sampler` (or anything called the
      same way, returning ``.texts`` and ``.stop_reasons``).
    params: model parameters passed to ``sampler``.
    tokenizer: renders chat templates and encodes prompts.
    config: :func:`default_config`.
    out_dir: the ``generated/`` directory (see :func:`writer.generated_dir`).
    generator_name: the model name recorded in provenance.
    seed: base seed.
    on_batch: called with the number of pieces each batch finished (a
      progress bar's ``update``).

  Returns:
    :class:`ClientStats`; ``stats.json`` in ``out_dir`` is updated too.
  """
  start_time = time.perf_counter()
  pieces = list(pieces)
  ids = [str(p.piece_id) for p in pieces]
  demos = list(pool)
  pool_embeddings = np.asarray(pool_embeddings, np.float32)
  _check_inputs(config, client_id, ids, demos, pool_embeddings)
  index_of = {str(d.id): i for i, d in enumerate(demos)}

  writer = writer_lib.ClientWriter(out_dir, client_id)
  done = writer.done_ids()
  skipped = sum(i in done for i in ids)
  tracker = filters_lib.DuplicateTracker(
      config.filters, [(r["instruction"], r["response"]) for r in writer.kept])
  generated = 0

  if skipped < len(pieces):
    piece_emb, rows, retrieval = _retrieve(
        pieces, embedder, select_fn, pool_embeddings, index_of,
        min(int(config.num_demonstrations), len(demos)),
        selection_seed(seed, client_id))
    strategy = sampler_lib.strategy_from_config(config.sampling)
    bs = int(config.batch_size)
    for b in range(0, -(-len(pieces) // bs)):
      members = [i for i in range(b * bs, min((b + 1) * bs, len(pieces)))
                 if ids[i] not in done]
      if not members:
        continue
      bseed = batch_seed(seed, client_id, b)
      prompts = {i: prompts_lib.build_prompt(
          tokenizer, pieces[i].text, [demos[j] for j in rows[i]],
          style=config.prompt_style, prefill=config.prefill,
          max_prompt_tokens=config.max_prompt_tokens) for i in members}
      to_sample = [i for i in members if prompts[i].fits]
      texts, reasons = _sample(sampler, params, prompts, to_sample, b * bs, bs, bseed,
                               strategy, config)
      parsed = [parse_lib.parse_pair(texts[i]) for i in to_sample]
      verdicts = dict(zip(to_sample, filters_lib.apply_filters(
          parsed, piece_emb[to_sample],
          [[demos[index_of[d]].instruction for d in prompts[i].demo_ids]
           for i in to_sample],
          tracker, embedder, config.filters,
          piece_texts=[pieces[i].text for i in to_sample])))
      parsed = dict(zip(to_sample, parsed))
      kept, rejected = [], []
      for i in members:
        p, pr = pieces[i], prompts[i]
        base = {"client_id": int(client_id), "piece_id": ids[i],
                "doc_id": str(p.doc_id), "start": int(p.start), "end": int(p.end)}
        prov = {"demo_ids": list(pr.demo_ids),
                "retrieval_scores": [_r(s) for s in retrieval[i, :len(pr.demo_ids)]],
                "num_demos_dropped": pr.num_dropped,
                "generator": generator_name, "seed": int(seed), "batch": b,
                "batch_seed": bseed, "row_seed": i - b * bs,
                "prompt_style": config.prompt_style, "selection": config.selection}
        if not pr.fits:
          rejected.append({**base, "reason": PROMPT_TOO_LONG, "scores": {}, **prov,
                           "prompt_tokens": len(pr.token_ids)})
          continue
        is_kept, fields, extra = _record(verdicts[i], parsed[i], texts[i], reasons[i],
                                         config)
        (kept if is_kept else rejected).append({**base, **fields, **prov, **extra})
      writer.append(kept, rejected)
      generated += len(members)
      if on_batch is not None:
        on_batch(len(members))
      logging.info("client %d batch %d: %d kept, %d rejected", client_id, b,
                   len(kept), len(rejected))

  counts = writer.counts()
  writer_lib.update_stats(out_dir, client_id, counts)
  logging.info("client %d: %d pieces, %d already done, %d processed now; %d kept, "
               "%d rejected in total %s", client_id, len(pieces), skipped, generated,
               counts["kept"], counts["rejected"], counts["rejected_by_reason"])
  return ClientStats(client_id=int(client_id), num_pieces=len(pieces), skipped=skipped,
                     generated=generated, kept=counts["kept"],
                     rejected=counts["rejected"],
                     rejected_by_reason=counts["rejected_by_reason"],
                     demos_dropped=counts["demos_dropped"],
                     seconds=time.perf_counter() - start_time)


def _check_inputs(config, client_id: int, ids: list[str], demos: list,
                  pool_embeddings: np.ndarray) -> None:
  """Refuses settings and inputs :func:`generate_client` cannot honour."""
  if config.prompt_style not in prompts_lib.STYLES:
    raise ValueError(f"config.prompt_style={config.prompt_style!r} is not one of "
                     f"{prompts_lib.STYLES}.")
  if config.selection not in SELECTIONS:
    raise ValueError(f"config.selection={config.selection!r} is not one of "
                     f"{SELECTIONS}.")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}.")
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise ValueError(f"client {client_id}: piece_id {dup!r} appears more than once; "
                     "piece ids must be unique within a client.")
  if len(demos) != len(pool_embeddings):
    raise ValueError(f"pool has {len(demos)} demonstrations but pool_embeddings has "
                     f"{len(pool_embeddings)} rows.")


def _retrieve(pieces: list, embedder, select_fn, pool_embeddings: np.ndarray,
              index_of: Mapping[str, int], k: int, sel_seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every piece's embedding, its k demonstrations' pool rows and their scores.

  Returns:
    ``(piece embeddings [N, D], pool rows [N, k], cosine scores [N, k])``.
  """
  piece_emb = np.asarray(embedder.embed([p.text for p in pieces]), np.float32)
  if not k:
    rows = np.zeros((len(pieces), 0), np.int64)
    return piece_emb, rows, rows
  rows = _pool_rows(select_fn(piece_emb, k, sel_seed), index_of, len(pieces), k)
  return piece_emb, rows, np.einsum("qd,qkd->qk", piece_emb, pool_embeddings[rows])


def _sample(sampler, params, prompts: Mapping[int, Any], to_sample: list[int],
            first: int, bs: int, bseed: int, strategy, config
            ) -> tuple[dict[int, str], dict[int, str]]:
  """One sampler call for a batch's prompts that fit; texts and stop reasons.

  Row seeds are the rows' positions in the batch (``i - first``), so a piece
  draws the same text whichever other pieces of its batch are done already.
  """
  if not to_sample:
    return {}, {}
  batch = [prompts[i].token_ids for i in to_sample]
  row_seeds = [i - first for i in to_sample]
  if config.pad_batches:  # Same batch shape every call; extra rows dropped.
    filler = bs - len(batch)
    batch += [batch[-1]] * filler
    row_seeds += list(range(bs, bs + filler))
  out = sampler(params, batch, max_new_tokens=config.max_new_tokens,
                strategy=strategy, stop_strings=tuple(config.stop_strings),
                seed=bseed, row_seeds=row_seeds)
  texts, reasons = {}, {}
  for i, text, reason in zip(to_sample, out.texts, out.stop_reasons):
    texts[i], reasons[i] = prompts[i].prefix + text, reason
  return texts, reasons


def _record(verdict, parsed, text: str, stop_reason: str, config
            ) -> tuple[bool, dict[str, Any], dict[str, Any]]:
  """``(kept, the record's verdict fields, its generation fields)`` of a sampled piece.

  The caller places provenance between the two, the order of the written keys.
  """
  scores = {name: _r(s) for name, s in verdict.scores.items()}
  extra = {"stop_reason": stop_reason}
  if config.keep_raw:
    extra["raw"] = text
  if verdict.kept:
    return True, {"instruction": parsed.instruction, "response": parsed.response,
                  "grounding": scores.get("grounding"),
                  "support": scores.get("support"), "scores": scores}, extra
  fields = {"reason": verdict.reason, "scores": scores}
  if verdict.reason == filters_lib.UNGROUNDED:
    # What the piece does not hold, and the pair, to audit the filter by.
    fields.update(instruction=parsed.instruction, response=parsed.response)
    if verdict.unsupported:
      fields["unsupported"] = list(verdict.unsupported)
  return False, fields, extra
