"""Training-data extraction audit (FedPIT, issue 17 item 3).

An attack in the style of Carlini et al. ("Extracting Training Data from Large
Language Models", 2021; "Quantifying Memorization Across Neural Language
Models", 2023) on a model (base, or base + LoRA) tuned on instruction pairs:

* **Extraction.** For every training example (a *member*), the model is
  prompted with its instruction exactly as training saw it (the chat
  template's prompt, :func:`fedjax_u2s.data.instructions.tokenize`), plus
  the first ``prefix_tokens`` tokens of the response appended to the
  assistant turn, and decodes greedily (the jitted
  :class:`fedjax_u2s.sampler.Sampler`, batched, with the adapter). The
  *reference continuation* is the rest of the training target: the response
  tokens after the prefix and the end-of-turn token that closes them (what
  the response-only loss trains on).

  - *verbatim*: the first ``k = min(min_tokens, len(reference))`` generated
    tokens equal the reference's first ``k``: the next ``min_tokens`` (20)
    tokens exactly, or, for a shorter reference, the whole rest of the
    response and the end-of-turn token (the model stops where the response
    does).
  - *near-verbatim*: ROUGE-L F1 (token LCS, :func:`rouge_l`) between the
    generated tokens and the reference's first ``max_new_tokens`` tokens is
    at least ``near_threshold`` (0.9). With the default ``max_new_tokens ==
    min_tokens`` every verbatim extraction is near-verbatim too.

  Rates are over the members audited, with Wilson 95% intervals
  (:func:`wilson_interval`). The same attack on the non-members
  (``baseline``) gives the rate at which the model "extracts" text it never
  trained on (text it knows from pretraining, or short formulaic answers):
  a member rate is only evidence of memorization above that baseline.

* **Loss-based membership inference.** The mean response-token loss of each
  example (the training loss: the same tokens and target mask), members vs
  held-out non-members of the same distribution; the attack says "member"
  below a threshold, and its AUC over all thresholds is the Mann-Whitney U
  statistic with ties counted half (:func:`mia_auc`), with a stratified
  percentile bootstrap interval over examples (fixed seed,
  :func:`bootstrap_auc_interval`). AUC 0.5 is chance.

::

    result = audit(model.config, model.params, model.tokenizer,
                   members={"client_0": exs0, "client_1": exs1},
                   non_members=heldout, lora=lora, lora_config=lora_config)
    print(report.audit_table({"fedpit": result}))
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.data import instructions
from fedjax_u2s.evaluation import scoring
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# Two-sided 95% normal quantile.
Z95 = 1.959963984540054
# Defaults of the attack (Carlini et al. 2021 use 50-token prefixes of web
# text; an instruction is the natural prefix here, and 20 tokens is the
# shortest run they count as extraction in "Quantifying Memorization").
MIN_TOKENS = 20
NEAR_THRESHOLD = 0.9
BOOTSTRAP_RESAMPLES = 2000
AUC_CI_METHOD = "stratified percentile bootstrap over examples"

# Why an example is not audited (keys of ``result["skipped"]``).
PROMPT_TOO_LONG = instructions.PROMPT_TOO_LONG  # tokenize: no target left
EMPTY_RESPONSE = instructions.EMPTY_RESPONSE    # tokenize: no response tokens
PREFIX_COVERS_RESPONSE = "prefix_covers_response"  # extraction only


# ----------------------------------------------------------------------------
# Statistics (pure, hand-checked in tests).


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common subsequence of two token sequences.

  The dynamic program row by row: ``L[i, j] = max(L[i, j-1], L[i-1, j],
  L[i-1, j-1] + 1 if a[i] == b[j])``; the ``L[i, j-1]`` term unrolls into a
  running maximum along the row (``np.maximum.accumulate``), since the other
  two terms never exceed ``L[i-1, j-1] + 1`` -- so each row is three
  vectorised numpy operations. O(len(a) * len(b)) time, O(len(b)) memory.
  """
  a = np.asarray(a, np.int64).ravel()
  b = np.asarray(b, np.int64).ravel()
  if a.size == 0 or b.size == 0:
    return 0
  prev = np.zeros(b.size + 1, np.int64)  # L[i-1, :], L[i-1, 0] = 0
  for x in a:
    diag = np.where(b == x, prev[:-1] + 1, 0)           # [len(b)]
    row = np.maximum(prev[1:], diag)
    prev = np.concatenate([[0], np.maximum.accumulate(row)])
  return int(prev[-1])


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> dict[str, float]:
  """ROUGE-L of two token sequences (Lin 2004, beta = 1).

  Returns:
    ``{"lcs", "precision": lcs / len(candidate), "recall": lcs /
    len(reference), "f1": harmonic mean}``; an empty side gives 0 (two empty
    sequences give f1 1).
  """
  nc, nr = len(candidate), len(reference)
  if nc == 0 and nr == 0:
    return {"lcs": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
  lcs = lcs_length(candidate, reference)
  p = lcs / nc if nc else 0.0
  r = lcs / nr if nr else 0.0
  f1 = 2 * p * r / (p + r) if lcs else 0.0
  return {"lcs": lcs, "precision": p, "recall": r, "f1": f1}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion ``k / n``.

  ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; unlike the
  normal interval it stays inside [0, 1] and is not empty at k = 0 (the
  usual case here). ``n = 0`` gives ``(0, 1)``: nothing is known.
  """
  if n < 0 or not 0 <= k <= n:
    raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}.")
  if n == 0:
    return 0.0, 1.0
  p = k / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # At k = 0 (k = n) the bound is exactly 0 (1); in floating point it comes
  # out a rounding error away, e.g. 7e-18.
  lo = 0.0 if k == 0 else max(0.0, center - half)
  hi = 1.0 if k == n else min(1.0, center + half)
  return lo, hi


def auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
  """P(score of a positive > score of a negative), ties counted half.

  The Mann-Whitney U statistic over ``n1 * n0``, computed exactly from
  mid-ranks: ``(sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0)``.
  NaN when either side is empty.
  """
  pos = np.asarray(positive_scores, np.float64).ravel()
  neg = np.asarray(negative_scores, np.float64).ravel()
  if pos.size == 0 or neg.size == 0:
    return float("nan")
  if np.isnan(pos).any() or np.isnan(neg).any():
    raise ValueError("auc: scores must not be NaN.")
  ranks = _average_ranks(np.concatenate([pos, neg]))
  u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2
  return float(u / (pos.size * neg.size))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x``, ties given the mean of the ranks they span."""
  order = np.argsort(x, kind="stable")
  sx = x[order]
  starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
  ends = np.r_[starts[1:], len(sx)]
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
  return ranks


def mia_auc(member_losses: Sequence[float], non_member_losses: Sequence[float]) -> float:
  """AUC of the loss attack "lower loss => member" (ties half)."""
  return auc(-np.asarray(member_losses, np.float64),
             -np.asarray(non_member_losses, np.float64))


def bootstrap_auc_interval(member_losses: Sequence[float],
                           non_member_losses: Sequence[float], *,
                           num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of :func:`mia_auc`.

  Members and non-members are resampled separately with replacement (each
  set keeps its size, so every resample has both classes), with
  ``np.random.default_rng(seed)``: the same inputs give the same interval.
  NaN bounds when either set is empty.
  """
  m = np.asarray(member_losses, np.float64).ravel()
  nm = np.asarray(non_member_losses, np.float64).ravel()
  if m.size == 0 or nm.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  values = np.empty(num_resamples)
  for i in range(num_resamples):
    values[i] = mia_auc(m[rng.integers(0, m.size, m.size)],
                        nm[rng.integers(0, nm.size, nm.size)])
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return float(lo), float(hi)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
  """Number of leading tokens ``a`` and ``b`` share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def is_verbatim(generated: Sequence[int], reference: Sequence[int],
                min_tokens: int = MIN_TOKENS) -> bool:
  """The first ``min(min_tokens, len(reference))`` tokens of both agree."""
  if not reference:
    raise ValueError("is_verbatim: empty reference.")
  k = min(min_tokens, len(reference))
  return len(generated) >= k and list(generated[:k]) == list(reference[:k])


# ----------------------------------------------------------------------------
# Tokenization: exactly as in training.


def split_targets(examples: Sequence[instructions.Example], tokenizer,
                  max_length: int) -> tuple[list[tuple[list[int], list[int]] | None],
                                            dict[str, int]]:
  """The (prompt ids, target ids) of each example, as training tokenizes it.

  :func:`fedjax_u2s.data.instructions.tokenize` renders each example with the
  chat template; the target is the run of ``loss_mask`` tokens (the response
  and its end-of-turn token), the prompt everything before it (BOS, system
  and user turns, assistant header).

  Returns:
    One entry per example (None where tokenize dropped it), and the drop
    counts by reason.
  """
  if not examples:
    return [], {PROMPT_TOO_LONG: 0, EMPTY_RESPONSE: 0}
  ts = instructions.tokenize(examples, tokenizer, max_length, log=False)
  out: list[tuple[list[int], list[int]] | None] = [None] * len(examples)
  for row, src in enumerate(ts.source_index):
    where = np.flatnonzero(ts.loss_mask[row])
    first, last = int(where[0]), int(where[-1])
    if where.size != last - first + 1:  # tokenize's mask is one run.
      raise AssertionError(f"Example {src}: the loss mask is not contiguous.")
    toks = [int(t) for t in ts.tokens[row]]
    out[int(src)] = (toks[:first], toks[first:last + 1])
  return out, dict(ts.drops.dropped)


def _flatten(examples) -> tuple[list[instructions.Example], list[Any]]:
  """Examples and their client ids (None for a plain list)."""
  if isinstance(examples, Mapping):
    exs, clients = [], []
    for client, client_exs in examples.items():
      exs += list(client_exs)
      clients += [client] * len(client_exs)
    return exs, clients
  exs = list(examples)
  return exs, [None] * len(exs)


# ----------------------------------------------------------------------------
# The attack.


def extract(sampler, params: PyTree, prompts: Sequence[Sequence[int]],
            references: Sequence[Sequence[int]], *, max_new_tokens: int,
            min_tokens: int = MIN_TOKENS, near_threshold: float = NEAR_THRESHOLD,
            batch_size: int = 8, lora: PyTree | None = None,
            lora_config: lora_lib.LoraConfig | None = None) -> list[dict]:
  """Greedy continuations of ``prompts`` compared with ``references``.

  Prompts are sorted by length and decoded ``batch_size`` at a time (the last
  batch filled with copies, so every call has one shape).

  Args:
    sampler: a :class:`fedjax_u2s.sampler.Sampler` (or anything with its call
      signature returning ``.tokens`` and ``.stop_reasons``).
    params: base parameters.
    prompts: token ids of each prompt (instruction + response prefix).
    references: the reference continuation of each prompt (non-empty).
    max_new_tokens: decoding budget; the ROUGE-L window.
    min_tokens: tokens that must match for a verbatim extraction.
    near_threshold: ROUGE-L F1 at or above which an output is near-verbatim.
    batch_size: rows per sampler call.
    lora, lora_config: the adapter, if any.

  Returns:
    Per prompt: ``generated`` (ids, the end-of-turn token included when the
    row stopped on it), ``stop_reason``, ``reference_tokens`` (length of the
    whole reference), ``compared_tokens`` (k), ``matched_prefix`` (leading
    tokens that agree), ``verbatim``, ``rouge_l`` (F1 over the window),
    ``near_verbatim``.
  """
  if len(prompts) != len(references):
    raise ValueError(f"{len(prompts)} prompts for {len(references)} references.")
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  generated: list[list[int] | None] = [None] * len(prompts)
  reasons: list[str | None] = [None] * len(prompts)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    batch = [list(prompts[i]) for i in idx]
    batch += [batch[-1]] * (batch_size - len(batch))
    out = sampler(params, batch, max_new_tokens=max_new_tokens,
                  strategy=sampler_lib.Greedy(), lora=lora,
                  lora_config=lora_config if lora is not None else None)
    for j, i in enumerate(idx):
      generated[i] = [int(t) for t in out.tokens[j]][:max_new_tokens]
      reasons[i] = out.stop_reasons[j]
  records = []
  for gen, reason, ref in zip(generated, reasons, references):
    ref = [int(t) for t in ref]
    window = ref[:max_new_tokens]
    f1 = rouge_l(gen, window)["f1"]
    records.append(dict(
        generated=gen, stop_reason=reason, reference_tokens=len(ref),
        compared_tokens=min(min_tokens, len(ref)),
        matched_prefix=common_prefix_length(gen, ref),
        verbatim=is_verbatim(gen, ref, min_tokens), rouge_l=f1,
        near_verbatim=f1 >= near_threshold))
  return records


def _rate(records: Sequence[dict], field: str) -> dict:
  k, n = sum(bool(r[field]) for r in records), len(records)
  lo, hi = wilson_interval(k, n)
  return {"count": k, "rate": k / n if n else float("nan"), "ci": [lo, hi]}


def _extraction_summary(records: Sequence[dict]) -> dict:
  v, nv = _rate(records, "verbatim"), _rate(records, "near_verbatim")
  return {"n": len(records), "verbatim": v["count"], "verbatim_rate": v["rate"],
          "verbatim_ci": v["ci"], "near_verbatim": nv["count"],
          "near_verbatim_rate": nv["rate"], "near_verbatim_ci": nv["ci"]}


def audit(model_config: ModelConfig, params: PyTree, tokenizer,
          members: Sequence[instructions.Example] | Mapping[Any, Sequence[instructions.Example]],
          non_members: Sequence[instructions.Example], *,
          lora: PyTree | None = None, lora_config: lora_lib.LoraConfig | None = None,
          prefix_tokens: int = 0, min_tokens: int = MIN_TOKENS,
          max_new_tokens: int | None = None, near_threshold: float = NEAR_THRESHOLD,
          baseline: bool = True, batch_size: int = 8, max_length: int = 1024,
          length_multiple: int = 32, decode: str = "auto",
          num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
          keep_text: bool = True, sampler=None,
          logprob_fn: scoring.LogprobFn | None = None) -> dict:
  """Extraction and loss-based membership inference against one model.

  Args:
    model_config: the decoder's config.
    params: base parameters.
    tokenizer: a :class:`fedjax_u2s.tokenizer.Tokenizer` with a chat template
      (anything :func:`fedjax_u2s.data.instructions.tokenize` and the sampler
      accept).
    members: the training examples: a list, or ``{client id: list}`` (then
      each record names its client and ``per_client`` counts extraction by
      client).
    non_members: held-out examples of the same distribution (may be empty:
      then no AUC).
    lora, lora_config: the adapter under attack, if any (sampler and loss).
    prefix_tokens: response tokens given after the instruction (0: the
      instruction alone). Examples whose response is not longer than this
      are not audited for extraction (``skipped``).
    min_tokens: generated tokens that must equal the reference for a
      verbatim extraction (fewer when the reference is shorter).
    max_new_tokens: decoding budget and ROUGE-L window; default
      ``min_tokens``; at least ``min_tokens``.
    near_threshold: ROUGE-L F1 for a near-verbatim extraction.
    baseline: run the extraction on the non-members too.
    batch_size: rows per sampler call and per forward pass.
    max_length: tokenization length (longer examples are cut from the right,
      as in training with this ``max_length``).
    length_multiple: padded prompt / row lengths are multiples of this.
    decode: the sampler's decode path (:mod:`fedjax_u2s.decoding`).
    num_resamples, seed: of the AUC bootstrap.
    keep_text: records carry the decoded generated and reference windows
      (the evidence of an extraction; drop them to share counts only).
    sampler: replaces the :class:`fedjax_u2s.sampler.Sampler` (tests).
    logprob_fn: replaces the decoder's log-probs (tests).

  Returns:
    A JSON-ready dict: ``n`` (members audited for extraction), ``verbatim``,
    ``verbatim_rate``, ``verbatim_ci`` (Wilson 95%), ``near_verbatim``,
    ``near_verbatim_rate``, ``near_verbatim_ci``; ``baseline`` (the same on
    the non-members, or None); ``mia_auc``, ``mia_auc_ci``,
    ``mia_auc_ci_method``, ``n_members``, ``n_non_members`` (scored for
    membership), ``member_loss`` / ``non_member_loss`` (means);
    ``per_client``; ``skipped`` (``{"members" | "non_members": {reason:
    count}}``); ``settings``; ``seconds`` (extraction, scoring); and
    ``records``, one per example: ``set`` ("member" / "non_member"),
    ``index`` (in its input list), ``client``, ``meta``, ``loss``,
    ``target_tokens`` and, where audited for extraction, the fields of
    :func:`extract` (``generated`` ids replaced by ``generated_text`` and
    ``reference_text`` when ``keep_text``, else dropped).
  """
  if lora is not None and lora_config is None:
    raise ValueError("audit(lora=...) needs lora_config.")
  if prefix_tokens < 0:
    raise ValueError(f"prefix_tokens must be >= 0, got {prefix_tokens}.")
  if min_tokens < 1:
    raise ValueError(f"min_tokens must be >= 1, got {min_tokens}.")
  max_new_tokens = min_tokens if max_new_tokens is None else max_new_tokens
  if max_new_tokens < min_tokens:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= min_tokens "
                     f"({min_tokens}): a shorter output cannot match them.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  member_exs, clients = _flatten(members)
  non_member_exs = list(non_members)
  if not member_exs:
    raise ValueError("audit needs at least one member example.")
  eos = set(int(e) for e in getattr(tokenizer, "eos_ids", ()) or ())

  records, skipped = [], {}
  for name, exs, who in (("member", member_exs, clients),
                         ("non_member", non_member_exs, [None] * len(non_member_exs))):
    split, drops = split_targets(exs, tokenizer, max_length)
    drops[PREFIX_COVERS_RESPONSE] = 0
    for i, (ex, pt, client) in enumerate(zip(exs, split, who)):
      if pt is None:
        continue
      prompt, target = pt
      content = len(target) - (1 if target[-1] in eos else 0)
      rec = dict(set=name, index=i, client=client, meta=dict(ex.meta),
                 target_tokens=len(target), _prompt=prompt, _target=target)
      rec["_extract"] = name == "member" or baseline
      if rec["_extract"] and content <= prefix_tokens:
        rec["_extract"] = False
        drops[PREFIX_COVERS_RESPONSE] += 1
      records.append(rec)
    skipped[name + "s"] = drops

  # Extraction.
  start = time.perf_counter()
  todo = [r for r in records if r["_extract"]]
  if todo:
    if sampler is None:
      sampler = sampler_lib.Sampler(model_config, tokenizer,
                                    pad_multiple=length_multiple, decode=decode)
    found = extract(sampler, params,
                    [r["_prompt"] + r["_target"][:prefix_tokens] for r in todo],
                    [r["_target"][prefix_tokens:] for r in todo],
                    max_new_tokens=max_new_tokens, min_tokens=min_tokens,
                    near_threshold=near_threshold, batch_size=batch_size,
                    lora=lora, lora_config=lora_config)
    for r, f in zip(todo, found):
      gen = f.pop("generated")
      if keep_text:
        ref = r["_target"][prefix_tokens:prefix_tokens + max_new_tokens]
        f["generated_text"] = tokenizer.decode(gen)
        f["reference_text"] = tokenizer.decode(ref)
        if prefix_tokens:
          f["prefix_text"] = tokenizer.decode(r["_target"][:prefix_tokens])
      r.update(f)
  extraction_s = time.perf_counter() - start

  # Membership inference: mean target-token loss, the training loss.
  start = time.perf_counter()
  if logprob_fn is None:
    logprob_fn = scoring.llama_logprob_fn(model_config, params, lora=lora,
                                          lora_config=lora_config)
  scores = scoring.score_continuations(
      logprob_fn, [(r["_prompt"], r["_target"]) for r in records],
      batch_size=batch_size, pad_id=int(tokenizer.pad_id), max_length=None,
      length_multiple=length_multiple)
  for r, s in zip(records, scores):
    r["loss"] = -s.logprob / s.num_tokens
  scoring_s = time.perf_counter() - start

  m_loss = [r["loss"] for r in records if r["set"] == "member"]
  nm_loss = [r["loss"] for r in records if r["set"] == "non_member"]
  auc_value = mia_auc(m_loss, nm_loss)
  auc_ci = bootstrap_auc_interval(m_loss, nm_loss, num_resamples=num_resamples,
                                  seed=seed)

  audited = [r for r in records if r["set"] == "member" and r["_extract"]]
  result = _extraction_summary(audited)
  base_recs = [r for r in records if r["set"] == "non_member" and r["_extract"]]
  result["baseline"] = _extraction_summary(base_recs) if baseline else None
  per_client = {}
  if isinstance(members, Mapping):
    for client in members:
      rs = [r for r in audited if r["client"] == client]
      per_client[str(client)] = {"n": len(rs),
                                 "verbatim": sum(r["verbatim"] for r in rs),
                                 "near_verbatim": sum(r["near_verbatim"] for r in rs)}

  def nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x

  result.update(
      mia_auc=nan_to_none(auc_value),
      mia_auc_ci=[nan_to_none(auc_ci[0]), nan_to_none(auc_ci[1])],
      mia_auc_ci_method=f"{AUC_CI_METHOD} ({num_resamples} resamples, seed {seed})",
      n_members=len(m_loss), n_non_members=len(nm_loss),
      member_loss=float(np.mean(m_loss)) if m_loss else None,
      non_member_loss=float(np.mean(nm_loss)) if nm_loss else None,
      per_client=per_client, skipped=skipped,
      settings=dict(prefix_tokens=prefix_tokens, min_tokens=min_tokens,
                    max_new_tokens=max_new_tokens, near_threshold=near_threshold,
                    max_length=max_length, adapter=lora is not None),
      seconds=dict(extraction=extraction_s, scoring=scoring_s))
  for key in ("verbatim_rate", "near_verbatim_rate"):
    result[key] = nan_to_none(result[key])
  if result["baseline"] is not None:
    for key in ("verbatim_rate", "near_verbatim_rate"):
      result["baseline"][key] = nan_to_none(result["baseline"][key])
  for r in records:
    del r["_prompt"], r["_target"]
    r["audited"] = r.pop("_extract")
  result["records"] = records
  logging.info("Extraction audit: %d/%d verbatim, %d/%d near-verbatim; MIA AUC %s "
               "(%d members, %d non-members)", result["verbatim"], result["n"],
               result["near_verbatim"], result["n"], result["mia_auc"],
               len(m_loss), len(nm_loss))
  return result


def pool(results: Sequence[dict], *, num_resamples: int = BOOTSTRAP_RESAMPLES,
         seed: int = 0) -> dict:
  """Audits of several models, each against its own members, as one.

  FedPIT's personal models are audited one per client (client ``c``'s model
  against client ``c``'s examples); pooled, the rates answer "what share of
  the real examples can be extracted from the model that holds them". Counts
  add up; intervals are recomputed; the AUC is over all member against all
  non-member losses, each scored under its own model.
  """
  if not results:
    raise ValueError("pool needs at least one audit result.")
  records = [dict(r) for res in results for r in res["records"]]
  audited = [r for r in records if r["set"] == "member" and r.get("audited")]
  out = _extraction_summary(audited)
  m_loss = [r["loss"] for r in records if r["set"] == "member"]
  nm_loss = [r["loss"] for r in records if r["set"] == "non_member"]
  auc_value = mia_auc(m_loss, nm_loss)
  lo, hi = bootstrap_auc_interval(m_loss, nm_loss, num_resamples=num_resamples,
                                  seed=seed)

  def clean(x):
    return None if isinstance(x, float) and math.isnan(x) else x

  out.update(
      mia_auc=clean(auc_value), mia_auc_ci=[clean(lo), clean(hi)],
      mia_auc_ci_method=f"{AUC_CI_METHOD} ({num_resamples} resamples, seed {seed}), "
                        f"pooled over {len(results)} models",
      n_members=len(m_loss), n_non_members=len(nm_loss),
      member_loss=float(np.mean(m_loss)) if m_loss else None,
      non_member_loss=float(np.mean(nm_loss)) if nm_loss else None,
      baseline=None, settings=results[0]["settings"],
      per_client={k: v for res in results for k, v in res.get("per_client", {}).items()})
  for key in ("verbatim_rate", "near_verbatim_rate"):
    out[key] = clean(out[key])
  return out
