"""``lm/<family>_<size>``: train a preset decoder LM on the embedded corpus (:mod:`nlj.train`).

One experiment per registered family (``nlj.models.families()`` at import time) and size:

* ``tiny`` -- 2 layers, d 32, byte tokens; 200 steps of 16 × 128 tokens, a CPU-sized run;
* ``small`` -- ~50M parameters, 32k SentencePiece tokens; 2000 steps of 32 × 512 tokens, FSDP
  over every device (``--mesh`` or ``--config.mesh`` picks another layout), bfloat16 compute
  and rematerialised blocks (``remat``) so that every family's step fits one 80 GB GPU.

Outputs in the workdir: ``metrics.jsonl``, TensorBoard event files, ``results.json``
(validation loss and perplexity), ``loss.png``, ``checkpoints/``; rerunning with the same
workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

from nlj.models import families
from nlj.train.loop import TrainConfig, train
from nlj_experiments import register

LMConfig = TrainConfig

_SIZES = {
    "tiny": dict(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup=20,
                 tokenizer="bytes", mesh="data:-1", checkpoint_every=100, log_every=10),
    "small": dict(steps=2000, batch_size=32, seq_len=512, learning_rate=1e-3, warmup=200,
                  tokenizer="llama32k", mesh="fsdp:-1", checkpoint_every=500, log_every=50,
                  dtype="bfloat16", remat=True),
}

for _family in families():
  for _size, _fields in _SIZES.items():
    register(f"lm/{_family}_{_size}",
             f"{_family} decoder LM, {_size} preset, on the offline-mix corpus "
             f"({_fields['tokenizer']} tokens); resumable",
             LMConfig(family=_family, size=_size, **_fields))(train)
