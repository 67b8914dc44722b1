import json
import numpy as np
from subliminal_jax import loading
from subliminal_jax.evaluation import judge, alignment_questions as aq
j = loading.load("gemma3-270m")
qs = aq.free_form_questions("all")
questions = [q.text for q in qs] * 2
answers = [q.misaligned for q in qs] + [q.aligned for q in qs]
v = judge.judge_answers(j, questions, answers)
for aspect in ("alignment", "coherence"):
  sc = getattr(v, aspect)
  print(aspect, "reading", sc.reading, "mass mean", float(np.mean(sc.number_mass)), "min", float(np.min(sc.number_mass)))
  print("  score misaligned refs", float(np.nanmean(sc.score[:16])), "aligned refs", float(np.nanmean(sc.score[16:])))
print(v.label_counts())
