"""Pure scoring functions: log-likelihoods, batching, answer extraction.

Everything here is a function of arrays, token ids or strings, so the tests
can check exact numbers with a fake model. The convention for a "model" is a
*log-prob function*::

    logprob_fn(tokens [B, T] int32, input_mask [B, T] bool) -> [B, T-1] float32

whose entry ``[b, t]`` is ``log p(tokens[b, t+1] | tokens[b, :t+1])``. The real
decoder is wrapped by :func:`llama_logprob_fn`; tests wrap hand-written logits
with :func:`logprob_fn_from_logits`.

Continuations (multiple-choice options, perplexity responses) are scored by
concatenating *separately tokenized* context and continuation ids. This keeps
the boundary exact (the continuation's tokens are the continuation, never a
token merged across the boundary), at the cost of a tokenization that may
differ from tokenizing the joined text. With a chat template the boundary is
the end of the assistant header (a newline), where a byte-level BPE would
split anyway, so the two agree in practice.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import re
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

PyTree = Any
LogprobFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Log-probabilities of sequences.


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token log-probs: ``[B, T, V]`` logits, ``[B, T]`` ids -> ``[B, T-1]``.

  Entry ``[b, t]`` is ``log_softmax(logits[b, t])[tokens[b, t+1]]``.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def logprob_fn_from_logits(logits_fn: Callable[[jax.Array, jax.Array], jax.Array]
                           ) -> LogprobFn:
  """Wraps ``logits_fn(tokens, input_mask) -> [B, T, V]`` as a log-prob function."""

  def fn(tokens, input_mask):
    return logprobs_from_logits(logits_fn(tokens, input_mask), tokens)

  return fn


@functools.partial(jax.jit, static_argnames=("config", "lora_config", "chunk"))
def llama_token_logprobs(params: PyTree, tokens: jax.Array, input_mask: jax.Array,
                         lora: PyTree | None = None, *, config: ModelConfig,
                         lora_config: lora_lib.LoraConfig | None = None,
                         chunk: int = 32) -> jax.Array:
  """Next-token log-probs of the decoder, ``[B, T-1]``, without ``[B, T, V]``.

  The LM head and the log-softmax run over ``chunk`` positions at a time
  (``lax.map``), so memory is ``B * chunk * V`` floats instead of
  ``B * T * V`` (49k-entry vocabularies make the latter large).

  Args:
    params: base parameters.
    tokens: [B, T] int32, right-padded.
    input_mask: [B, T] bool, False at padding.
    lora: optional adapter, applied in every layer.
    config, lora_config: static.
    chunk: positions per LM-head chunk (static); used when it divides T.
  """
  b, t = tokens.shape
  hidden, _ = llama.forward(params, tokens, config=config, input_mask=input_mask,
                            lora=lora, lora_config=lora_config, return_hidden=True)
  # Position t predicts tokens[:, t+1]; the last position predicts nothing
  # (target 0, dropped below).
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
  c = chunk if t % chunk == 0 else t
  h = hidden.reshape(b, t // c, c, -1).swapaxes(0, 1)       # [n, B, c, D]
  tg = targets.reshape(b, t // c, c).swapaxes(0, 1)         # [n, B, c]

  def one(args):
    hc, tc = args
    logits = llama.logits_from_hidden(params, hc, config=config)  # [B, c, V]
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  out = jax.lax.map(one, (h, tg)).swapaxes(0, 1).reshape(b, t)
  return out[:, :-1]


def llama_logprob_fn(config: ModelConfig, params: PyTree, *, lora: PyTree | None = None,
                     lora_config: lora_lib.LoraConfig | None = None) -> LogprobFn:
  """A log-prob function for the decoder (base params + optional LoRA)."""
  if lora is not None and lora_config is None:
    raise ValueError("lora was given without lora_config.")

  def fn(tokens, input_mask):
    return llama_token_logprobs(params, tokens, input_mask, lora, config=config,
                                lora_config=lora_config if lora is not None else None)

  return fn


# ----------------------------------------------------------------------------
# Batched continuation scoring.


@dataclasses.dataclass(frozen=True)
class ContinuationScore:
  """Log-likelihood of one continuation given its context.

  Attributes:
    logprob: sum of the continuation tokens' log-probs.
    num_tokens: number of continuation tokens scored.
    truncated: context tokens dropped from the left to fit ``max_length``.
  """
  logprob: float
  num_tokens: int
  truncated: int = 0


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pack_right_padded(pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      length: int, pad_id: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Context+continuation rows, right-padded to ``length``.

  Returns:
    tokens [B, length] int32, input_mask [B, length] bool, and target_mask
    [B, length - 1] bool: True where ``tokens[:, t+1]`` is a continuation
    token (aligned with the output of a log-prob function).
  """
  n = len(pairs)
  tokens = np.full((n, length), pad_id, np.int32)
  input_mask = np.zeros((n, length), bool)
  target_mask = np.zeros((n, length - 1), bool)
  for i, (ctx, cont) in enumerate(pairs):
    row = list(ctx) + list(cont)
    if len(row) > length:
      raise ValueError(f"Row {i} has {len(row)} tokens, more than length={length}.")
    tokens[i, :len(row)] = row
    input_mask[i, :len(row)] = True
    target_mask[i, len(ctx) - 1:len(row) - 1] = True
  return tokens, input_mask, target_mask


def score_continuations(logprob_fn: LogprobFn,
                        pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int, pad_id: int, max_length: int | None = None,
                        length_multiple: int = 32,
                        progress: Callable[[int], None] | None = None
                        ) -> list[ContinuationScore]:
  """Sums the log-probs of each continuation given its context, in batches.

  Rows are sorted by length, cut into batches of exactly ``batch_size`` rows
  (the last one filled with copies of a row, then ignored) and right-padded
  to a multiple of ``length_multiple``, so the log-prob function sees few
  distinct shapes (one compile each). A context longer than fits is cut from
  the left; the continuation is always kept whole.

  Args:
    logprob_fn: see the module docstring.
    pairs: ``(context_ids, continuation_ids)``; the context needs at least
      one token (the first continuation token is predicted from it) and the
      continuation at least one.
    batch_size: rows per forward pass.
    pad_id: id used for padding (masked out).
    max_length: longest row, in tokens (None: no limit).
    length_multiple: padded lengths are rounded up to this.
    progress: called with the number of rows after each batch.

  Returns:
    One :class:`ContinuationScore` per pair, in input order.
  """
  rows, truncated = [], []
  for i, (ctx, cont) in enumerate(pairs):
    ctx, cont = list(ctx), list(cont)
    if not ctx or not cont:
      raise ValueError(f"Pair {i}: context and continuation need >= 1 token each "
                       f"(got {len(ctx)} and {len(cont)}).")
    cut = 0
    if max_length is not None and len(ctx) + len(cont) > max_length:
      cut = len(ctx) + len(cont) - max_length
      if cut >= len(ctx):
        raise ValueError(f"Pair {i}: the continuation alone ({len(cont)} tokens) "
                         f"does not fit max_length={max_length}.")
      ctx = ctx[cut:]
    rows.append((ctx, cont))
    truncated.append(cut)
  order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
  sums = np.zeros(len(rows), np.float64)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    batch = [rows[i] for i in idx]
    batch += [batch[-1]] * (batch_size - len(batch))
    longest = max(len(c) + len(o) for c, o in batch)
    length = round_up(longest, length_multiple)
    if max_length is not None:
      length = min(length, max_length)  # Still >= longest: rows were cut.
    tokens, input_mask, target_mask = pack_right_padded(batch, length, pad_id)
    logp = np.asarray(logprob_fn(jnp.asarray(tokens), jnp.asarray(input_mask)),
                      np.float64)
    row_sums = np.where(target_mask, logp, 0.0).sum(axis=1)
    sums[idx] = row_sums[:len(idx)]
    if progress is not None:
      progress(len(idx))
  return [ContinuationScore(logprob=float(sums[i]), num_tokens=len(rows[i][1]),
                            truncated=truncated[i]) for i in range(len(rows))]


# ----------------------------------------------------------------------------
# Multiple choice.


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
  """Scores of one question's options and the picks they imply.

  Attributes:
    logprobs: summed log-prob per option.
    per_char: ``logprob / len(option text)`` (the lm-eval-harness
      ``acc_norm`` normalisation; the text as scored, leading space included).
    per_token: ``logprob / num_tokens`` (mean token log-prob).
    pred, pred_norm, pred_token_norm: argmax of each score (ties: first).
  """
  logprobs: tuple[float, ...]
  per_char: tuple[float, ...]
  per_token: tuple[float, ...]
  pred: int
  pred_norm: int
  pred_token_norm: int


def choose(scores: Sequence[ContinuationScore], option_texts: Sequence[str]) -> ChoiceResult:
  """Picks an option by raw, per-character and per-token log-likelihood."""
  if len(scores) != len(option_texts) or not scores:
    raise ValueError(f"{len(scores)} scores for {len(option_texts)} options.")
  lp = tuple(s.logprob for s in scores)
  per_char = tuple(s.logprob / max(1, len(t)) for s, t in zip(scores, option_texts))
  per_token = tuple(s.logprob / max(1, s.num_tokens) for s in scores)
  return ChoiceResult(logprobs=lp, per_char=per_char, per_token=per_token,
                      pred=int(np.argmax(lp)), pred_norm=int(np.argmax(per_char)),
                      pred_token_norm=int(np.argmax(per_token)))


# ----------------------------------------------------------------------------
# Perplexity.


def perplexity(total_nll: float, num_tokens: int) -> float:
  """``exp(total_nll / num_tokens)`` (token-weighted over a whole suite)."""
  if num_tokens <= 0:
    raise ValueError("perplexity needs at least one token.")
  return float(math.exp(total_nll / num_tokens))


# ----------------------------------------------------------------------------
# Answer extraction and normalisation.

# A number as written in text: optional sign and $, thousands separators,
# decimals, or a simple fraction a/b.
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?!\d)")
_ANSWER_IS_RE = re.compile(
    rf"(?:answer\s*(?:is|:)|####)\s*[:=]?\s*\**\s*\$?\s*({_NUMBER}|\\frac\{{[^{{}}]*\}}\{{[^{{}}]*\}})",
    re.IGNORECASE)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}$")


def parse_number(text: str) -> fractions.Fraction | None:
  """Exact value of one written number, or None.

  Accepts ``1,234``, ``-3``, ``2.50``, ``.5``, ``3/4``, ``$12``, ``\\frac{3}{4}``,
  a trailing ``%`` is kept as the number itself (``50%`` -> 50), trailing
  punctuation is ignored.
  """
  s = text.strip().rstrip(".").strip()
  s = s.replace("$", "").replace(" ", "").rstrip("%")
  m = _FRAC_RE.match(s)
  if m:
    sign, num, den = m.groups()
    if int(den) == 0:
      return None
    value = fractions.Fraction(int(num), int(den))
    return -value if sign else value
  if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+", s):
    return fractions.Fraction(s.replace(",", ""))
  m = re.fullmatch(r"(-?\d+)/(\d+)", s)
  if m:
    if int(m.group(2)) == 0:
      return None
    return fractions.Fraction(int(m.group(1)), int(m.group(2)))
  return None


def format_number(value: fractions.Fraction) -> str:
  """Canonical text: ``"12"``, ``"-3/4"`` (decimals become exact fractions)."""
  if value.denominator == 1:
    return str(value.numerator)
  return f"{value.numerator}/{value.denominator}"


def _last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i = start + len("\\boxed{")
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None


def extract_number(text: str) -> str | None:
  """The final numeric answer in a model's output, canonicalised, or None.

  In order of precedence: the last ``\\boxed{..}``; the last "answer is X" /
  "answer: X" / "#### X"; else the last number in the text.

  Returns:
    :func:`format_number` of the value (``"1234"``, ``"-3/4"``), or None.
  """
  boxed = _last_boxed(text)
  if boxed is not None:
    value = parse_number(boxed)
    if value is None:
      nums = _NUMBER_RE.findall(boxed)
      value = parse_number(nums[-1]) if len(nums) == 1 else None
    if value is not None:
      return format_number(value)
  hits = _ANSWER_IS_RE.findall(text)
  if hits:
    value = parse_number(hits[-1])
    if value is not None:
      return format_number(value)
  for raw in reversed(_NUMBER_RE.findall(text)):
    value = parse_number(raw)
    if value is not None:
      return format_number(value)
  return None


def normalize_text(text: str) -> str:
  """SQuAD-style: lowercase, drop punctuation and articles, squeeze spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def canonical_answer(answer: str, kind: str) -> str | None:
  """A gold answer in the form :func:`answers_match` compares."""
  if kind == "number":
    value = parse_number(answer)
    return None if value is None else format_number(value)
  if kind == "text":
    return normalize_text(answer)
  raise ValueError(f"Unknown answer kind {kind!r}; use 'number' or 'text'.")


def extract_answer(output: str, kind: str) -> str | None:
  """The answer in a model output: a number, or the normalised first line."""
  if kind == "number":
    return extract_number(output)
  if kind == "text":
    lines = [l for l in output.strip().splitlines() if l.strip()]
    return normalize_text(lines[0]) if lines else ""
  raise ValueError(f"Unknown answer kind {kind!r}; use 'number' or 'text'.")
