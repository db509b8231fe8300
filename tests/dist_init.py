"""Run by test_init under 1 or 2 processes: every init on a tiny model, batches split by rank; rank 0 saves the
adapters, base weights and SLICE's cosines. `fsdp` as second argument shards the model with FSDP2 first; some
runs then keep FSDP's unsharded copies after a forward (reshard_after_forward=False), which the init must see past.
Under FSDP with two ranks, bad splits are also tried: each must be refused with our error on every rank, never a
hang. SLICELORA_TEST_DEVICE=cuda runs it on GPUs (nccl, one GPU per rank; benchmarks/gpu_smoke.sh does)."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from conftest import toy_examples, wrap  # noqa: E402

from slicelora.data.prompts import make_batches  # noqa: E402
from slicelora.errors import InitError  # noqa: E402
from slicelora.init import InitConfig, accumulate_gradients, init_adapter  # noqa: E402
from slicelora.init.sharding import gather, is_sharded, local  # noqa: E402
from slicelora.models import tiny_llama, tiny_tokenizer  # noqa: E402

import slicelora.init.gradients as gradients  # noqa: E402

RUNS = {  # name: (method, config); gate=1 makes SLICE project whatever the cosine, so the surgery runs
    "vanilla": ("vanilla", InitConfig()),
    "loram": ("loram", InitConfig()),
    "lora_ga_reference": ("lora_ga", InitConfig(lora_ga_variant="reference")),
    "slice": ("slice", InitConfig(gate=1.0, strength=0.5)),
    "slice_per_layer_offload": ("slice", InitConfig(gate=1.0, surgery_mode="per_layer", offload_to_cpu=True)),
    "corda": ("corda", InitConfig()),  # kpm: the covariances of the replay batches, summed over the ranks
}
REPLICATED_ONLY = ("corda",)  # refused on FSDP-sharded weights

distributed = "WORLD_SIZE" in os.environ
fsdp = sys.argv[2:] == ["fsdp"]
device = torch.device(os.environ.get("SLICELORA_TEST_DEVICE", "cpu"))
if device.type == "cuda":
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
if distributed:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
mesh = init_device_mesh(device.type, (world,)) if fsdp else None
tokenizer = tiny_tokenizer()
current = make_batches(toy_examples("sentiment"), tokenizer, batch_size=4, max_length=64, seed=1, num_batches=4)
replay = make_batches(toy_examples("reverse"), tokenizer, batch_size=4, max_length=64, seed=2, num_batches=4)
saved = {}
# Odd row counts (MLP 51, r=3) so that FSDP's shards are uneven (rank 0 holds one row more than rank 1).
ODD = dict(hidden_size=50, intermediate_size=51, num_attention_heads=5, num_key_value_heads=5)


def plain_model():
    return wrap(tiny_llama(tokenizer, seed=0, **ODD).to(device), r=3)


def sharded_model(blocks: slice = slice(None), reshard_after_forward: bool = True):
    model = plain_model()
    for layer in model.base_model.model.model.layers[blocks]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if blocks == slice(None):
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


for run, (method, config) in RUNS.items():
    if fsdp and run in REPLICATED_ONLY:
        continue
    if fsdp:
        model = sharded_model(reshard_after_forward=run not in ("loram", "lora_ga_reference"))
    else:
        model = plain_model()
    with torch.no_grad():  # under FSDP with reshard_after_forward=False this leaves unsharded copies behind
        model(input_ids=current[0]["input_ids"][:1].to(device))
    data = {"current": current[rank::world]} if method in ("lora_ga", "slice", "corda") else {}
    if method in ("slice", "corda"):
        data["replay"] = replay[rank::world]
    report = init_adapter(model, method, config, **data)
    for name, param in model.named_parameters():  # gathered on every rank: a collective
        if "lora_" in name or "base_layer" in name:
            saved[f"{run}/{name}"] = gather(param.detach()).cpu().contiguous()
    if report.surgery is not None:
        saved[f"{run}/cosine"] = torch.tensor([report.surgery.cosine, report.surgery.cosine_after])
    del model
if distributed and not fsdp:  # a gradient cache written by 2 ranks is found again by both
    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "gradients.safetensors")
    for _ in range(2):
        report = init_adapter(plain_model(), "lora_ga", InitConfig(gradient_cache=path), current=current[rank::world])
    hit = torch.tensor([int(report.gradients_from_cache)], device=device)
    dist.all_reduce(hit, op=dist.ReduceOp.MIN)
    saved["cache_hit_on_every_rank"] = hit.bool().cpu()
if fsdp and world == 2:
    model = sharded_model()
    cases = {  # name: (what to call, words the error must contain)
        "uneven_batches": (lambda: init_adapter(model, "lora_ga", current=current[rank::world][:rank + 1]),
                           "same number of gradient batches"),
        "gradient_cache": (lambda: init_adapter(model, "lora_ga", InitConfig(gradient_cache="unused.safetensors"),
                                                current=current[rank::world]), "not supported with FSDP"),
        "no_current_on_a_rank": (lambda: init_adapter(model, "lora_ga", current=current[:2] if rank == 0 else []),
                                 "on some ranks"),
        "no_replay_on_a_rank": (lambda: init_adapter(model, "slice", current=current[rank::world],
                                                     replay=replay[:1][rank::world]), "received no gradient batches"),
        "mixed_sharding": (lambda: init_adapter(sharded_model(blocks=slice(0, 1)), "lora_ga",
                                                current=current[rank::world]), "target weights are FSDP-sharded"),
    }
    free_bytes = gradients.free_bytes

    def short_of_memory_on_rank_1():
        gradients.free_bytes = lambda device: 0 if rank == 1 else free_bytes(device)
        try:
            init_adapter(model, "lora_ga", current=current[rank::world])
        finally:
            gradients.free_bytes = free_bytes

    cases["memory_on_one_rank"] = (short_of_memory_on_rank_1,
                                   "do not fit on rank(s) [1]" if rank == 0 else "only 0.0 MiB are free")
    for case, (call, words) in cases.items():
        try:
            call()
            ok = torch.tensor([0])
        except InitError as err:
            ok = torch.tensor([int(words in str(err))])
            if not ok:
                print(f"rank {rank}, {case}: {err}", file=sys.stderr)
        ok = ok.to(device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # refused as expected on every rank
        saved[f"refused/{case}"] = ok.bool().cpu()
    grads = accumulate_gradients(model, current[rank::world], offload_to_cpu=True)  # each rank keeps its rows
    saved["sharded_buffers"] = torch.tensor([all(is_sharded(g) and 2 * local(g).shape[0] in (g.shape[0], g.shape[0] + 1)
                                                 for g in grads.values())])
if rank == 0:
    save_file(saved, sys.argv[1])
if distributed:
    dist.barrier()
    dist.destroy_process_group()
