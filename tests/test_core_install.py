"""The core (models, LoRA, federated engine, sampler) runs without the extras.

setup.cfg's install_requires is the core; scann, datasets, matplotlib and mkl
come with the ``u2s`` / ``data`` / ``eval`` / ``cpu-kernel`` extras. This runs
a tiny federated training run (round, checkpoint, curves) and a sampler
call in a fresh interpreter in which
importing any of those fails, as on a core-only install.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.metadata, sys

    BLOCKED = {"scann", "datasets", "matplotlib", "mkl", "pyarrow", "tensorboardX", "dp_accounting",
               "mathematics_dataset", "sympy", "transformers", "torch"}

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{name} is not part of the core install")

    sys.meta_path.insert(0, Block())
    _distribution = importlib.metadata.distribution
    def distribution(name):  # The mkl wheel's files are how the kernel finds BLAS.
      if name == "mkl":
        raise importlib.metadata.PackageNotFoundError(name)
      return _distribution(name)
    importlib.metadata.distribution = distribution

    import jax, jax.numpy as jnp
    from fedjax_u2s import checkpoint, lora, sampler, testing, train
    from fedjax_u2s.federated import algorithms
    from fedjax_u2s.models import llama

    tok = testing.ByteTokenizer()
    cfg = testing.tiny_llama_config(vocab_size=tok.vocab_size)
    params = llama.init_params(jax.random.key(0), cfg)
    smp = sampler.Sampler(cfg, tok)
    out = smp(params, [tok.encode("abc")], max_new_tokens=4,
              strategy=sampler.Greedy(), seed=0)
    assert len(out.tokens[0]) >= 1
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:  # A round, checkpoint, curves.
      result = train.train(
          testing.tiny_train_config(**{"federated.num_rounds": 1}), workdir,
          model_config=cfg, base_params=params,
          client_sets=[testing.random_token_set(i, 4, cfg.vocab_size) for i in range(2)])
      assert result.rounds == 1 and checkpoint.Checkpointer(
          workdir + "/checkpoints").latest_round() == 1
    del algorithms, lora, jnp
    print("core ok", sorted(m for m in BLOCKED if m in sys.modules))
""")


def test_core_runs_without_the_extras():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "core ok []" in proc.stdout
