"""The launch scripts: each one's python command line parses (--dry_run), multi-host flags included,
and each installs the jax build its hardware needs. gcloud and make are stand-ins that record what
they were asked; no TPU or GPU is needed."""

import json
import os
import pathlib
import stat
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/configs/animal_numbers.py:tiny"


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def _stand_ins(tmp_path: pathlib.Path) -> dict[str, str]:
  """PATH with a `make` that logs its arguments and a `gcloud` that runs its --command here."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "make", f'#!/usr/bin/env bash\necho "make $*" >> {tmp_path}/calls.log\n')
  _executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
echo "gcloud $*" >> {tmp_path}/calls.log
for arg in "$@"; do
  case "$arg" in --command=*) exec bash -c "${{arg#--command=}}";; esac
done
""")
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
          "PYTHON": sys.executable}


def _launch(script: str, args: list[str], env: dict[str, str]) -> dict:
  result = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_local_launcher_parses(tmp_path):
  env = _stand_ins(tmp_path)
  parsed = _launch("local.sh", [CONFIG, str(tmp_path / "wd"), "--config.student.seeds=3,",
                                "--dry_run"], env)
  assert parsed["experiment"] == "animal_numbers" and parsed["workdir"] == str(tmp_path / "wd")
  assert parsed["config"]["student"]["seeds"] == [3]
  assert parsed["distributed"] == {"coordinator_address": None, "num_processes": None,
                                   "process_id": None, "auto": False, "timeout_s": 300,
                                   "heartbeat_timeout_s": 100}
  assert not (tmp_path / "wd").exists()


def test_gpu_multihost_launcher_passes_the_jax_distributed_flags(tmp_path):
  env = {**_stand_ins(tmp_path), "JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  parsed = _launch("gpu_multihost.sh", [CONFIG, str(tmp_path / "wd"), "--stages=prompts",
                                        "--distributed_timeout=600", "--dry_run"], env)
  assert parsed["distributed"] == {"coordinator_address": "host0:1234", "num_processes": 4,
                                   "process_id": 2, "auto": False, "timeout_s": 600,
                                   "heartbeat_timeout_s": 100}
  assert parsed["stages"] == ["prompts"]
  assert (tmp_path / "calls.log").read_text().splitlines() == ["make setup-cuda"]


def test_tpu_pod_launcher_installs_the_tpu_build_and_auto_detects(tmp_path):
  repo = tmp_path / "repo"  # the repository as a worker sees it, with its venv's python
  (repo / ".venv" / "bin").mkdir(parents=True)
  _executable(repo / ".venv" / "bin" / "python", f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
  env = {**_stand_ins(tmp_path), "REPO_DIR": str(repo)}
  parsed = _launch("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG, "/mnt/gcs/run 1",
                                  "--config.student.seeds=1,2", "--dry_run"], env)
  assert parsed["distributed"]["auto"] is True and parsed["workdir"] == "/mnt/gcs/run 1"
  assert parsed["config"]["student"]["seeds"] == [1, 2]
  calls = (tmp_path / "calls.log").read_text().splitlines()  # gcloud's --command spans lines
  assert calls[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
  assert calls[-1] == "make setup-tpu"
