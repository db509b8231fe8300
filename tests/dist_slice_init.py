"""Run by test_init under 1 or 2 processes: SLICE init on a tiny model, batches sharded by rank; rank 0 saves."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import toy_examples, wrap  # noqa: E402

from slicelora.data.prompts import make_batches  # noqa: E402
from slicelora.init import init_adapter  # noqa: E402
from slicelora.models import tiny_llama, tiny_tokenizer  # noqa: E402

distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
tokenizer = tiny_tokenizer()
current = make_batches(toy_examples("sentiment"), tokenizer, batch_size=4, max_length=64, seed=1, num_batches=4)
replay = make_batches(toy_examples("reverse"), tokenizer, batch_size=4, max_length=64, seed=2, num_batches=4)
model = wrap(tiny_llama(tokenizer, seed=0))
init_adapter(model, "slice", current=current[rank::world], replay=replay[rank::world])
if rank == 0:
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n},
              sys.argv[1])
del model
if distributed:
    dist.barrier()
    dist.destroy_process_group()
