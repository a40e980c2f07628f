r"""Memory plan of LoRA federated tuning of a Qwen2.5-7B-shaped model.

  python -m fedjax_u2s.plan --config=configs/plans/qwen25_7b.py:v5e-8 --search
  python -m fedjax_u2s.plan --config=configs/plans/qwen25_7b.py:v4-8 --search
  python -m fedjax_u2s.plan --config=configs/plans/qwen25_7b.py:gpu80 --search

Shapes only (no weights): the numbers of Qwen/Qwen2.5-7B's public
config.json (28 heads over 4 KV heads: the model axis is 1, 2 or 4 so that
it splits whole heads). Hardware and training shape as in llama3_8b.py.
"""

from fedjax_u2s import plan

HF_CONFIG = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151643,
    "_name_or_path": "qwen2.5-7b-shapes",
}


def get_config(arg: str | None = None):
  return plan.preset_config(HF_CONFIG, arg or "v5e-8", max_model_parallel=4)
