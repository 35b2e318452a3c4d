"""Training decoder LMs: pure steps, mesh sharding, checkpoints and a thin loop.

  step.py        TrainState, train_step / eval_step (next-token cross-entropy), adamw_cosine
  sharding.py    --mesh=data:2,fsdp:4,tensor:1 -> Mesh, parameter/batch NamedShardings, jit
  checkpoint.py  orbax CheckpointManager: async, keep-N, atomic; restores onto any mesh
  tensorboard.py EventWriter: TensorBoard scalar event files, written without TensorFlow
  progress.py    Progress: a bar with ETA on a terminal, plain log lines otherwise
  loop.py        the training loop: prefetch, metrics.jsonl, TensorBoard, validation, results.json
"""

from nlj.train.checkpoint import Checkpoints
from nlj.train.loop import TrainConfig, prefetch, train
from nlj.train.progress import Progress
from nlj.train.sharding import (BATCH_AXES, MESH_AXES, batch_sharding, create_train_state,
                                jit_eval_step, jit_train_step, make_mesh, param_spec, parse_mesh,
                                shard_batch, state_shardings)
from nlj.train.step import (TrainState, adamw_cosine, init_train_state, make_eval_step,
                            make_train_step, next_token_loss, split_model)
from nlj.train.tensorboard import EventWriter

__all__ = ["BATCH_AXES", "Checkpoints", "EventWriter", "MESH_AXES", "Progress", "TrainConfig",
           "TrainState", "adamw_cosine", "batch_sharding", "create_train_state",
           "init_train_state", "jit_eval_step", "jit_train_step", "make_eval_step", "make_mesh",
           "make_train_step", "next_token_loss", "param_spec", "parse_mesh", "prefetch",
           "shard_batch", "split_model", "state_shardings", "train"]
