"""Compile the fused SSD kernel for NVIDIA GPUs we do not have (compile-only devices) over a grid of shapes.

    python benchmarks/ssd_compile_grid.py [--targets h100 a100] [--dtypes float32 bfloat16] [--head-dims 64 80 128]
                                          [--state-sizes 64 128] [--chunks 64 128 256] [--no-configs] [--jobs 1]
                                          [--timeout 1800] [--no-verify-refusals] [--fast-ptxas]

Needs the ``gpu-aot`` extra. For every shape (and every config's Mamba shape) and target, one of:

- ``compiles (Ns)``: ``supports`` accepts the shape and the kernel's forward compiles (Triton, PTX, ptxas) in a worker
  process, in N seconds;
- ``refused``: ``supports`` refuses it, with the kernel and bytes it names; the kernel compiled anyway (bypassing
  dispatch) confirms the refusal when Triton fails on its shared-memory limit (``Triton: needs N``), or shows that
  the model is conservative there (``compiles anyway``);
- ``FAILED``: ``supports`` accepts it but the compile fails (the message follows the table).

Prints a Markdown table. Each compile runs in its own process; fp32 at chunk 256 takes minutes per shape in ptxas,
seconds with ``--fast-ptxas`` (ptxas without optimisation: the same shared memory, which Triton allocates before
ptxas runs; unoptimised registers spill rather than fail).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import pathlib
import platform
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elastic_jax import aot  # pylint: disable=wrong-import-position
from elastic_jax.aot import programs  # pylint: disable=wrong-import-position
from elastic_jax.ops.kernel_registry import Target  # pylint: disable=wrong-import-position
from elastic_jax_kernels.ssd import api  # pylint: disable=wrong-import-position

# What dispatch sees for each target (the compile-only devices report the same kind and compute capability).
TARGETS = {"h100": Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0)), "h200": Target("gpu", "NVIDIA H200", (9, 0)),
           "a100": Target("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))}


def config_shapes() -> list[tuple[str, dict]]:
  rows = []
  for path in sorted((ROOT / "configs").glob("*.py")):
    model = programs.load_config(str(path)).model
    rows.append((path.stem, dict(dtype=model.dtype, head_dim=model.mamba_head_dim, state_size=model.ssm_state_size,
                                 chunk_size=model.chunk_size, heads=model.mamba_num_heads, groups=model.n_groups)))
  return rows


def run_one(kind: str, shape: dict, timeout: float, verify_refusals: bool, env: dict) -> tuple[str, str]:
  """(table cell, detail for failures) for one shape on one target."""
  reason = api.unsupported_reason((1, 2 * shape["chunk_size"], shape.get("heads", 2), shape["head_dim"]),
                                  shape["dtype"], TARGETS[kind], state_size=shape["state_size"],
                                  chunk_size=shape["chunk_size"])
  target = f"{kind}:1x1x1"
  start = time.perf_counter()
  if reason is not None:
    cell = f"refused: {reason.replace(' bytes of shared memory per block', ' B')}"
    if not verify_refusals:
      return cell, ""
    try:
      aot.compile_in_subprocess("ssd_pallas", target, timeout=timeout, env=env, **shape)
      return f"{cell}; compiles anyway ({time.perf_counter() - start:.0f} s)", ""
    except aot.CompileFailed as failure:
      requested = re.search(r"requested (\d+)", str(failure))
      if requested:
        return f"{cell}; Triton: needs {int(requested.group(1)):,}", ""
      return f"{cell}; fails otherwise", str(failure)
  try:
    result = aot.compile_in_subprocess("ssd", target, timeout=timeout, env=env, impl="pallas", backward=False,
                                       **shape)
  except aot.CompileFailed as failure:
    return f"FAILED ({failure.reason})", str(failure)
  if result.pallas_kernels != ("ssd_chunk_output", "ssd_state_passing"):
    return "FAILED (kernel not dispatched)", f"kernels in the program: {result.pallas_kernels}"
  return f"compiles ({result.compile_seconds:.0f} s)", ""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--targets", nargs="+", default=["h100", "a100"], choices=sorted(TARGETS))
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 80, 128])
  parser.add_argument("--state-sizes", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--no-configs", action="store_true", help="skip the configs' Mamba shapes")
  parser.add_argument("--no-verify-refusals", action="store_true", help="do not compile refused shapes")
  parser.add_argument("--jobs", type=int, default=1, help="compiles at once (each is one process)")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
  parser.add_argument("--fast-ptxas", action="store_true", help="ptxas without optimisation (much faster for fp32)")
  args = parser.parse_args()
  env = {}
  if args.fast_ptxas:
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_disable_gpuasm_optimizations=true").strip()
  missing = aot.unavailable_reason(args.targets[0])
  if missing:
    sys.exit(f"ssd_compile_grid: {missing}.")

  rows = [("", dict(dtype=dtype, head_dim=p, state_size=n, chunk_size=chunk))
          for dtype, p, n, chunk in itertools.product(args.dtypes, args.head_dims, args.state_sizes, args.chunks)]
  if not args.no_configs:
    rows += config_shapes()
  print(f"SSD kernel forward, compile-only {', '.join(args.targets)}, {len(rows)} shapes, {os.cpu_count()} CPUs"
        f"{', ptxas without optimisation' if args.fast_ptxas else ''} ({platform.machine()})", flush=True)
  jobs = {(i, kind): (kind, shape) for i, (_, shape) in enumerate(rows) for kind in args.targets}
  cells, details = {}, []
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = {pool.submit(run_one, kind, shape, args.timeout, not args.no_verify_refusals, env): key
               for key, (kind, shape) in jobs.items()}
    for future in concurrent.futures.as_completed(futures):
      key = futures[future]
      cells[key], detail = future.result()
      name, shape = rows[key[0]]
      print(f"  {key[1]} {name or ''} {shape}: {cells[key]}", file=sys.stderr, flush=True)
      if detail:
        details.append(f"- {key[1]} {shape}: {detail}")

  print()
  print("| config | dtype | head dim | state | chunk | " + " | ".join(kind.upper() for kind in args.targets) + " |")
  print("|---|---|---|---|---|" + "---|" * len(args.targets))
  for i, (name, shape) in enumerate(rows):
    print(f"| {name} | {shape['dtype']} | {shape['head_dim']} | {shape['state_size']} | {shape['chunk_size']} | "
          + " | ".join(cells[(i, kind)] for kind in args.targets) + " |")
  for kind in args.targets:
    column = [cells[(i, kind)] for i in range(len(rows))]
    counts = {label: sum(cell.startswith(label) for cell in column) for label in ("compiles", "refused", "FAILED")}
    print(f"\n{kind.upper()}: " + ", ".join(f"{count} {label}" for label, count in counts.items()))
  if details:
    print("\nFailures:\n" + "\n".join(details))


if __name__ == "__main__":
  main()
