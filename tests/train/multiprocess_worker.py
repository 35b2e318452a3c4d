"""One process of ``test_multiprocess.py``: a 4-step run of ``nlj.train.train`` in a 2-process job.

``python -m tests.train.multiprocess_worker ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR`` (from the
repository root) joins the job through ``launch.initialize_distributed``, trains the tiny
transformer on a ``data:2,fsdp:-1`` mesh over every process's devices, and prints one JSON line:
``{"process", "devices", "local_devices", "losses" (one per step), "val_loss"}``.
"""

import json
import sys

import launch


def main(address: str, num_processes: int, process_id: int, workdir: str) -> None:
  launch.initialize_distributed(address, num_processes, process_id)
  import jax  # pylint: disable=import-outside-toplevel
  from nlj.train import loop  # pylint: disable=import-outside-toplevel

  losses = []
  jit_train_step = loop.jit_train_step

  def recording_jit_train_step(*args):  # keeps every step's (replicated) loss on the devices
    step = jit_train_step(*args)

    def run(state, batch):
      state, metrics = step(state, batch)
      losses.append(metrics["loss"])
      return state, metrics

    return run

  loop.jit_train_step = recording_jit_train_step
  config = loop.TrainConfig(family="transformer", size="tiny", steps=4, batch_size=4, seq_len=16,
                            warmup=1, log_every=2, checkpoint_every=2, eval_batches=2,
                            mesh="data:2,fsdp:-1")
  results = loop.train(config, workdir)
  print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(),
                    "losses": [float(x) for x in jax.device_get(losses)],
                    "val_loss": results["val_loss"]}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
