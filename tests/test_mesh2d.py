"""The (clients, model) mesh: every shape of 8 emulated CPU devices gives the
result of 1 device, the base split over the model axis.

The rounds, the sampler and the evaluation run in one subprocess
(tests/mesh2d_worker.py), because the number of emulated devices must be set
before JAX initialises; the checks here read what it wrote.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_u2s import config_blocks
from fedjax_u2s.federated import parallel
from fedjax_u2s.pipelines import validate

WORKER = pathlib.Path(__file__).with_name("mesh2d_worker.py")
SHAPES = ("8x1", "4x2", "2x4", "1x8")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh2d")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env,
                        capture_output=True, text=True, timeout=1800,
                        cwd=WORKER.parent.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out / "results.npz") as f:
    results = dict(f)
  with open(out / "samples.json") as f:
    samples = json.load(f)
  return results, samples, (out / "round_2x4.hlo.txt").read_text()


def _adapter_keys(results):
  return sorted(k[len("fedavg_1x1_"):] for k in results
                if k.startswith("fedavg_1x1_") and k.endswith(("/['a']", "/['b']")))


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam"])
def test_every_mesh_shape_equals_one_device(worker, algorithm):
  results, _, _ = worker
  keys = _adapter_keys(results)
  assert len(keys) == 14  # a and b of q, k, v, o, gate, up, down.
  one = {k: results[f"{algorithm}_1x1_{k}"] for k in keys}
  assert all(np.abs(one[k]).max() > 0 for k in keys)  # Trained: b moved off 0.
  for shape in SHAPES:
    got = {k: results[f"{algorithm}_{shape}_{k}"] for k in keys}
    flat = lambda t: np.concatenate([t[k].ravel() for k in keys])
    rel = np.linalg.norm(flat(got) - flat(one)) / np.linalg.norm(flat(one))
    assert rel <= 1e-5, (algorithm, shape, rel)
    for k in keys:  # FedAdam divides by sqrt(v): a few entries move ~1e-5.
      np.testing.assert_allclose(got[k], one[k], rtol=1e-3, atol=5e-5,
                                 err_msg=f"{algorithm} {shape} {k}")
    np.testing.assert_allclose(results[f"{algorithm}_{shape}_losses"],
                               results[f"{algorithm}_1x1_losses"], rtol=1e-6)
    np.testing.assert_allclose(results[f"{algorithm}_{shape}_eval_loss"],
                               results[f"{algorithm}_1x1_eval_loss"], rtol=1e-6)
  # FedAdam is another algorithm: its adapter differs from FedAvg's.
  if algorithm == "fedadam":
    assert not np.allclose(results["fedadam_1x1_['q']/['b']"],
                           results["fedavg_1x1_['q']/['b']"])


def test_model_parallel_one_is_the_old_1d_mesh_bit_for_bit(worker):
  results, _, _ = worker
  for k in _adapter_keys(results) + ["losses", "eval_loss"]:
    np.testing.assert_array_equal(results[f"fedavg_8x1_{k}"],
                                  results[f"fedavg_legacy_{k}"], err_msg=k)


def test_base_is_split_and_never_gathered(worker):
  results, samples, hlo = worker
  specs = samples["specs"]
  assert specs["['layers']/['q']/['w']"] == "P(None, None, 'model')"
  assert specs["['layers']/['down']/['w']"] == "P(None, 'model', None)"
  assert specs["['embed']"] == "P('model', None)"
  assert specs["['lm_head']"] == "P(None, 'model')"
  assert specs["['layers']/['attn_norm']"] == "P()"
  # Device 0 of the 2x4 mesh holds a quarter of the split weights (plus the
  # replicated norms), and so does the compiled round's input.
  base, mine = int(results["base_bytes"]), int(results["base_bytes_device0"])
  assert mine < 0.27 * base, (mine, base)
  assert int(results["hlo_2x4_argument_bytes"]) < 0.45 * base
  # No all-gather in the compiled round rebuilds a weight of the base,
  # stacked or one layer's (L=2, D=32, F=48, q 32, k/v 16, V=264).
  weights = {(2, 32, 32), (2, 32, 16), (2, 32, 48), (2, 48, 32), (264, 32),
             (32, 264), (32, 32), (32, 16), (32, 48), (48, 32)}
  gathered = {tuple(int(d) for d in m.group(1).split(",") if d)
              for m in re.finditer(r"= \w+\[([0-9,]*)\]\S* all-gather", hlo)}
  assert gathered, "no all-gather at all: is the base split?"
  assert not gathered & weights, gathered & weights


def test_sampler_and_evaluation_on_the_split_base(worker):
  _, samples, _ = worker
  one = samples["samples"]["one"]
  assert one["auto"] == one["unrolled"]
  for m in ("model4", "model8"):
    got = samples["samples"][m]
    assert got["unrolled"] == one["unrolled"], m
    assert got["auto"] == one["unrolled"], m  # "auto" falls back to plain XLA.
    ppl, math = got["eval"]["heldout_ppl"], got["eval"]["math_arithmetic"]
    want_ppl, want_math = one["eval"]["heldout_ppl"], one["eval"]["math_arithmetic"]
    assert [r["output"] for r in math["records"]] == [
        r["output"] for r in want_math["records"]]
    assert math["headline"] == want_math["headline"]
    np.testing.assert_allclose([r["nll"] for r in ppl["records"]],
                               [r["nll"] for r in want_ppl["records"]], rtol=1e-6)
    np.testing.assert_allclose(ppl["perplexity"], want_ppl["perplexity"], rtol=1e-6)


# ----------------------------------------------------------------------------
# In-process (one device): the layout rules and the config field.


def test_base_spec_rules():
  spec = parallel.base_spec
  assert spec(("layers", "q", "w"), (32, 4096, 4096), 8) == P(None, None, "model")
  assert spec(("layers", "q", "b"), (28, 3584), 4) == P(None, "model")
  assert spec(("layers", "o", "w"), (32, 4096, 4096), 8) == P(None, "model", None)
  assert spec(("layers", "o", "b"), (32, 4096), 8) == P()
  assert spec(("layers", "down", "w"), (32, 14336, 4096), 8) == P(None, "model", None)
  assert spec(("layers", "mlp_norm"), (32, 4096), 8) == P()
  assert spec(("embed",), (128256, 4096), 8) == P("model", None)
  assert spec(("lm_head",), (4096, 128256), 8) == P(None, "model")
  # Qwen2.5-7B's vocabulary 152064 divides 8; a vocabulary that does not
  # falls back to the hidden dimension; the layer axis is never split.
  assert spec(("embed",), (259, 32), 8) == P(None, "model")
  assert spec(("layers", "k", "w"), (8, 12, 12), 8) == P()
  # Unstacked layers (decoding): no layer axis to skip.
  assert spec(("layers", "0", "gate", "w"), (4096, 14336), 8) == P(None, "model")
  assert spec(("layers", "q", "w"), (32, 4096, 4096), 1) == P()


def test_model_parallel_must_divide_the_devices():
  with pytest.raises(ValueError, match=r"config\.mesh\.model_parallel=2 must be >= 1 "
                     r"and divide the 1 devices"):
    parallel.make_mesh(model_parallel=2)
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {"clients": 1, "model": 1}
  config = config_blocks.base_config()
  assert config.mesh.model_parallel == 1
  config.mesh.model_parallel = 0
  with pytest.raises(ValueError, match=r"mesh\.model_parallel"):
    validate.validate(config)
