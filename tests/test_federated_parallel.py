"""The client mesh: 8 emulated CPU devices give the result of 1 device."""

import os
import pathlib
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("federated_parallel_worker.py")


def _run_worker(tmp_path, num_devices):
  out = tmp_path / f"devices{num_devices}.npz"
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(WORKER), str(out), str(num_devices)],
                        env=env, capture_output=True, text=True, timeout=300,
                        cwd=WORKER.parent.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as f:
    return dict(f)


def test_eight_devices_equal_one_device(tmp_path):
  one = _run_worker(tmp_path, 1)
  eight = _run_worker(tmp_path, 8)
  assert int(one["sharded"]) == 1 and int(eight["sharded"]) == 8
  assert one.keys() == eight.keys()
  assert int(eight["round"]) == 2 and not eight["r1_nonfinite"]
  assert np.abs(eight["client_controls"]).sum() > 0
  # 8 devices: the 6 sampled clients were padded to 8 with weight-0 clients.
  assert one["r0_client_loss"].shape == (6,) and eight["r0_client_loss"].shape == (8,)
  np.testing.assert_array_equal(eight["r0_client_tokens"][6:], 0.0)
  for k in one.keys() - {"sharded"}:
    a = eight[k][:6] if k.endswith(("client_loss", "client_tokens")) else eight[k]
    np.testing.assert_allclose(a, one[k], atol=1e-6, rtol=1e-6, err_msg=k)
