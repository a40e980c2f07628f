"""The notebooks in colabs/: committed without outputs, and each one runs.

Every notebook is executed headless with nbclient at smoke size
(``FEDJAX_U2S_SMOKE=1``) in a kernel that runs this interpreter (so the
``.venv`` the tests run in). A failing cell fails the test with the cell's
source and its error. The notebooks share one workdir, in file order, so
04 reuses the adapter 03 trained (run alone, 04 trains its own).
"""

import json
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL_NAME = "fedjax_u2s_tests"
CELL_TIMEOUT_S = 300     # One cell; the whole notebook must also stay under it.
NOTEBOOK_BUDGET_S = 300  # Per notebook at smoke size on a 2-core CPU.


def test_there_are_notebooks():
  names = [p.name for p in NOTEBOOKS]
  assert len(names) >= 4, names
  for want in ("01_quickstart", "02_u2s_your_text", "03_federated_tuning",
               "04_evaluate_and_export"):
    assert f"{want}.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; "
                     "clear them before committing (e.g. `jupyter nbconvert "
                     "--clear-output --inplace`).")
  assert "widgets" not in nb.metadata, f"{path.name}: widget state in metadata."


def test_first_cells_install_and_read_smoke():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown", path.name
    head = nb.cells[0].source
    for runtime in ("CPU", "GPU", "TPU", "measured", "estimate"):
      assert runtime in head, f"{path.name}: the first cell does not mention {runtime!r}"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert 'find_spec("fedjax_u2s") is None' in code[0], path.name
    assert "REPO_URL" in code[0], path.name
    assert "FEDJAX_U2S_SMOKE" in code[1], path.name


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A kernelspec that runs this interpreter, found first on JUPYTER_PATH."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fedjax_u2s tests", "language": "python"}))
  workdir = tmp_path_factory.mktemp("colab_runs")
  env = {"JUPYTER_PATH": os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]),
         "FEDJAX_U2S_SMOKE": "1", "FEDJAX_U2S_COLAB_WORKDIR": str(workdir),
         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # The kernel is started with a copy of os.environ.
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _execute(nb, cwd: pathlib.Path, name: str):
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    # str(e) holds the cell's source and the traceback; say which notebook.
    pytest.fail(f"{name}: a cell failed.\n{e}", pytrace=False)
  except nbclient.exceptions.CellTimeoutError as e:
    pytest.fail(f"{name}: a cell ran past {CELL_TIMEOUT_S}s.\n{e}", pytrace=False)


def test_kernel_runs_this_interpreter(kernel_env, tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell(
      "import os, sys; print(sys.executable); print(os.environ['FEDJAX_U2S_SMOKE'])")]
  _execute(nb, tmp_path, "probe")
  text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
  assert text.split() == [sys.executable, "1"], text


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_size(path, kernel_env):
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  _execute(nb, COLABS, path.name)
  seconds = time.perf_counter() - start
  print(f"{path.name}: {seconds:.0f}s at smoke size")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  assert seconds < NOTEBOOK_BUDGET_S, (
      f"{path.name} took {seconds:.0f}s at smoke size; the budget is "
      f"{NOTEBOOK_BUDGET_S}s on a 2-core CPU.")
