"""Packaging of the kernels: the top-level kernels/ folder installs as ``elastic_jax_kernels``, a name of our own.

``kernels`` is Hugging Face's kernel-hub package, which transformers imports when it is installed. Neither package may
hide the other: ours dispatches its Pallas SSD with theirs installed, and from the repository root (first on
``sys.path`` under ``python -m``) our folder does not shadow theirs. And the ops and the kernels meet only in the
registry, so neither imports the other.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS_PACKAGE = "elastic_jax_kernels"


def package_folders(folder: pathlib.Path, name: str) -> set[str]:
  """Dotted names of ``folder`` and every folder below it that holds files (package data included)."""
  names = set()
  for path in [folder, *folder.rglob("*")]:
    if path.is_dir() and "__pycache__" not in path.parts and any(child.is_file() for child in path.iterdir()):
      names.add(".".join([name, *path.relative_to(folder).parts]))
  return names


def test_pyproject_lists_every_package_and_maps_the_kernels_folder():
  setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert setuptools["package-dir"] == {KERNELS_PACKAGE: "kernels"}
  on_disk = package_folders(ROOT / "elastic_jax", "elastic_jax") | package_folders(ROOT / "kernels", KERNELS_PACKAGE)
  assert sorted(setuptools["packages"]) == sorted(on_disk), "add new packages to [tool.setuptools] packages"
  # No __init__.py: from the repository root the folder is at most a namespace portion named `kernels`, which any
  # installed `kernels` package takes precedence over.
  assert not (ROOT / "kernels" / "__init__.py").exists()


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module ``path`` imports, at any level of its code."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module)
  return names


def test_the_ops_and_the_kernels_meet_only_in_the_registry():
  for path in (ROOT / "elastic_jax").rglob("*.py"):
    kernel_imports = {name for name in imported_modules(path) if name.startswith(KERNELS_PACKAGE)}
    if path.parent.name != "aot":  # elastic_jax.aot compiles the kernel alone, bypassing dispatch
      assert not kernel_imports, f"{path.relative_to(ROOT)} imports {kernel_imports}"
  for path in (ROOT / "kernels").rglob("*.py"):
    ours = {name for name in imported_modules(path) if name.split(".")[0] == "elastic_jax"}
    assert ours <= {"elastic_jax.ops.kernel_registry", "elastic_jax.ops"}, f"{path.relative_to(ROOT)} imports {ours}"


# Stands in for Hugging Face's `kernels`: a regular top-level package of that name.
FAKE_HUB_KERNELS = '''"""Hugging Face's kernel hub, as far as imports can tell."""
__version__ = "0.17.2"
FROM_THE_HUB = True
'''

# Fails on the warning dispatch gives when our kernel package cannot be imported.
CHECK_DISPATCH = textwrap.dedent("""
    import functools, warnings
    warnings.filterwarnings("error", message=".*kernel package.*")
    import kernels
    assert getattr(kernels, "FROM_THE_HUB", False), f"import kernels found {kernels.__path__}, not the hub's"

    import jax, jax.numpy as jnp
    from elastic_jax.ops import kernel_registry, ssd

    h100 = kernel_registry.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    kernel = kernel_registry.find_kernel("ssd", (1, 512, 8, 64), jnp.bfloat16, h100, state_size=128, chunk_size=128)
    assert kernel is not None and kernel.name == "pallas_triton", kernel

    # The whole dispatch path on this CPU, the kernel in interpret mode (ELASTIC_JAX_PALLAS_INTERPRET=1).
    b, l, h, p, g, n = 1, 16, 2, 16, 1, 16
    inputs = dict(x=jnp.zeros((b, l, h, p)), dt=jnp.ones((b, l, h)), A=-jnp.ones((h,)), B=jnp.zeros((b, l, g, n)),
                  C=jnp.zeros((b, l, g, n)))
    program = str(jax.make_jaxpr(functools.partial(ssd.ssd, chunk_size=16, impl="auto"))(**inputs))
    assert "pallas_call" in program, "impl='auto' did not dispatch the Pallas kernel"
    print("DISPATCHED", kernel.name)
""")


@pytest.mark.parametrize("cwd", ["repo_root", "elsewhere"])
def test_pallas_ssd_dispatches_with_hugging_faces_kernels_installed(tmp_path, cwd):
  site = tmp_path / "site"
  (site / "kernels").mkdir(parents=True)
  (site / "kernels" / "__init__.py").write_text(FAKE_HUB_KERNELS)
  # `python -c` puts its working directory first on sys.path, then PYTHONPATH: from the repository root our kernels/
  # folder comes before the hub's package, elsewhere the hub's package comes first.
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu", "ELASTIC_JAX_PALLAS_INTERPRET": "1"}
  result = subprocess.run([sys.executable, "-c", CHECK_DISPATCH], cwd=ROOT if cwd == "repo_root" else tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "DISPATCHED pallas_triton" in result.stdout
