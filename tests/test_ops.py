"""The ops layer: jnp by default, the same products as the model's math, and
the import rule that keeps the model free of kernels."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import ops as ops_lib
from fedjax_u2s import testing
from fedjax_u2s.models import llama

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fedjax_u2s"


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every module a file imports (lazy imports inside functions included)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolve against the file's package.
        parts = path.relative_to(_PACKAGE.parent).with_suffix("").parts
        base = ".".join(parts[:len(parts) - node.level] + ((base,) if base else ()))
      names.add(base)
      names.update(f"{base}.{a.name}" for a in node.names)
  return names


def test_models_import_no_kernels():
  """models/ does the math; only ops/ may reach the compiled kernels."""
  files = sorted((_PACKAGE / "models").rglob("*.py"))
  assert files
  bad = {f.name: sorted(n for n in _imported_modules(f)
                        if n == "fedjax_u2s.kernels" or n.startswith("fedjax_u2s.kernels."))
         for f in files}
  assert not any(bad.values()), bad
  users = sorted(str(f.relative_to(_PACKAGE)) for f in _PACKAGE.rglob("*.py")
                 if any(n.startswith("fedjax_u2s.kernels") for n in _imported_modules(f))
                 and f.parent.name != "kernels")
  assert users == ["ops/products.py"], users


def test_xla_ops_are_plain_einsums():
  """The default ops: the einsums the model's math reads as, no custom call."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8)).astype(np.float32)
  w = rng.standard_normal((8, 6)).astype(np.float32)
  xla = ops_lib.XLA
  assert xla == ops_lib.Ops() and not xla.cpu_kernel
  np.testing.assert_array_equal(xla.matmul(x, w), jnp.einsum("...k,kn->...n", x, w))
  np.testing.assert_array_equal(xla.matmul(x, w.T, transpose_w=True),
                                jnp.einsum("...k,nk->...n", x, w.T))
  logits = xla.logits(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert logits.dtype == jnp.float32
  # A gate/up weight fused side by side: the separate products' SwiGLU.
  gate, up = w[:, :3], w[:, 3:]
  np.testing.assert_allclose(xla.swiglu(x, w), jax.nn.silu(x @ gate) * (x @ up),
                             rtol=1e-6, atol=1e-6)
  q = rng.standard_normal((2, 2, 3, 4, 8)).astype(np.float32)  # [B, K, G, T, hd]
  keys = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
  s = xla.scores(q, keys)
  assert s.shape == (2, 2, 3, 4, 5) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, np.einsum("bkgtd,bksd->bkgts", q, keys), rtol=1e-6,
                             atol=1e-6)
  mixed = xla.mix(jax.nn.softmax(s, -1), keys)
  assert mixed.shape == (2, 2, 3, 4, 8)
  text = jax.jit(lambda x, w: xla.matmul(x, w)).lower(x, w).as_text()
  assert "custom_call" not in text


def test_training_forward_lowers_without_the_kernel():
  """Training and scoring (no ops given) never reach the custom calls."""
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(0), cfg)
  tokens = jnp.zeros((2, 5), jnp.int32)

  def loss(p):
    logits, _ = llama.forward(p, tokens, config=cfg)
    return jnp.mean(logits)

  assert "fedjax_u2s_cpu" not in jax.jit(jax.grad(loss)).lower(params).as_text()


def test_fused_layouts_match_separate_weights():
  """The model's fused inference layout (q/k/v side by side, gate/up side by
  side, as plain arrays) gives the separate weights' logits."""
  cfg = testing.tiny_qwen2_config()  # q/k/v biases, tied embeddings.
  params = llama.unstack_layers(llama.init_params(jax.random.key(0), cfg, std=0.2))

  def fuse(lp):
    lp = dict(lp)
    q, k, v = (lp.pop(n) for n in ("q", "k", "v"))
    lp["qkv"] = {"w": jnp.concatenate([q["w"], k["w"], v["w"]], 1),
                 "b": jnp.concatenate([q["b"], k["b"], v["b"]])}
    gate, up = lp.pop("gate"), lp.pop("up")
    lp["gate_up"] = {"w": jnp.concatenate([gate["w"], up["w"]], 1)}
    return lp

  fused = {**params, "layers": tuple(fuse(lp) for lp in params["layers"]),
           "lm_head": params["embed"].T}
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
  cache = llama.init_cache(cfg, 2, 8, per_layer=True)
  want, _ = llama.forward(params, tokens, config=cfg, cache=cache)
  got, _ = llama.forward(fused, tokens, config=cfg, cache=cache)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
