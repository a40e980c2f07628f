"""Batched autoregressive sampling: one jitted prefill + ``lax.while_loop``.

The whole decode runs on the device: no host round trip per token. Prompts of
different lengths are left-padded so every row writes the KV cache at the same
slot. Each row stops on its own, at an end-of-sequence token id or at a stop
string; stop strings are matched inside the loop, exactly, on bytes: a KMP
automaton over bytes is lifted to a ``[states, vocab]`` transition table over
tokens (built once on the host from the tokenizer's byte strings), so a stop
string that straddles token boundaries ("." + "\\n\\n", "\\n" + "\\n") is caught
the step it completes.

Sampling strategies are small frozen dataclasses (static under jit)::

    sampler = Sampler(config, tokenizer)
    out = sampler(params, ["Hello"], max_new_tokens=32, strategy=TopP(0.9, 0.7),
                  stop_strings=("\\n\\n",), seed=0)
    out.texts
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_u2s import decoding
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import ops as ops_lib
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

PyTree = Any


# ----------------------------------------------------------------------------
# Strategies.


class Strategy(Protocol):

  def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    """[V] float32 logits of one row, a key -> a scalar int32 token."""


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax (ties go to the lowest id)."""

  def __call__(self, logits, rng):
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
  """Sampling from ``softmax(logits / temperature)``."""
  temperature: float = 1.0

  def __post_init__(self):
    _check_temperature(self.temperature)

  def __call__(self, logits, rng):
    return jax.random.categorical(rng, logits / self.temperature).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Sampling among the ``k`` most likely tokens."""
  k: int = 40
  temperature: float = 1.0

  def __post_init__(self):
    _check_temperature(self.temperature)
    if self.k < 1:
      raise ValueError(f"TopK.k must be >= 1, got {self.k}.")

  def __call__(self, logits, rng):
    values, ids = jax.lax.top_k(logits, self.k)
    choice = jax.random.categorical(rng, values / self.temperature)
    return ids[choice].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: the smallest set of tokens whose mass reaches ``p``."""
  p: float = 0.9
  temperature: float = 1.0

  def __post_init__(self):
    _check_temperature(self.temperature)
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f"TopP.p must be in (0, 1], got {self.p}.")

  def __call__(self, logits, rng):
    logits = logits / self.temperature
    keep = nucleus(jax.nn.softmax(logits), self.p)
    return jax.random.categorical(rng, jnp.where(keep, logits, -jnp.inf)).astype(jnp.int32)


def nucleus(probs: jax.Array, p: float) -> jax.Array:
  """[V] bool: the tokens whose more probable tokens hold less than ``p``.

  That is the smallest set of most probable tokens whose mass reaches ``p``
  (tokens tied with its least probable one are all in). Found without
  sorting the vocabulary: the mass above a threshold t falls as t rises, so
  the set is every token at or above the least t where that mass is < p,
  which a bisection on t's float32 bits finds exactly (positive floats
  order like their bits) in 30 masked sums over the vocabulary: XLA:CPU's
  sort of a whole vocabulary per row and step was many times slower
  (docs/benchmarks.md, "U2S generation stage"). Always keeps the top token.
  """
  def mass_above(bits):
    t = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.sum(jnp.where(probs > t, probs, 0.0))

  def halve(_, bounds):  # mass_above(hi) < p; mass_above(lo) >= p unless lo = 0.
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    below = mass_above(mid) < p
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  one = 0x3F800000  # 1.0: nothing is above it. 30 halvings reach width 1.
  lo, hi = jax.lax.fori_loop(0, 30, halve, (jnp.int32(0), jnp.int32(one)))
  least = jnp.where(mass_above(lo) < p, lo, hi)
  return probs >= jax.lax.bitcast_convert_type(least, jnp.float32)


def _check_temperature(t):
  if not t > 0:
    raise ValueError(f"temperature must be > 0 (use Greedy for 0), got {t}.")


STRATEGIES = {"greedy": Greedy, "temperature": Temperature, "top_k": TopK,
              "top_p": TopP}


def make_strategy(name: str, **kw) -> Strategy:
  """A strategy by registry name, e.g. ``make_strategy("top_p", p=0.9)``."""
  if name not in STRATEGIES:
    raise ValueError(f"Unknown sampling strategy {name!r}; choose from "
                     f"{sorted(STRATEGIES)}.")
  return STRATEGIES[name](**kw)


def config_block(*, strategy: str = "top_p", temperature: float = 0.7,
                 top_p: float = 0.9, top_k: int = 40, pad_multiple: int = 32,
                 decode: str = "auto") -> ml_collections.ConfigDict:
  """A sampling config block (what :func:`strategy_from_config` reads).

  One definition of the fields, their comments and defaults for every job
  that samples in bulk (U2S generation, FedPIT's self-generation).
  """
  c = ml_collections.ConfigDict()
  c.strategy = strategy          # greedy | temperature | top_k | top_p.
  c.temperature = temperature    # Softmax temperature (not used by greedy).
  c.top_p = top_p                # Nucleus mass for top_p.
  c.top_k = top_k                # Candidates for top_k.
  c.pad_multiple = pad_multiple  # Prompt length bucket (fewer recompiles).
  c.decode = decode              # decoding.DECODES; auto: the fastest decode here.
  return c


def strategy_from_config(cfg) -> Strategy:
  """The strategy a sampling config block describes.

  ``cfg`` has ``strategy`` (a :data:`STRATEGIES` name) and the parameters the
  strategies read: ``temperature``, ``top_k``, ``top_p``; each strategy takes
  only its own, so a block can carry all of them and switch by name.
  """
  kw = {"greedy": {}, "temperature": dict(temperature=cfg.temperature),
        "top_k": dict(k=cfg.top_k, temperature=cfg.temperature),
        "top_p": dict(p=cfg.top_p, temperature=cfg.temperature)}
  if cfg.strategy not in kw:
    raise ValueError(f"config.sampling.strategy={cfg.strategy!r} is not one of "
                     f"{sorted(kw)}.")
  return make_strategy(cfg.strategy, **kw[cfg.strategy])


# ----------------------------------------------------------------------------
# Stop strings as a token-level automaton.


def _kmp_byte_dfa(pattern: bytes) -> np.ndarray:
  """[m+1, 256] DFA: state = length of the longest matched prefix.

  State m (full match) is absorbing.
  """
  m = len(pattern)
  dfa = np.zeros((m + 1, 256), np.int32)
  dfa[0, pattern[0]] = 1
  restart = 0
  for s in range(1, m):
    dfa[s] = dfa[restart]
    dfa[s, pattern[s]] = s + 1
    restart = dfa[restart, pattern[s]]
  dfa[m] = m
  return dfa


def stop_string_tables(stop_strings: Sequence[str],
                       token_bytes: Sequence[bytes]) -> np.ndarray:
  """Per-token transition tables for a set of stop strings.

  Args:
    stop_strings: non-empty strings.
    token_bytes: the exact bytes of each token id.

  Returns:
    [N, M+1, V] int32, where M is the longest stop string in bytes:
    ``table[i, s, t]`` is the automaton state of stop string ``i`` after
    reading token ``t`` in state ``s``; state ``len(stop_strings[i])`` means
    "matched" (absorbing). Unused states of shorter strings are never reached.
  """
  patterns = [s.encode("utf-8") for s in stop_strings]
  if any(not p for p in patterns):
    raise ValueError("Stop strings must be non-empty.")
  vocab = len(token_bytes)
  lengths = np.array([len(b) for b in token_bytes], np.int64)
  width = max(1, int(lengths.max()))
  padded = np.zeros((vocab, width), np.uint8)
  for t, b in enumerate(token_bytes):
    padded[t, :len(b)] = np.frombuffer(b, np.uint8)
  m_max = max(len(p) for p in patterns)
  tables = np.zeros((len(patterns), m_max + 1, vocab), np.int32)
  for i, pat in enumerate(patterns):
    dfa = _kmp_byte_dfa(pat)
    for s in range(len(pat) + 1):
      state = np.full(vocab, s, np.int32)
      for j in range(width):
        active = j < lengths
        state = np.where(active, dfa[state, padded[:, j]], state)
      tables[i, s] = state
  return tables


def _stop_lengths(stop_strings: Sequence[str]) -> np.ndarray:
  return np.array([len(s.encode("utf-8")) for s in stop_strings], np.int32)


# ----------------------------------------------------------------------------
# The loop.


STOP_LENGTH, STOP_EOS, STOP_STRING = 0, 1, 2
_STOP_NAMES = {STOP_LENGTH: "length", STOP_EOS: "eos", STOP_STRING: "stop_string"}


@flax.struct.dataclass
class SamplingState:
  """Decode loop state (B rows, N stop strings, G = max_new_tokens).

  Attributes:
    step: [] int32, tokens generated so far (by the rows still running).
    tokens: [B, G] int32 generated ids; ``pad_id`` after a row stops.
    lengths: [B] int32 generated tokens per row, stop token included.
    done: [B] bool, row has stopped.
    reason: [B] int32, why: one of the ``STOP_*`` codes.
    stop_states: [B, N] int32 automaton state per stop string.
    cache: the KV cache, ``P + G`` slots.
    rng: base key; step ``i`` of row ``b`` uses ``fold_in(rng[b], i)``.
  """
  step: jax.Array
  tokens: jax.Array
  lengths: jax.Array
  done: jax.Array
  reason: jax.Array
  stop_states: jax.Array
  cache: llama.KVCache
  rng: jax.Array


@functools.partial(
    jax.jit, static_argnames=("config", "strategy", "max_new_tokens", "eos_ids",
                              "pad_id", "lora_config", "decode"))
def sample_tokens(params: PyTree, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                  row_rngs: jax.Array, stop_tables: jax.Array,
                  stop_lengths: jax.Array, lora: PyTree | None = None,
                  decode_params: PyTree | None = None, *,
                  config: ModelConfig, strategy: Strategy, max_new_tokens: int,
                  eos_ids: tuple[int, ...], pad_id: int,
                  lora_config: lora_lib.LoraConfig | None = None,
                  decode: str | decoding.DecodePlan = "auto") -> SamplingState:
  """Generates up to ``max_new_tokens`` for a left-padded batch of prompts.

  Args:
    params: base model parameters.
    prompt_tokens: [B, P] int32, left-padded.
    prompt_mask: [B, P] bool, False at padding.
    row_rngs: [B] keys, one per row (so a row's draw is independent of its
      batch-mates).
    stop_tables: [N, M+1, V] from :func:`stop_string_tables` (N may be 0).
    stop_lengths: [N] byte length of each stop string (its "matched" state).
    lora: optional adapter applied during decoding.
    decode_params: the decode steps' weights made ahead of the call, by
      ``decoding.decode_weights(params, config)`` (packed, in GGUF block
      formats where lossless), so that they are not packed again at every
      call; needs a ``decode`` with unrolled layers and no ``lora`` (merge
      it into the params first). :class:`Sampler` makes them once per
      params. None: the decode steps' layout is made from ``params`` per
      call (``decoding.decode_layout``).
    config, strategy, max_new_tokens, eos_ids, pad_id, lora_config: static.
    decode: how the prefill and decode steps run (static): a name from
      ``decoding.DECODES`` or a ``decoding.DecodePlan``; see
      :mod:`fedjax_u2s.decoding`. "auto" (the default) is the fastest
      measured on this kind of machine.

  Returns:
    The final :class:`SamplingState`.
  """
  plan = decoding.resolve(decode, config)
  if decode_params is not None and (not plan.unroll or lora is not None):
    raise ValueError("decode_params need a decode with unrolled layers and no "
                     "lora (merge the adapter into the params they are made from).")
  b, p = prompt_tokens.shape
  # Prefill with the params as given (stacked: the layer scan), into a cache
  # of exactly the prompt's slots; only the last position's logits are
  # needed, so the [B, P, V] LM-head product is skipped.
  hidden, cache = llama.prefill_hidden(params, prompt_tokens,
                                       llama.init_cache(config, b, p), config=config,
                                       input_mask=prompt_mask, lora=lora,
                                       lora_config=lora_config, ops=plan.ops)
  logits = llama.logits_from_hidden(params, hidden[:, -1:], config=config, ops=plan.ops)
  if decode_params is not None:
    params = decode_params
  else:
    params, lora = decoding.decode_layout(params, plan, config, lora, lora_config)
  cache = llama.grow_cache(cache, p + max_new_tokens, per_layer=plan.unroll)
  eos = jnp.asarray(eos_ids, jnp.int32)
  n_stop = stop_tables.shape[0]

  def pick(state: SamplingState, logits: jax.Array) -> SamplingState:
    """Samples one token per running row and updates the stop conditions."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(state.rng, state.step)
    tok = jax.vmap(strategy)(logits, keys)
    tok = jnp.where(state.done, pad_id, tok)
    tokens = state.tokens.at[:, state.step].set(tok)
    hit_eos = jnp.any(tok[:, None] == eos[None, :], axis=1) if eos_ids else False
    if n_stop:
      stop_states = stop_tables[jnp.arange(n_stop)[None, :], state.stop_states,
                                tok[:, None]]  # [B, N]
      hit_stop = jnp.any(stop_states == stop_lengths[None, :], axis=1)
    else:
      stop_states, hit_stop = state.stop_states, False
    lengths = jnp.where(state.done, state.lengths, state.step + 1)
    reason = jnp.where(state.done, state.reason,
                       jnp.where(hit_eos, STOP_EOS,
                                 jnp.where(hit_stop, STOP_STRING, STOP_LENGTH)))
    done = state.done | hit_eos | hit_stop
    return state.replace(step=state.step + 1, tokens=tokens, lengths=lengths,
                         done=done, reason=reason, stop_states=stop_states)

  state = SamplingState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      lengths=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool),
      reason=jnp.zeros((b,), jnp.int32),
      stop_states=jnp.zeros((b, n_stop), jnp.int32),
      cache=cache, rng=row_rngs)
  state = pick(state, logits[:, -1])

  def cond(state):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state):
    last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)
    hidden, cache = llama.decode_hidden(params, last, state.cache, config=config,
                                        input_mask=~state.done[:, None], lora=lora,
                                        lora_config=lora_config, ops=plan.ops)
    logits = llama.logits_from_hidden(params, hidden, config=config, ops=plan.ops)
    return pick(state.replace(cache=cache), logits[:, -1])

  return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------
# Host-side front end.


@dataclasses.dataclass(frozen=True)
class SamplerOutput:
  """Results per prompt.

  Attributes:
    texts: generated text, cut before the first stop string, special tokens
      dropped.
    tokens: generated ids per row, up to and including the stop token.
    stop_reasons: "eos", "stop_string" or "length" per row.
  """
  texts: list[str]
  tokens: list[list[int]]
  stop_reasons: list[str]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads to a common length rounded up to ``multiple`` (fewer compiles).

  Returns:
    tokens [B, P] int32 and mask [B, P] bool.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("Every prompt must have at least one token.")
  longest = max(len(p) for p in prompts)
  width = -(-longest // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    mask[i, width - len(p):] = True
  return tokens, mask


class Sampler:
  """Generates text from a model and tokenizer; jit caches are reused.

  Args:
    config: the model config.
    tokenizer: a :class:`fedjax_u2s.tokenizer.Tokenizer` (or anything with
      ``encode``, ``decode``, ``token_bytes``, ``eos_ids`` and ``pad_id``).
    pad_multiple: prompt lengths are rounded up to this, to bound recompiles.
    decode: how prompts are prefilled and continued: a name from
      ``decoding.DECODES`` ("auto", "cpu_kernel", "unrolled", "scan",
      "scan_xla") or a ``decoding.DecodePlan``; see :mod:`fedjax_u2s.decoding`.
      "auto" is the fastest measured on this kind of machine for many calls;
      "scan" compiles several times faster, for a few. Resolved once, here.
      Where it packs the weights (e.g. "cpu_kernel") and no adapter is
      passed, the decode weights are made once per params by
      ``decoding.decode_weights`` (in the GGUF block format the weights
      exactly came from where they did) and kept while the same params are
      passed: a sixth of the float32 weights for a Q4_1 GGUF, a whole second
      copy for float32 ones (pick "unrolled" or "scan" where that does not
      fit).
  """

  def __init__(self, config: ModelConfig, tokenizer, pad_multiple: int = 32,
               decode: str | decoding.DecodePlan = "auto"):
    self.config = config
    self.tokenizer = tokenizer
    self.pad_multiple = pad_multiple
    self.plan = decoding.resolve(decode, config)
    self._tables: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}
    self._decode: tuple[list, PyTree] | None = None  # (params' leaves, weights)

  @property
  def keeps_decode_weights(self) -> bool:
    """Whether calls without an adapter decode from :meth:`decode_params`."""
    return self.plan.packed

  def plan_for(self, params: PyTree) -> decoding.DecodePlan:
    """The plan for ``params``: :attr:`plan`, or its plain-XLA twin when the
    params are split over several devices (a base sharded over a mesh's
    model axis, ``federated/parallel.py``). Packing gathers the weights onto
    the host and the CPU kernel runs on one device's buffers; under plain
    XLA the jitted sampler takes the shardings as they come and XLA inserts
    the collectives."""
    if self.plan.ops == ops_lib.XLA and not self.plan.packed:
      return self.plan
    if any(isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
           and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params)):
      return dataclasses.replace(self.plan, ops=ops_lib.XLA, packed=False)
    return self.plan

  def decode_params(self, params: PyTree) -> PyTree:
    """``decoding.decode_weights(params)``, remade only for other params."""
    leaves = jax.tree.leaves(params)
    if self._decode is None or len(self._decode[0]) != len(leaves) or any(
        a is not b for a, b in zip(self._decode[0], leaves)):
      self._decode = None  # Free the old copy first.
      self._decode = (leaves, decoding.decode_weights(params, self.config))
    return self._decode[1]

  def stop_tables(self, stop_strings: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    key = tuple(stop_strings)
    if key not in self._tables:
      if key:
        tables = stop_string_tables(key, self.tokenizer.token_bytes())
      else:
        tables = np.zeros((0, 1, self.config.vocab_size), np.int32)
      if tables.shape[-1] < self.config.vocab_size:  # Embedding rows past vocab.
        extra = self.config.vocab_size - tables.shape[-1]
        tables = np.concatenate(
            [tables, np.broadcast_to(np.arange(tables.shape[1])[None, :, None],
                                     tables.shape[:2] + (extra,))], axis=-1)
      self._tables[key] = (jnp.asarray(tables), jnp.asarray(_stop_lengths(key)))
    return self._tables[key]

  def __call__(self, params: PyTree, prompts: Sequence[str] | Sequence[Sequence[int]],
               *, max_new_tokens: int, strategy: Strategy = Greedy(),
               stop_strings: Sequence[str] = (), seed: int = 0,
               row_seeds: Sequence[int] | None = None,
               eos_ids: Sequence[int] | None = None,
               lora: PyTree | None = None,
               lora_config: lora_lib.LoraConfig | None = None) -> SamplerOutput:
    """Samples a continuation of every prompt.

    Args:
      params: base parameters.
      prompts: strings (encoded with the tokenizer, no chat template applied)
        or lists of token ids.
      max_new_tokens: generation budget per row.
      strategy: a strategy dataclass.
      stop_strings: a row stops once its output contains any of them.
      seed: base seed.
      row_seeds: one seed per row (default ``0..B-1``), so a prompt's sample
        does not depend on its batch-mates; combined with ``seed``.
      eos_ids: override the tokenizer's end-of-sequence ids.
      lora, lora_config: optional adapter.
    """
    tok = self.tokenizer
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    tokens, mask = left_pad(ids, tok.pad_id, self.pad_multiple)
    if row_seeds is None:
      row_seeds = range(len(ids))
    if len(row_seeds) != len(ids):
      raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(ids)} prompts.")
    base = jax.random.key(seed)
    rngs = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(row_seeds, jnp.uint32))
    tables, lengths = self.stop_tables(stop_strings)
    eos = tuple(int(e) for e in (tok.eos_ids if eos_ids is None else eos_ids))
    plan = self.plan_for(params)
    decode = (self.decode_params(params) if plan.packed and lora is None
              else None)
    state = sample_tokens(params, jnp.asarray(tokens), jnp.asarray(mask), rngs,
                          tables, lengths, lora, decode, config=self.config,
                          strategy=strategy, max_new_tokens=max_new_tokens,
                          eos_ids=eos, pad_id=int(tok.pad_id),
                          lora_config=lora_config, decode=plan)
    out_tokens = np.asarray(state.tokens)
    out_lengths = np.asarray(state.lengths)
    out_reasons = np.asarray(state.reason)
    texts, rows, reasons = [], [], []
    for row, n, code in zip(out_tokens, out_lengths, out_reasons):
      row = [int(t) for t in row[:n]]
      reason = _STOP_NAMES[int(code)]
      text = tok.decode(row[:-1] if reason == "eos" else row)
      if reason == "stop_string":
        # Cut before the stop string (a special-token stop string is already
        # gone: decode drops special tokens).
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        text = text[:cut] if cut >= 0 else text
      texts.append(text)
      rows.append(row)
      reasons.append(reason)
    return SamplerOutput(texts=texts, tokens=rows, stop_reasons=reasons)
