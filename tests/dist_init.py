"""Run by test_init under 1 or 2 processes: every init on a tiny model, batches split by rank; rank 0 saves the
adapters, base weights and SLICE's cosines. `fsdp` as second argument shards the model with FSDP2 first."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from conftest import toy_examples, wrap  # noqa: E402

from slicelora.data.prompts import make_batches  # noqa: E402
from slicelora.errors import InitError  # noqa: E402
from slicelora.init import InitConfig, accumulate_gradients, init_adapter  # noqa: E402
from slicelora.init.sharding import gather, is_sharded, local  # noqa: E402
from slicelora.models import tiny_llama, tiny_tokenizer  # noqa: E402

RUNS = {  # name: (method, config); gate=1 makes SLICE project whatever the cosine, so the surgery runs
    "vanilla": ("vanilla", InitConfig()),
    "loram": ("loram", InitConfig()),
    "lora_ga_reference": ("lora_ga", InitConfig(lora_ga_variant="reference")),
    "slice": ("slice", InitConfig(gate=1.0, strength=0.5)),
    "slice_per_layer_offload": ("slice", InitConfig(gate=1.0, surgery_mode="per_layer", offload_to_cpu=True)),
}

distributed = "WORLD_SIZE" in os.environ
fsdp = sys.argv[2:] == ["fsdp"]
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
tokenizer = tiny_tokenizer()
current = make_batches(toy_examples("sentiment"), tokenizer, batch_size=4, max_length=64, seed=1, num_batches=4)
replay = make_batches(toy_examples("reverse"), tokenizer, batch_size=4, max_length=64, seed=2, num_batches=4)
saved = {}
for run, (method, config) in RUNS.items():
    model = wrap(tiny_llama(tokenizer, seed=0))
    if fsdp:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    data = {"current": current[rank::world]} if method in ("lora_ga", "slice") else {}
    if method == "slice":
        data["replay"] = replay[rank::world]
    report = init_adapter(model, method, config, **data)
    for name, param in model.named_parameters():  # gathered on every rank: a collective
        if "lora_" in name or "base_layer" in name:
            saved[f"{run}/{name}"] = gather(param.detach()).contiguous()
    if report.surgery is not None:
        saved[f"{run}/cosine"] = torch.tensor([report.surgery.cosine, report.surgery.cosine_after])
    del model
if fsdp:  # refused on every rank with our error, not a hang: uneven batches, a gradient cache
    model = wrap(tiny_llama(tokenizer, seed=0))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    refused = []
    for config, data in ((InitConfig(), current[rank::world][:rank + 1]),
                         (InitConfig(gradient_cache="unused.safetensors"), current[rank::world])):
        try:
            init_adapter(model, "lora_ga", config, current=data)
        except InitError as err:
            refused.append(str(err))
    saved["refused"] = torch.tensor([len(refused) == 2 and "same number of gradient batches" in refused[0]
                                     and "not supported with FSDP" in refused[1]])
    grads = accumulate_gradients(model, current[rank::world], offload_to_cpu=True)  # each rank keeps its rows
    saved["sharded_buffers"] = torch.tensor([all(is_sharded(g) and 2 * local(g).shape[0] == g.shape[0]
                                                 for g in grads.values())])
if rank == 0:
    save_file(saved, sys.argv[1])
if distributed:
    dist.barrier()
    dist.destroy_process_group()
