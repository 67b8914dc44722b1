"""The accelerator suite's whole code path on this CPU with tiny sizes: every part runs in its own
process and the JSON carries each figure with its ratios, MFU and target."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_suite_reports_every_part_with_ratios_mfu_and_targets(tmp_path):
  command = [
      sys.executable, "-m", "benchmarks.accelerator_suite", "--json", "--shape=tiny",
      "--train_batch=2", "--train_length=16", "--train_steps=1", "--sample_batch=4",
      "--prompt_tokens=8", "--new_tokens=4", "--peak_matmul_size=128", "--torch_compile=false",
      "--job_config=configs/animal_numbers.py:tiny", "--job_flag=--stages=prompts",
      f"--workdir={tmp_path}", "--budget_s=600"]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert {"train", "sample", "job"} <= set(result)

  train = result["train"]
  assert "error" not in train, train.get("error")
  assert train["tokens_per_step"] == 32 and train["peak"]["flops_per_s"] > 0
  for name in ("full", "lora_r8"):
    entry = train[name]
    for engine in ("ours", "torch_eager"):
      assert entry[engine]["tokens_per_s"] > 0 and 0 < entry[engine]["mfu"], (name, engine)
    assert entry["ratio_to_torch_eager"] == (entry["ours"]["tokens_per_s"]
                                             / entry["torch_eager"]["tokens_per_s"])
    assert entry["target_tokens_per_s"] == 500_000
    assert entry["ours_share_of_target"] == entry["ours"]["tokens_per_s"] / 500_000
    assert "torch_compile" not in entry  # --torch_compile=false

  sample = result["sample"]
  assert "error" not in sample, sample.get("error")
  assert 1 <= sample["ours"]["steps"] <= 4 and sample["ours"]["new_tokens"] <= 16
  assert sample["hf_dynamic_cache"]["new_tokens"] <= 16
  assert sample["ratio_to_hf_dynamic_cache"] > 0 and sample["ours"]["mfu"] > 0

  # The job stops after its one selected stage (the next one's artifact is missing): the suite
  # reports what finished and why it stopped.
  job = result["job"]
  assert job["finished"] is False and job["ratio_to_target"] is None
  assert [s["stage"] for s in job["stages"]] == ["prompts"]
  assert job["stages"][0]["compile_seconds"] is not None
  assert "does not exist yet: add 'sampling' to --stages" in job["log_tail"]
  assert (tmp_path / "model" / "config.json").exists()
