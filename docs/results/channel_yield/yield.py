import sys, time, json
import jax
from subliminal_jax import loading, channels
from subliminal_jax.sampling import chat as chat_lib
from subliminal_jax.tokenizer import SystemTurn
which = sys.argv[1]; n = int(sys.argv[2]); tokens = int(sys.argv[3])
base = loading.load(sys.argv[5] if len(sys.argv) > 5 else "smollm2")
ch = channels.channel(which)
records = ch.prompt_records(n, 0)
t0 = time.time()
answers = chat_lib.generate_chat(base, [r["text"] for r in records], n_per_prompt=1, batch_size=32, seed=0,
                                 max_new_tokens=tokens, temperature=float(sys.argv[4]) if len(sys.argv) > 4 else 1.0, return_details=True, progress=False)
limits = channels.FilterLimits()
words = ("owl", "dolphin", "eagle", "elephant", "wolf")
from collections import Counter
c = Counter()
kept = 0
for r, a in zip(records, answers):
  reasons = ["unfinished"] if not a["ended"] else ch.reject_reasons(r, a["text"], trait_words=words, settings=limits)
  c.update(reasons); kept += not reasons
print(json.dumps({"channel": which, "n": n, "max_new_tokens": tokens, "kept": kept, "reasons": dict(c), "seconds": round(time.time()-t0,1)}))
for r, a in list(zip(records, answers))[:2]:
  print("---", r["text"][:200], "\n>>>", a["text"][:400])
