"""SmolLM2-135M-Instruct's HF config: the exact shapes for random-weight benchmarks."""

SMOLLM2_135M = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)
