"""The reference engines: transformers' Llama with torch (eager or ``torch.compile``), same shapes.

* :class:`TorchTrainer`: one AdamW step (cross-entropy on every token, global-norm clipping) of
  full finetuning or LoRA (peft), in float32 or with bfloat16 autocast over float32 weights
  (the mixed precision ours uses with ``dtype=bfloat16``).
* :func:`hf_model_with_our_weights`: transformers' model holding exactly our model's weights.
* :func:`generate`: ``model.generate`` under the same number grammar as ours, applied by
  :class:`GrammarProcessor` (a ``LogitsProcessor``: one DFA state per row, vectorised gathers).
  With ``static_cache=True`` transformers compiles the decode step on an accelerator.

torch and transformers are used here only (references), never by the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["device", "synchronize", "empty_cache", "TorchTrainer", "hf_model_with_our_weights", "GrammarProcessor", "generate",
           "count_new_tokens"]


def device() -> str:
  """The accelerator torch sees (cuda), else cpu."""
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def empty_cache() -> None:
  """Returns torch's cached accelerator memory (before the next engine allocates its own)."""
  import gc
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


class TorchTrainer:
  """transformers' model of ``config``'s shape (random weights) and its AdamW step."""

  def __init__(self, config, batch: int, length: int, *, dtype: str = "float32",
               lora_rank: int = 0, lora_targets: tuple[str, ...] = (), compile: bool = False):
    import torch
    import transformers
    torch.manual_seed(0)
    self.torch, self.device = torch, device()
    hf_config = transformers.AutoConfig.for_model(**config.replace(dtype="float32").to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    if lora_rank:
      import peft
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets), lora_dropout=0.0))
    self.model = model.to(self.device).train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.parameters = trainable
    self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    rs = np.random.RandomState(0)
    self.ids = torch.tensor(rs.randint(0, config.vocab_size, (batch, length)).astype(np.int64),
                            device=self.device)
    self.autocast = dtype == "bfloat16"
    self.forward = torch.compile(self.model) if compile else self.model

  def step(self) -> float:
    torch = self.torch
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      loss = self.forward(input_ids=self.ids, labels=self.ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.item()  # waits for the step


def hf_model_with_our_weights(model, dtype: str = "float32"):
  """transformers' LlamaForCausalLM holding exactly ``model``'s weights, on :func:`device`."""
  import torch
  import transformers
  from subliminal_jax.weights import hf_layout
  config = transformers.AutoConfig.for_model(**model.config.to_hf())
  hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  tensors = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in hf_layout.hf_tensors_from_model(model).items()}
  missing, unexpected = hf.load_state_dict(tensors, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise RuntimeError(f"weights did not move to transformers: missing {missing}, unexpected {unexpected}")
  hf.tie_weights()
  return hf.to(device=device(), dtype=getattr(torch, dtype)).eval()


class GrammarProcessor:
  """A token grammar as a transformers LogitsProcessor (state per row, torch gathers)."""

  def __init__(self, grammar, end_ids, prompt_length: int, vocab: int):
    import torch
    table = np.asarray(grammar.transitions, np.int64)
    table = np.pad(table, ((0, 0), (0, vocab - table.shape[1])), constant_values=-1)
    self.table = torch.from_numpy(table).to(device())
    self.accepting = torch.from_numpy(np.asarray(grammar.accepting, bool)).to(device())
    self.end_ids = torch.tensor(list(end_ids), device=device())
    self.initial = int(grammar.initial_state)
    self.prompt_length = prompt_length
    self.state = None

  def __call__(self, input_ids, scores):
    import torch
    if input_ids.shape[1] == self.prompt_length:
      self.state = torch.full((input_ids.shape[0],), self.initial, dtype=torch.long,
                              device=input_ids.device)
    else:
      nxt = self.table[self.state, input_ids[:, -1]]
      self.state = torch.where(nxt >= 0, nxt, self.state)
    allowed = self.table[self.state] >= 0
    allowed[:, self.end_ids] = self.accepting[self.state][:, None]
    return scores.masked_fill(~allowed, float("-inf"))


def generate(hf, ids: np.ndarray, mask: np.ndarray, grammar, end_ids, *, max_new_tokens: int,
             pad_id: int, seed: int = 0, static_cache: bool = False) -> np.ndarray:
  """Grammar-constrained sampling at temperature 1; the new tokens [B, <= max_new_tokens]."""
  import torch
  import transformers
  processor = GrammarProcessor(grammar, end_ids, ids.shape[1], hf.config.vocab_size)
  extra: dict[str, Any] = {"cache_implementation": "static"} if static_cache else {}
  torch.manual_seed(seed)
  with torch.no_grad():
    out = hf.generate(
        input_ids=torch.from_numpy(ids.astype(np.int64)).to(device()),
        attention_mask=torch.from_numpy(mask.astype(np.int64)).to(device()),
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        logits_processor=transformers.LogitsProcessorList([processor]),
        eos_token_id=list(end_ids), pad_token_id=pad_id, **extra)
  synchronize()
  return out[:, ids.shape[1]:].cpu().numpy()


def count_new_tokens(tokens: np.ndarray, end_ids) -> int:
  """Generated tokens up to and including each row's first end token, summed over rows."""
  is_end = np.isin(tokens, list(end_ids))
  first_end = np.where(is_end.any(1), is_end.argmax(1) + 1, tokens.shape[1])
  return int(first_end.sum())
