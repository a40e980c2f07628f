r"""Memory plan of LoRA federated tuning of a Llama-3-8B-shaped model.

  python -m fedjax_u2s.plan --config=configs/plans/llama3_8b.py:v5e-8 --search
  python -m fedjax_u2s.plan --config=configs/plans/llama3_8b.py:v4-8 --search
  python -m fedjax_u2s.plan --config=configs/plans/llama3_8b.py:gpu80 --search

Shapes only (no weights): the numbers of meta-llama/Meta-Llama-3-8B's public
config.json. The hardware (``:v5e-8``, ``:v4-8``, ``:gpu80``) sets the device
count, memory and the model axis (``plan.HARDWARE``); the training shape is
``plan.preset_config``'s. The same config trains with real weights once
``model.name`` points at them.
"""

from fedjax_u2s import plan

HF_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
    "_name_or_path": "llama3-8b-shapes",
}


def get_config(arg: str | None = None):
  return plan.preset_config(HF_CONFIG, arg or "v5e-8")
