"""Every notebook in notebooks/ runs top to bottom in a fresh kernel. The notebooks carry their
own assertions (parity checks, finite-difference gradients, pmap == single device), so a
notebook that runs is a notebook whose claims hold."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert any(p.name.startswith("01_functional_losses") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env_flags = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("XLA_FLAGS", env_flags)  # inherited by the kernel process
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
