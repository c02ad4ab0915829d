"""Launch files: the shell scripts parse (bash -n), the GKE manifests are valid YAML JobSets whose commands and
variables match what the package reads."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

from elastic_jax.train import distributed

LAUNCH = pathlib.Path(__file__).parent.parent / "launch"


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
  bash = shutil.which("bash")
  assert bash, "bash is needed to check the launch scripts"
  result = subprocess.run([bash, "-n", str(LAUNCH / script)], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr


def test_tpu_script_refuses_unknown_commands_and_a_missing_bucket():
  env = {k: v for k, v in os.environ.items() if k != "BUCKET"}
  env.update(PROJECT="p")  # keeps gcloud out of it
  usage = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "bogus"], capture_output=True, text=True, env=env,
                         timeout=30)
  assert usage.returncode == 2 and "usage:" in usage.stderr
  no_bucket = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "train"], capture_output=True, text=True, env=env,
                             timeout=30)
  assert no_bucket.returncode == 2 and "set BUCKET" in no_bucket.stderr


def test_gke_jobsets_parse_and_run_the_main_job():
  documents = list(yaml.safe_load_all((LAUNCH / "gke_jobset.yaml").read_text()))
  assert [d["metadata"]["name"] for d in documents] == ["elastic-jax-tpu", "elastic-jax-gpu"]
  for document in documents:
    assert document["apiVersion"].startswith("jobset.x-k8s.io/") and document["kind"] == "JobSet"
    job = document["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"]
    container = job["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "elastic_jax.train"]
    assert "--config" in container["args"] and "--workdir" in container["args"]
  # The GPU JobSet names every explicit variable the package reads, with a coordinator that parses.
  gpu = documents[1]["spec"]["replicatedJobs"][0]
  env = {e["name"]: e for e in gpu["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
  assert set(env) == {distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID}
  assert int(env[distributed.ENV_NUM_PROCESSES]["value"]) == gpu["template"]["spec"]["parallelism"]
  settings = distributed.settings_from_env({distributed.ENV_COORDINATOR: env[distributed.ENV_COORDINATOR]["value"],
                                            distributed.ENV_NUM_PROCESSES: env[distributed.ENV_NUM_PROCESSES]["value"],
                                            distributed.ENV_PROCESS_ID: "1"})
  jobset, job_name = documents[1]["metadata"]["name"], gpu["name"]
  assert settings.coordinator_address.startswith(f"{jobset}-{job_name}-0-0.{jobset}:")
