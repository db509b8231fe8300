"""Run by test_distributed under `torchrun --nproc_per_node 2`: a run of the stage loop, rank 0 writes."""

import sys

import torch
from accelerate import Accelerator

from slicelora.loop.config import load_config
from slicelora.loop.stages import run

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
run(load_config(None, sys.argv[2:]), sys.argv[1], accelerator=accelerator)
accelerator.wait_for_everyone()
accelerator.end_training()
