r"""Answer a few prompts with the real SmolLM2-135M-Instruct (the default demo).

  python -m fedjax_u2s.main --config=configs/generate.py --workdir=/tmp/gen
  python -m fedjax_u2s.main --config=configs/generate.py:smoke --workdir=/tmp/gen
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.pipeline = "generate"
  c.seed = 0                         # Sampling seed (per-row keys fold it in).

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # Registered name, .gguf file or HF dir.
  c.model.dtype = "float32"          # Compute dtype: float32 | bfloat16.
  c.model.param_dtype = "float32"    # Parameter storage dtype.

  c.use_chat_template = True         # Wrap each prompt as a user turn.
  c.prompts = (
      "What is the capital of France?",
      "Explain in two sentences why the sky is blue.",
      "What is 12 times 7?",
      "Write a one-sentence definition of photosynthesis.",
  )

  c.sampling = ml_collections.ConfigDict()
  c.sampling.strategy = "greedy"     # greedy | temperature | top_k | top_p.
  c.sampling.temperature = 0.7       # For temperature, top_k, top_p.
  c.sampling.top_k = 40              # For top_k.
  c.sampling.top_p = 0.9             # For top_p.
  c.sampling.max_new_tokens = 96     # Generation budget per prompt.
  c.sampling.stop_strings = ()       # Extra stop strings (EOS always stops).
  # Decode path (fedjax_u2s/decoding.py): the layer scan compiles several
  # times faster; "auto" decodes faster, worth it for many calls (U2S).
  c.sampling.decode = "scan"

  if arg == "smoke":
    c.prompts = c.prompts[:2]
    c.sampling.max_new_tokens = 32
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'smoke'.")
  return c
