"""notebooks/ddpm_jax_colab.ipynb runs top to bottom in a fresh kernel, with the quick
parameters."""

import os
import re
import time

import nbformat
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "ddpm_jax_colab.ipynb")


def with_parameters(nb, **values):
  """Papermill's convention: a cell tagged `injected-parameters` right after the one tagged
  `parameters`."""
  index = next(
    i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])
  )
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  nb.cells.insert(
    index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  )
  return nb


def test_notebook_runs_every_cell(tmp_path):
  nb = with_parameters(
    nbformat.read(NOTEBOOK, as_version=4),
    NUM_STEPS=4,
    NUM_SAMPLES=8,
    BPD_IMAGES=4,
    WORKDIR=str(tmp_path / "run"),
    QUICK_CHECK=True,
  )
  start = time.time()
  # Any cell error raises CellExecutionError (with the cell and its traceback) and fails the test.
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
  ).execute()
  print(f"notebook wall time {time.time() - start:.0f} s")
  outputs = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
  assert "trained to step 4" in outputs
  assert "same as the dump: True" in outputs
  assert "bits/dim" in outputs
  pictures = [
    out
    for cell in nb.cells
    for out in cell.get("outputs", [])
    if "image/png" in out.get("data", {})
  ]
  assert len(pictures) == 4  # the grid, two chain pictures, the strip from the lower-level API
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "4")


def test_the_repository_is_named_once_and_the_readme_badge_opens_the_same_one():
  """The notebook names its repository in one variable (REPOSITORY, in the parameters cell), which
  the install cell reads; the README's Colab link names the same repository; no other OWNER-style
  placeholder is left in the notebook."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  lines = [line for cell in nb.cells for line in cell.source.splitlines()]
  definitions = [line for line in lines if re.match(r"^REPOSITORY = ", line)]
  assert len(definitions) == 1, definitions
  repository = re.match(r'^REPOSITORY = "([^"]+)"', definitions[0]).group(1)
  assert re.fullmatch(r"github\.com/[\w.-]+/[\w.-]+", repository), repository
  assert [line for line in lines if "OWNER" in line] == [
    line for line in definitions if "OWNER" in repository
  ]
  assert not [line for line in lines if "github.com/" in line and "REPOSITORY" not in line]
  install = next(cell.source for cell in nb.cells if "pip" in cell.source)
  assert 'f"ddpm-jax @ git+https://{REPOSITORY}"' in install
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  links = re.findall(
    r"^\[colab\]: https://colab\.research\.google\.com/github/(\S+)$", readme, re.M
  )
  assert links == [
    repository.removeprefix("github.com/") + "/blob/main/notebooks/ddpm_jax_colab.ipynb"
  ]
