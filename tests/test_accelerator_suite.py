"""The accelerator suite's whole code path on this CPU with tiny sizes: every part runs in its own
process and the JSON carries each figure with its ratios, MFU and target."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

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
  tokens = 2 * 16  # --train_batch x --train_length
  peak = train["peak"]["flops_per_s"]
  assert train["tokens_per_step"] == tokens and peak > 0
  # Useful FLOPs of one step of the tiny shape (hidden 64, intermediate 128, 4 heads and 2 KV heads
  # of 16, 2 layers, SmolLM2's 49152-token vocabulary), by hand: each layer's matmul weights are
  # q 64*64 + k, v 2*64*32 + o 64*64 + gate, up 2*64*128 + down 128*64 = 36864, so the body is
  # 73728 and the head 64*49152 = 3145728, 3219456 in all. Full: 6 * 3219456 * 32 tokens. LoRA r8
  # on all seven projections: 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192) = 8192 adapter weights a
  # layer, 16384 in all, and (4 * 3219456 + 6 * 16384) * 32.
  step_flops = {"full": 618_135_552, "lora_r8": 415_236_096}
  for name in ("full", "lora_r8"):
    entry = train[name]
    ours, eager = entry["ours"], entry["torch_eager"]
    for engine in ("ours", "torch_eager"):
      figures = entry[engine]
      assert figures["seconds"] > 0, (name, engine)
      assert figures["tokens_per_s"] == pytest.approx(tokens / figures["seconds"]), (name, engine)
      assert figures["mfu"] * figures["seconds"] * peak == pytest.approx(step_flops[name]), (
          name, engine)
    # The same tokens in both engines: the throughput ratio is the inverse ratio of step times.
    assert entry["ratio_to_torch_eager"] == pytest.approx(eager["seconds"] / ours["seconds"])
    assert entry["target_tokens_per_s"] == 500_000
    assert entry["ours_share_of_target"] == pytest.approx(tokens / ours["seconds"] / 500_000)
    assert "torch_compile" not in entry  # --torch_compile=false

  sample = result["sample"]
  assert "error" not in sample, sample.get("error")
  assert 1 <= sample["ours"]["steps"] <= 4 and sample["ours"]["new_tokens"] <= 16
  assert sample["hf_dynamic_cache"]["new_tokens"] <= 16
  assert sample["ours"]["mfu"] > 0
  ours, hf = sample["ours"], sample["hf_dynamic_cache"]
  assert sample["ratio_to_hf_dynamic_cache"] == pytest.approx(
      (ours["new_tokens"] / ours["seconds"]) / (hf["new_tokens"] / hf["seconds"]))

  # The job stops after its one selected stage (the next one's artifact is missing): the suite
  # reports what finished and why it stopped.
  job = result["job"]
  assert job["finished"] is False and job["ratio_to_target"] is None
  assert [s["stage"] for s in job["stages"]] == ["prompts"]
  assert job["stages"][0]["compile_seconds"] is not None
  assert "does not exist yet: add 'sampling' to --stages" in job["log_tail"]
  assert (tmp_path / "model" / "config.json").exists()
