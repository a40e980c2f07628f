"""Config blocks shared by the experiment configs in ``configs/``.

Each experiment's ``get_config(arg)`` starts from :func:`base_config` (model,
LoRA, federated algorithm, training, checkpoints, eval, devices, export) and
adds its own data blocks, so every field has one definition and one comment.
"""

import importlib.util
import os

import ml_collections

from fedjax_u2s.federated.config import AlgorithmConfig
from fedjax_u2s.u2s import corpus as corpus_lib
from fedjax_u2s.u2s import generate as generate_lib


def federated_config() -> ml_collections.ConfigDict:
  """The algorithm block shared by every federated config (``config.federated``).

  Built from :class:`fedjax_u2s.federated.config.AlgorithmConfig`, the one
  definition of its fields, defaults and comments.
  """
  return ml_collections.ConfigDict(AlgorithmConfig().to_dict())


def base_config() -> ml_collections.ConfigDict:
  """Model, LoRA, training, checkpoint, eval and device blocks."""
  c = ml_collections.ConfigDict()
  c.seed = 0                         # Seeds data order, sampling, init, dropout.

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # Registered name, .gguf file or HF dir.
  c.model.dtype = "float32"          # Compute dtype: float32 | bfloat16.
  c.model.param_dtype = "float32"    # Frozen base storage dtype.
  c.model.remat = False              # Rematerialise layers in the backward pass (GPU: True).

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16                   # r.
  c.lora.alpha = 32.0                # Update scaled by alpha / r.
  c.lora.targets = ("q", "k", "v", "o")  # Patterns over q,k,v,o,gate,up,down.
  c.lora.dropout = 0.05              # Dropout on the adapter input.

  c.federated = federated_config()

  c.train = ml_collections.ConfigDict()
  c.train.max_length = 256           # Tokens per example (prompt + response).
  c.train.batch_size = 4             # Examples per micro-batch.
  c.train.grad_accum = 1             # Micro-batches per local step.
  c.train.local_steps = 4            # Local steps per round (0: use local_epochs).
  c.train.local_epochs = 0.0         # Epochs per round instead of fixed steps.
  c.train.max_local_steps = 0        # Cap on steps with local_epochs; 0 = none.
  c.train.logits_chunk_size = 0      # Loss over T in chunks (0 = full logits; GPU: 128).
  # Several examples per row, each attending only to itself (data/batching.py):
  # the same steps and losses as unpacked rows, far fewer padded positions.
  c.train.pack = True
  # Tokens per packed row; 0 = batch_size * max_length. Attention is quadratic
  # in a row: set e.g. 2048 when batch_size * max_length is much longer.
  c.train.pack_length = 0
  c.train.tensorboard = True         # Also write TensorBoard event files.
  c.train.halt_after_round = 0       # Stop after this round (simulated preemption); 0 = off.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1             # Save the server state every N rounds.
  c.checkpoint.keep = 3              # Keep the last K checkpoints.

  c.train_eval = ml_collections.ConfigDict()
  c.train_eval.every = 5                   # Eval loss on held-out pairs every N rounds.
  c.train_eval.batch_size = 8              # Eval micro-batch size.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0             # Devices in the (clients, model) mesh; 0 = all.
  c.mesh.model_parallel = 1          # Of them on the model axis (the base split over
                                     # them, federated/parallel.py); must divide the
                                     # devices; the rest split the clients. 1 = replicated.

  c.multihost = ml_collections.ConfigDict()
  c.multihost.enabled = False        # Call jax.distributed.initialize.
  c.multihost.coordinator_address = ""  # host:port; empty = discover (TPU, SLURM).
  c.multihost.num_processes = 1      # With coordinator_address.
  c.multihost.process_id = 0         # With coordinator_address.

  c.export = ml_collections.ConfigDict()
  c.export.peft = True               # workdir/adapter: PEFT-format LoRA files.
  c.export.merged = False            # workdir/merged: base + adapter as HF safetensors.
  return c


def u2s_config() -> ml_collections.ConfigDict:
  """:func:`base_config` plus the blocks of a FedIT-U2S run on the wiki corpus.

  Corpus, chunking, demonstration pool, embedder, generation, the sampler
  used for generation, held-out generated pairs and the offline evaluation.
  Experiments set ``pipeline`` and resize what they need.
  """
  c = base_config()
  c.corpus = corpus_lib.default_config()
  c.corpus.kind = "wiki"
  c.corpus.topics = ("medicine", "math", "geography")
  c.corpus.partition = "topic"
  c.corpus.num_clients = 3             # 0 or len(topics): one client per domain.
  c.corpus.max_docs_per_client = 24    # Seeded sample of each client's articles.
  c.corpus.holdout_fraction = 0.1      # Articles no client holds (wiki_unseen).

  c.chunking = ml_collections.ConfigDict()
  c.chunking.max_tokens = 200          # Generator tokens per piece, at most.
  c.chunking.min_tokens = 24           # Smaller pieces are dropped (counted).
  c.chunking.max_pieces_per_client = 0  # Cap per client; 0 = all.

  c.pool = ml_collections.ConfigDict()
  # Demonstration pool file: ours (JSON/JSONL with text, instruction,
  # response) or Alpaca / Dolly / chat JSON, JSONL, Parquet, CSV; "" = the
  # packaged 42. A file's embeddings are cached in WORKDIR/cache/.
  c.pool.path = ""
  c.pool.format = "auto"               # auto | demonstrations | alpaca | dolly | chat.

  c.retrieval = ml_collections.ConfigDict()
  # Demonstration index: exact search, ScaNN, or auto (exact below
  # retrieval.AUTO_EXACT_BELOW demonstrations, ScaNN from there up).
  c.retrieval.method = "auto"

  c.embedder = ml_collections.ConfigDict()
  c.embedder.name = "all-minilm-l6-v2"  # Retrieval and grounding embedder.

  c.generator = ml_collections.ConfigDict()
  c.generator.name = ""                # U2S generator (name or path); "" = config.model.

  c.u2s = generate_lib.default_config()
  c.u2s.batch_size = 8
  c.u2s.max_new_tokens = 160

  c.u2s.sampling.pad_multiple = 128    # Long few-shot prompts: coarser buckets.

  c.data = ml_collections.ConfigDict()
  c.data.eval_fraction = 0.1           # Generated pairs held out for the eval loss.
  c.data.system_prompt = ""            # Optional system turn for training examples.

  c.federated.client_lr = 3e-4
  c.train.max_length = 320
  c.train.batch_size = 4
  c.train_eval.every = 2

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.topics = c.corpus.get_ref("topics")  # Wiki questions from these topics.
  c.evaluate.num_wiki_questions = 100  # Per split (known / unseen).
  c.evaluate.num_math_questions = 40   # Arithmetic with exact answers.
  c.evaluate.num_cloze_questions = 0   # Sentence-cloze questions per split (suites.wiki_cloze); 0 = none.
  c.evaluate.cloze_per_article = 3     # At most this many cloze questions per article.
  c.evaluate.cloze_merge = False       # True: cloze joins wiki_known / wiki_unseen (one set each).
  c.evaluate.num_champ_questions = 0   # corpus.kind="champ": held CHAMP problems (MC); 0 = none.
  c.evaluate.math_max_new_tokens = 48  # Decode budget per math answer.
  c.evaluate.batch_size = 8            # Rows per forward / sampler call.
  c.evaluate.seed = 0                  # Question sampling seed.
  c.evaluate.decode = "auto"           # Sampler decode path (decoding.DECODES).
  return c


ACCELERATORS = ("gpu", "tpu")


def accelerator(c: ml_collections.ConfigDict, kind: str,
                model_parallel: int = 1) -> ml_collections.ConfigDict:
  """The ``:gpu`` / ``:tpu`` variants' settings, one definition for every config.

  bf16 matmuls (norms, softmax and logits stay fp32 in the decoder), layers
  rematerialised and the loss over T in chunks (the step's activation peak
  is then one layer and one logits chunk), every sampled client in one vmapped
  step (``clients_per_chunk=0``: accelerators have the memory the CPU lacks),
  wider evaluation and generation batches, and the sampler's fastest decode
  for the backend (``auto``: the CPU kernel path is CPU-only). The
  accelerators differ in what the backend compiles, not in these settings.

  The base is split over ``model_parallel`` devices (``mesh.model_parallel``,
  federated/parallel.py). 1 for the shipped configs: SmolLM2-135M is half a
  GB and its 9 heads / 3 KV heads divide by no device count a TPU slice
  has, so a split would add resharding and save nothing. The 7-8B presets
  (configs/plans/, ``python -m fedjax_u2s.plan``) are where the split pays:
  there it is what makes the base fit at all.

  Args:
    c: a config from :func:`base_config` / :func:`u2s_config` (changed in place).
    kind: ``"gpu"`` or ``"tpu"``.
    model_parallel: devices the frozen base is split over.
  """
  if kind not in ACCELERATORS:
    raise ValueError(f"accelerator kind {kind!r}: use one of {ACCELERATORS}.")
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.train.logits_chunk_size = 128
  c.federated.clients_per_chunk = 0
  c.mesh.model_parallel = model_parallel
  c.train_eval.batch_size = 32
  if "evaluate" in c:
    c.evaluate.batch_size = 32
    c.evaluate.decode = "auto"
  if "u2s" in c:
    c.u2s.batch_size = 32
    c.u2s.sampling.decode = "auto"
  return c


def load(path: str, arg: str = "", **overrides) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, dotted-key overrides set, locked.

  What ``--config=PATH:ARG --config.a.b=v`` does on the command line, for
  notebooks and scripts: ``load("configs/fedit_instructions.py", "smoke",
  **{"federated.num_rounds": 2})``.
  """
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_fields(module.get_config(arg), **overrides)


def set_fields(config: ml_collections.ConfigDict, **overrides
               ) -> ml_collections.ConfigDict:
  """Sets dotted-key ``overrides`` (``{"train.batch_size": 2}``) and locks."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  config.lock()
  return config
