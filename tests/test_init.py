"""The initialiser library against docs/method.md: surgery, decomposition, absorption, peft's LoRA-GA, gradients."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from safetensors.torch import load_file

from conftest import global_dot, logits, random_grads, wrap
from slicelora.errors import InitError
from slicelora.init import (
    InitConfig, accumulate_gradients, dst_basis, init_adapter, product_variance, project_conflicting,
    variance_matched_scale,
)
from slicelora.models import LLAMA_TARGETS, is_checkpointing, tiny_llama

DIST_SCRIPT = Path(__file__).parent / "dist_init.py"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


# --- surgery ---------------------------------------------------------------------------------------------------

def test_projection_at_c1_is_orthogonal_to_replay():
    cur, rep = random_grads(0), random_grads(1)
    rep = {k: v - 0.8 * cur[k] for k, v in rep.items()}  # make them conflict
    assert global_dot(cur, rep) < 0
    out, report = project_conflicting(cur, rep, strength=1.0, gate=0.0)
    assert report.fired and report.cosine < 0
    norm = math.sqrt(global_dot(out, out) * global_dot(rep, rep))
    assert abs(global_dot(out, rep)) / norm < 1e-6
    assert abs(report.cosine_after) < 1e-6
    # hand check of the formula on one layer: G - (d / n_rep) G_rep
    d, n_rep = global_dot(cur, rep), global_dot(rep, rep)
    torch.testing.assert_close(out["l0"], cur["l0"] - (d / n_rep) * rep["l0"], rtol=1e-6, atol=1e-6)


def test_no_change_when_cosine_at_or_above_gate():
    cur = random_grads(0)
    rep = {k: v + 0.1 * random_grads(3)[k] for k, v in cur.items()}  # aligned
    out, report = project_conflicting(cur, rep, gate=0.0)
    assert report.cosine > 0.9 and not report.fired and report.scalar == 0.0
    for k in cur:
        assert torch.equal(out[k], cur[k])
    # a gate above the cosine makes it fire even though they are aligned
    _, report = project_conflicting(cur, rep, gate=0.999)
    assert report.fired


def test_strength_scales_correction_linearly():
    cur, rep = random_grads(0), {k: -v + 0.3 * w for (k, v), w in zip(random_grads(0).items(), random_grads(5).values())}
    outs = {c: project_conflicting(cur, rep, strength=c)[0] for c in (0.25, 0.5, 1.0)}
    for k in cur:
        corr = {c: cur[k] - outs[c][k] for c in outs}
        torch.testing.assert_close(corr[0.5], 2 * corr[0.25], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(corr[1.0], 4 * corr[0.25], rtol=1e-5, atol=1e-6)


def test_per_layer_mode_projects_each_layer_on_its_own():
    cur = random_grads(0)
    rep = {"l0": -cur["l0"] + 0.1, "l1": cur["l1"] * 2 + 0.1, "l2": -cur["l2"]}  # l0, l2 conflict; l1 aligned
    out, report = project_conflicting(cur, rep, mode="per_layer")
    assert report.layers["l0"].fired and report.layers["l2"].fired and not report.layers["l1"].fired
    assert torch.equal(out["l1"], cur["l1"])
    for k in ("l0", "l2"):
        dot = float((out[k].double() * rep[k].double()).sum())
        assert abs(dot) < 1e-5 * float(out[k].norm() * rep[k].norm() + 1)


def test_surgery_rejects_bad_strength_and_layers():
    cur, rep = random_grads(0), random_grads(1)
    with pytest.raises(InitError, match="strength"):
        project_conflicting(cur, rep, strength=0.0)
    with pytest.raises(InitError, match="different layers"):
        project_conflicting(cur, {"l0": rep["l0"]})


# --- decomposition ---------------------------------------------------------------------------------------------

def test_product_variance_matches_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 9, generator=g), torch.randn(7, 4, generator=g) + 0.5
    assert product_variance(a, b) == pytest.approx(float((b.double() @ a.double()).var(unbiased=False)), rel=1e-10)


def test_variance_matching_gives_var_w_times_log_m_r():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(40, 24, generator=g) * 0.05, torch.randn(8, 24, generator=g), torch.randn(40, 8, generator=g)
    beta = variance_matched_scale(a, b, w)
    ratio = float((beta * b @ (beta * a)).double().var()) / float(w.double().var())
    assert ratio == pytest.approx(math.log(8) / math.log(24), rel=1e-4)


def test_dst_bases_have_orthonormal_columns_and_spec_entries():
    for rows, cols in ((10, 4), (4, 10), (7, 7)):
        m = dst_basis(rows, cols, torch.float64)
        assert m.shape == (rows, cols)
        tall = m if rows >= cols else m.T
        torch.testing.assert_close(tall.T @ tall, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-12, rtol=0)
    m = dst_basis(5, 3, torch.float64)
    assert float(m[2, 1]) == pytest.approx(math.sqrt(2 / 6) * math.sin(3 * 2 * math.pi / 6))


# --- gradients -------------------------------------------------------------------------------------------------

def test_accumulated_gradients_equal_plain_autograd(model, batches):
    expected = {}
    model.zero_grad()
    for batch in batches:
        (model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss / len(batches)).backward()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            expected[name] = module.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = accumulate_gradients(model, batches)
    assert set(grads) == set(expected)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_accumulated_gradients_offload_and_peft_names(model, batches):
    plain = accumulate_gradients(model, batches)
    peft_model = wrap(model)
    offloaded = accumulate_gradients(peft_model, batches, offload_to_cpu=True)
    assert set(offloaded) == set(plain)  # PEFT's prefix is stripped
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name])


def test_gradient_errors(model, batches):
    with pytest.raises(InitError, match="empty"):
        accumulate_gradients(model, [])
    with pytest.raises(InitError, match="no target layer matched"):
        accumulate_gradients(model, batches, targets=("nope_proj",))
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(InitError):  # loss is NaN when every label is masked
        accumulate_gradients(model, masked)


def test_zero_gradient_names_the_layer(model, batches):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[1].mlp.up_proj.weight.zero_()  # with down_proj zero, no signal reaches gate/up_proj
        model.model.layers[1].mlp.gate_proj.weight.zero_()
    with pytest.raises(InitError, match=r"model\.layers\.1\.mlp\.(gate|up)_proj.*all zero"):
        accumulate_gradients(model, batches)


# --- methods on a PEFT model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,variant", [("lora_ga", "paper"), ("lora_ga", "reference"), ("lora_ga", "peft"),
                                            ("loram", "paper"), ("slice", "paper")])
def test_absorbing_inits_keep_the_model_function(model, batches, replay_batches, method, variant):
    peft_model = wrap(model)
    before = logits(peft_model, batches[0])
    report = init_adapter(peft_model, method, InitConfig(lora_ga_variant=variant),
                          current=batches if method != "loram" else None,
                          replay=replay_batches if method == "slice" else None)
    after = logits(peft_model, batches[0])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # the adapter is not the zero init
    if method == "slice":
        assert report.surgery is not None and report.replay_batches == len(replay_batches)


def test_variance_matched_adapter_in_model(model, batches):
    peft_model = wrap(model, r=8)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("v_proj")}
    init_adapter(peft_model, "lora_ga", current=batches)
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    w = original["model.layers.0.self_attn.v_proj"]
    ratio = float((b @ a).double().var()) / float(w.double().var())
    assert ratio == pytest.approx(math.log(8) / math.log(min(w.shape)), rel=1e-4)


def test_slice_without_replay_equals_lora_ga_paper(tokenizer, batches):
    models = [wrap(tiny_llama(tokenizer, seed=0)) for _ in range(2)]
    init_adapter(models[0], "slice", current=batches, replay=[])
    init_adapter(models[1], "lora_ga", current=batches)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(p, q), n


def test_lora_ga_peft_variant_equals_peft(tokenizer, batches, monkeypatch):
    original = torch.svd_lowrank

    def seeded(a, q=6, niter=2, M=None):  # both implementations get the same random start
        torch.manual_seed(123)
        return original(a, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    ours = wrap(tiny_llama(tokenizer, seed=0))
    init_adapter(ours, "lora_ga", InitConfig(lora_ga_variant="peft"), current=batches)

    base = tiny_llama(tokenizer, seed=0)
    config = LoraConfig(r=4, lora_alpha=2.0, use_rslora=True, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0,
                        init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            base(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()

    base.eval()  # our gradients are taken without dropout; the tiny model has none anyway
    preprocess_loraga(base, config, train_step)
    theirs = get_peft_model(base, config)
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(ours_params) == set(their_params)
    checked = 0
    for name, p in ours_params.items():
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(p, their_params[name], rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
    assert checked == 3 * 7 * 2  # A, B and W of 7 targets in 2 blocks


def test_loram_uses_dst_bases(model):
    peft_model = wrap(model, r=4)
    with pytest.warns(UserWarning, match="uses no data"):
        init_adapter(peft_model, "loram", current=[{"input_ids": torch.ones(1, 2, dtype=torch.long)}])
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # up to the shared variance-matching factor, A and B are the DST-I bases
    ratio = a[0, 0] / dst_basis(*a.shape)[0, 0]
    torch.testing.assert_close(a, dst_basis(*a.shape) * ratio)
    torch.testing.assert_close(b, dst_basis(*b.shape) * ratio, rtol=1e-5, atol=1e-7)


def test_vanilla_is_peft_default(model, batches):
    peft_model = wrap(model)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match="does not use replay"):
        init_adapter(peft_model, "vanilla", replay=batches)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert layer.lora_A["default"].weight.abs().sum() > 0
    assert torch.equal(layer.get_base_layer().weight, w0)


def test_failed_init_leaves_model_unchanged(model, batches):
    peft_model = wrap(model, r=16)  # k_proj is 24 x 48: 2r = 32 > 24: 'lora_ga' selection cannot be made
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(InitError, match="2r"):
        init_adapter(peft_model, "lora_ga", current=batches)
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bad_inputs(model, batches):
    with pytest.raises(InitError, match="exceeds"):
        init_adapter(wrap(tiny_llama(seed=0), r=40), "loram")  # k_proj is 24 x 48
    peft_model = wrap(model)
    with pytest.raises(InitError, match="unknown init method"):
        init_adapter(peft_model, "dora", current=batches)
    with pytest.raises(InitError, match="needs current-task batches"):
        init_adapter(peft_model, "slice", current=[])
    with pytest.raises(InitError, match="no LoRA adapter"):
        init_adapter(tiny_llama(seed=1), "loram")  # a plain model, no PEFT wrapper


def test_quantised_layer_is_refused(model, batches):
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(InitError, match="full-precision"):
        accumulate_gradients(model, batches)


def test_gradient_cache_is_reused_and_invalidated(model, batches, replay_batches, tmp_path, monkeypatch):
    import slicelora.init.adapter as methods

    calls = []
    real = methods.accumulate_gradients
    monkeypatch.setattr(methods, "accumulate_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = str(tmp_path / "grads.safetensors")
    config = InitConfig(gradient_cache=cache)
    first = wrap(tiny_llama(seed=0))
    init_adapter(first, "slice", config, current=batches, replay=replay_batches)
    assert len(calls) == 2
    second = wrap(tiny_llama(seed=0))
    report = init_adapter(second, "slice", InitConfig(gradient_cache=cache, strength=0.5), current=batches,
                          replay=replay_batches)
    assert len(calls) == 2 and report.gradients_from_cache
    third = wrap(tiny_llama(seed=0))
    init_adapter(third, "slice", config, current=batches[:2], replay=replay_batches)  # other batches: recomputed
    assert len(calls) == 4
    moved = init_adapter(wrap(tiny_llama(seed=0)), "slice", config, current=batches[:2],
                         replay=batches[2:] + replay_batches)  # the same batches in all, split otherwise
    assert len(calls) == 6 and not moved.gradients_from_cache


def count_gradient_passes(monkeypatch) -> list[str]:
    """Patch the init's accumulate_gradients to record the description of every gradient pass."""
    import slicelora.init.adapter as methods

    calls: list[str] = []
    real = methods.accumulate_gradients
    monkeypatch.setattr(methods, "accumulate_gradients", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    return calls


def test_gradient_cache_dir_shares_the_current_task_gradients(tokenizer, batches, replay_batches, tmp_path,
                                                              monkeypatch):
    calls = count_gradient_passes(monkeypatch)
    folder = tmp_path / "grads"
    cached = InitConfig(gradient_cache_dir=str(folder), gate=1.0)  # gate 1: SLICE projects in place
    first = init_adapter(wrap(tiny_llama(tokenizer, seed=0)), "lora_ga", cached, current=batches)
    assert first.gradient_sets_from_cache == [] and not first.gradients_from_cache
    files = sorted(folder.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".safetensors")
    written = files[0].read_bytes()

    shared = wrap(tiny_llama(tokenizer, seed=0))
    report = init_adapter(shared, "slice", cached, current=batches, replay=replay_batches)
    assert report.gradient_sets_from_cache == ["current"] and not report.gradients_from_cache
    assert calls == ["gradients (current task)", "gradients (replay)"]
    assert len(list(folder.iterdir())) == 2 and files[0].read_bytes() == written
    plain = wrap(tiny_llama(tokenizer, seed=0))
    init_adapter(plain, "slice", InitConfig(gate=1.0), current=batches, replay=replay_batches)
    for (n, p), (_, q) in zip(shared.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n

    again = init_adapter(wrap(tiny_llama(tokenizer, seed=0)), "slice", cached, current=batches, replay=replay_batches)
    assert again.gradients_from_cache and again.gradient_sets_from_cache == ["current", "replay"]
    assert len(calls) == 4  # the two of the run without cache
    init_adapter(wrap(tiny_llama(tokenizer, seed=0)), "lora_ga", cached, current=batches[:2])
    assert len(calls) == 5 and len(list(folder.iterdir())) == 3  # other batches: another file


def test_both_gradient_caches_are_refused(model, batches, tmp_path):
    config = InitConfig(gradient_cache=str(tmp_path / "g.safetensors"), gradient_cache_dir=str(tmp_path))
    with pytest.raises(InitError, match="not both"):
        init_adapter(wrap(model), "lora_ga", config, current=batches)


def test_autocast_gradients_agree_with_float32(model, batches):
    exact = accumulate_gradients(model, batches)
    fast = accumulate_gradients(model, batches, autocast=True)
    for name, g in exact.items():
        assert fast[name].dtype == torch.float32 and not torch.equal(fast[name], g)  # bf16 matmuls did run
        # measured: >= 0.99997 per layer on this tiny model (bf16 keeps ~3 significant digits per product)
        assert torch.nn.functional.cosine_similarity(fast[name].flatten(), g.flatten(), dim=0) > 0.999, name


@pytest.mark.parametrize("where", ["file", "dir"])
def test_cached_gradients_are_keyed_by_autocast(tokenizer, batches, tmp_path, monkeypatch, where):
    import slicelora.init.adapter as methods

    calls = count_gradient_passes(monkeypatch)
    cache = {"gradient_cache": str(tmp_path / "g.safetensors")} if where == "file" else {
        "gradient_cache_dir": str(tmp_path / "grads")}
    monkeypatch.setattr(methods, "bf16_supported", lambda device: True)
    for autocast, hit in ((False, False), (True, False), (True, True)):
        report = init_adapter(wrap(tiny_llama(tokenizer, seed=0)), "lora_ga", InitConfig(autocast=autocast, **cache),
                              current=batches)
        assert report.autocast == autocast and report.gradients_from_cache == hit
    monkeypatch.setattr(methods, "bf16_supported", lambda device: False)  # asked for, not done: float32 gradients
    report = init_adapter(wrap(tiny_llama(tokenizer, seed=0)), "lora_ga", InitConfig(autocast=True, **cache),
                          current=batches)
    assert not report.autocast and report.gradients_from_cache == (where == "dir")
    assert len(calls) == (3 if where == "file" else 2)


@pytest.fixture(scope="module")
def single_process_inits(tmp_path_factory):
    """Every init of tests/dist_init.py in one process over all the batches (the reference for 2 processes)."""
    path = tmp_path_factory.mktemp("dist") / "single.safetensors"
    subprocess.run([sys.executable, str(DIST_SCRIPT), str(path)], check=True, env=ONE_THREAD, timeout=300)
    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_two_processes_give_the_same_adapters(tmp_path, single_process_inits, sharding):
    """2 gloo processes, each with half the batches, whole model per process or FSDP2-sharded (gradients kept
    sharded, one layer gathered at a time): every init's adapter and absorbed weights, and SLICE's cosines."""
    double = tmp_path / "double.safetensors"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29517" if sharding == "replicated" else "29518", str(DIST_SCRIPT), str(double),
                    *(["fsdp"] if sharding == "fsdp" else [])], check=True, env=ONE_THREAD, timeout=300)
    one, two = single_process_inits, load_file(str(double))
    if sharding == "replicated":  # the gradient cache written by both ranks was found again by both
        assert bool(two.pop("cache_hit_on_every_rank"))
    if sharding == "fsdp":  # buffers sharded; every bad split refused by our error on every rank (rank 0's saved)
        assert bool(two.pop("sharded_buffers"))
        refused = {name: bool(two.pop(name)) for name in list(two) if name.startswith("refused/")}
        assert refused == {f"refused/{case}": True for case in (
            "uneven_batches", "gradient_cache", "no_current_on_a_rank", "no_replay_on_a_rank", "mixed_sharding",
            "memory_on_one_rank")}
    if sharding == "fsdp":  # CorDA is refused on sharded weights
        one = {name: t for name, t in one.items() if not name.startswith("corda/")}
    assert set(one) == set(two) and {name.split("/")[0] for name in one} == {
        "vanilla", "loram", "lora_ga_reference", "slice", "slice_per_layer_offload",
        *(["corda"] if sharding == "replicated" else [])}
    for name in one:  # float noise of the reductions, amplified by close singular values of the tiny model
        # CorDA's kpm inverts the covariance and keeps its weakest components: in one process, the same examples in
        # reverse order already move its factors by 2.3e-4 (measured), as much as two processes do
        atol = 5e-4 if name.startswith("corda/") else 5e-5
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=atol, msg=name)


def test_inplace_projection_equals_the_copying_one():
    cur, rep = random_grads(0), {k: -v for k, v in random_grads(0).items()}
    rep = {k: v + 0.5 * w for (k, v), w in zip(rep.items(), random_grads(7).values())}
    expected, _ = project_conflicting(cur, rep)
    copy = {k: v.clone() for k, v in cur.items()}
    got, _ = project_conflicting(copy, rep, inplace=True)
    for k in cur:
        assert got[k] is copy[k] and torch.equal(got[k], expected[k])


def test_gradient_checkpointing_gives_the_same_gradients(model, batches):
    plain = accumulate_gradients(model, batches)
    checkpointed = accumulate_gradients(model, batches, gradient_checkpointing=True)
    assert not is_checkpointing(model)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_buffers_that_do_not_fit_are_refused_before_any_work(model, batches, monkeypatch):
    import slicelora.init.gradients as gradients

    peft_model = wrap(model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    monkeypatch.setattr(gradients, "free_bytes", lambda device: 1000)
    with pytest.raises(InitError, match=r"need .* MiB on cpu .* fewer target modules"):
        init_adapter(peft_model, "slice", current=batches, replay=batches)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())
    monkeypatch.undo()
    needed = gradients.check_buffer_memory(model, 2)
    weights = sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    biggest = max(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    assert needed == 4 * (2 * weights + biggest)


def test_free_cpu_memory_counts_the_reclaimable_page_cache(monkeypatch, tmp_path):
    """MemAvailable (free pages plus reclaimable cache), not MemFree: a machine that has read many files has little
    free memory and gigabytes available; a study worker once refused its gradient buffers that way."""
    from slicelora.init import gradients

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:          744652 kB\nMemAvailable:   15627264 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                          *a, **k))
    assert gradients.free_bytes(torch.device("cpu")) == 15627264 * 1024
