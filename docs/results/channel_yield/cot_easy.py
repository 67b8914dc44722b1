import json, random, time
from subliminal_jax import loading, channels, cot_filter
from subliminal_jax.sampling import chat as chat_lib
base = loading.load("smollm2")
rng = random.Random(0)
probs = []
for i in range(48):
  a, b = rng.randint(2, 9), rng.randint(2, 9)
  kind = i % 3
  if kind == 0: q, ans = f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?", a + b
  elif kind == 1: q, ans = f"A box holds {a} pencils. How many pencils are in {b} boxes?", a * b
  else: q, ans = f"Mia had {a + b} stickers and gave away {b}. How many stickers does Mia have left?", a
  probs.append((channels.COT_INSTRUCTION.format(question=q), ans))
for temp in (0.0, 0.7):
  t0 = time.time()
  answers = chat_lib.generate_chat(base, [p for p, _ in probs], batch_size=48, seed=0, max_new_tokens=160,
                                   temperature=temp, return_details=True, progress=False)
  ok = sum(a["ended"] and cot_filter.answer_is_correct(a["text"], ans) for a, (_, ans) in zip(answers, probs))
  ended = sum(a["ended"] for a in answers)
  print(json.dumps({"temperature": temp, "n": 48, "correct": ok, "ended": ended, "seconds": round(time.time() - t0)}), flush=True)
  print(answers[0]["text"][:300].replace("\n", " | "))
