"""Scale-out and fault tolerance: batches that do not depend on the parallel split, DDP/FSDP invariance, exact
resume after SIGKILL, and the joblib / SLURM launchers.

Invariance is measured on the trained weights: the per-token loss of each trained model on fixed data must agree
within 1e-3 relative (TRL's invariant tests: batch 8 × accumulation 1 ≡ batch 1 × accumulation 8).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, build_tiny_llama, build_tiny_tokenizer
from helpers import REPO, fit_config, run_safety_lab
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from safety_lab.artifacts import MANIFEST, ArtifactStore
from safety_lab.config import register
from safety_lab.data.batching import GlobalBatchSampler
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.records import Example
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.sft import SFTModule
from safety_lab.stages import Stages

register()


# ---- the global-batch plan (pure) ------------------------------------------------------------------------------
def test_one_process_order_is_the_seeded_shuffle_of_a_dataloader():
    sampler = GlobalBatchSampler([1] * 10, micro_batch=4, accumulation=1, seed=3)
    loader = torch.utils.data.DataLoader(
        range(10), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    for epoch in range(2):  # the loader's generator moves on from epoch to epoch; the sampler replays that
        sampler.set_epoch(epoch)
        assert [list(m.indices) for m in sampler] == [batch.tolist() for batch in loader]


def test_accumulation_splits_the_same_global_batches_with_a_global_normaliser():
    units = [3, 1, 2, 5, 4, 1, 1, 2, 6]  # labelled tokens per row
    big = list(GlobalBatchSampler(units, micro_batch=4, accumulation=1, seed=0))
    small = list(GlobalBatchSampler(units, micro_batch=1, accumulation=4, seed=0))
    # 9 rows, global batch 4: two full global batches and one row left over
    assert [len(m.indices) for m in big] == [4, 4, 1]
    assert [len(m.indices) for m in small] == [1] * 8  # the lone last row cannot fill 4 slots: dropped
    for step in range(2):
        micro = small[4 * step : 4 * step + 4]
        assert sorted(i for m in micro for i in m.indices) == sorted(big[step].indices)
        tokens = sum(units[i] for i in big[step].indices)
        assert big[step].loss_normalizer == tokens  # one slot: the plain per-token mean
        assert all(m.loss_normalizer == tokens / 4 for m in micro)  # ÷ 4 by Lightning's accumulation


def test_resume_skips_what_was_consumed():
    sampler = GlobalBatchSampler([1] * 12, micro_batch=2, accumulation=1, seed=5)
    full = [m.indices for m in sampler]
    sampler.skip = 4
    assert [m.indices for m in sampler] == full[4:]
    assert [m.indices for m in sampler] == full  # the skip applies once
    assert len(sampler) == 6


# ---- in-process: batch 8 × accumulation 1 ≡ batch 1 × accumulation 8 -------------------------------------------
def fit_tiny(
    tmp_path: Path,
    batch_size: int,
    accumulation: int,
    checkpointing: bool = False,
    compile_min_steps: int | None = None,
) -> tuple[torch.nn.Module, TokenizedExamples]:
    tokenizer = build_tiny_tokenizer()
    examples = [Example(SENTENCES[i], SENTENCES[i + 1]) for i in range(0, 32, 2)]  # 16 rows of unequal length
    data = TokenizedExamples(examples, tokenizer, max_length=64)
    cfg = OmegaConf.create(
        fit_config(
            tmp_path, accumulation, checkpointing, model={"compile_min_steps": compile_min_steps}, ckpt_path="last"
        )
    )
    model = build_tiny_llama(len(tokenizer))
    Stages(cfg).fit("sft", SFTModule(model, lr=1e-2, warmup_ratio=0.0), data, batch_size, epochs=2, seed=0)
    return model, data


def mean_token_loss(model, data: TokenizedExamples) -> float:
    batch = data.collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_cross_entropy(logits, batch["labels"]).item()


def test_batch_8_equals_batch_1_with_accumulation_8(tmp_path):
    (big, data), (small, _) = fit_tiny(tmp_path / "a", 8, 1), fit_tiny(tmp_path / "b", 1, 8)
    loss_big, loss_small = mean_token_loss(big, data), mean_token_loss(small, data)
    untrained = mean_token_loss(build_tiny_llama(len(build_tiny_tokenizer())), data)
    assert loss_big < untrained - 0.3  # four optimiser steps really trained it (5.30 -> 4.85)
    assert abs(loss_big - loss_small) / loss_big < 1e-3
    drift = max((a - b).abs().max().item() for a, b in zip(big.parameters(), small.parameters()))
    assert drift < 1e-4


def test_compiled_fit_is_reproducible_trains_the_eager_weights_and_leaves_the_model_eager(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    not_long_enough, _ = fit_tiny(tmp_path / "a", 8, 1, compile_min_steps=5)  # 2 epochs of 2 steps: too short
    assert not counters["frames"]["ok"]
    compiled, _ = fit_tiny(tmp_path / "b", 8, 1, compile_min_steps=4)
    assert counters["frames"]["ok"] > 0  # dynamo compiled the forward
    assert compiled._compiled_call_impl is None  # evaluation and generation after the fit run eagerly
    again, _ = fit_tiny(tmp_path / "c", 8, 1, compile_min_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(compiled.parameters(), again.parameters()))  # reproducible
    drift = max((a - b).abs().max().item() for a, b in zip(compiled.parameters(), not_long_enough.parameters()))
    assert drift < 1e-4


def test_a_fit_outside_a_store_build_writes_no_checkpoint(tmp_path):
    fit_tiny(tmp_path, 8, 1, checkpointing=True)  # nothing would ever resume from Lightning's default checkpoint
    assert list(tmp_path.rglob("metrics.csv")) and not list(tmp_path.rglob("*.ckpt"))


# ---- FSDP wrapping rule ----------------------------------------------------------------------------------------
def test_one_fsdp_unit_per_decoder_layer_also_under_lora():
    from safety_lab.models.lora import attach_lora
    from safety_lab.models.sharding import DecoderLayerPolicy, no_split_layers

    model = attach_lora(build_tiny_llama(50), r=4, alpha=8)
    assert [type(m).__name__ for m in no_split_layers(model)] == ["LlamaDecoderLayer"] * 2
    policy = DecoderLayerPolicy()
    wrapped = [name for name, m in model.named_modules() if policy(m, recurse=False)]
    assert wrapped == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert policy(model, recurse=True)  # always look further down


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 (Lightning's FSDPStrategy) needs a GPU")
@pytest.mark.parametrize(
    "strategy",
    [["strategy=fsdp1"], ["strategy=fsdp1", "strategy.strategy.sharding_strategy=SHARD_GRAD_OP"], ["strategy=fsdp"]],
    ids=["fsdp1", "fsdp1_shard_grad_op", "fsdp"],
)
def test_sharded_strategies_on_gpu(strategy, tmp_path):
    result = cli(
        *FAST,
        *strategy,
        "strategy.devices=1",
        "trainer.precision=bf16-mixed",
        f"hydra.run.dir={tmp_path}/run",
        store=tmp_path / "store",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["harmful/refusal_rate"] >= 0


# ---- the real command line: strategies, crash and resume, launchers --------------------------------------------
FAST = [
    "+experiment=quickstart",
    "+debug=fast",
    "eval.n=8",
    "model.pretrain.n=1024",
    "dataset.n=128",
    "trainer.log_every_n_steps=1",
]


def cli(*args: str, store: Path, cwd: Path, popen: bool = False):
    return run_safety_lab(*args, store=store, root=cwd, popen=popen)


def trained_losses(store: Path) -> dict[str, float]:
    """Per-token loss of each trained base and adapter in `store` on fixed data, keyed by its recipe's strategy
    and batch layout."""
    from safety_lab.models.factory import load_pretrained
    from safety_lab.models.lora import load_adapter
    from safety_lab.worlds.synthetic.views import TRAIN_VIEWS
    from safety_lab.worlds.synthetic.world import World, WorldSpec

    losses = {}
    for adapter in (store / "adapter").glob("[!.]*/"):
        recipe = ArtifactStore(store).manifest(adapter)["recipe"]
        base = store / recipe["base"]
        world = World(WorldSpec(**recipe["world"]))
        model, tokenizer = load_pretrained(base)
        key = json.dumps([recipe["strategy"], recipe["trainer"]["accumulate_grad_batches"]], sort_keys=True)
        pretrain = TokenizedExamples(TRAIN_VIEWS["pretrain"](world, 64, seed=9), tokenizer, max_length=128)
        losses["base " + key] = mean_token_loss(model, pretrain)
        safety = TokenizedExamples(TRAIN_VIEWS["safety_sft"](world, 64, seed=9), tokenizer, max_length=128)
        losses["adapter " + key] = mean_token_loss(load_adapter(model, adapter), safety)
    return losses


@pytest.mark.slow
def test_strategies_train_the_same_model_at_equal_global_batch(tmp_path):
    """single (64 / 32 rows), batch ÷ 8 with accumulation 8, and ddp / fsdp / fsdp_grad_op (two processes of half
    the batch, one multirun): every trained base and adapter has the same loss within 1e-3 relative."""
    store = tmp_path / "store"
    runs = [
        cli(
            *FAST,
            "model.pretrain.batch_size=64",
            "method.batch_size=32",
            f"hydra.run.dir={tmp_path}/single",
            store=store,
            cwd=tmp_path,
        ),
        cli(
            *FAST,
            "model.pretrain.batch_size=8",
            "method.batch_size=4",
            "trainer.accumulate_grad_batches=8",
            f"hydra.run.dir={tmp_path}/accumulate",
            store=store,
            cwd=tmp_path,
        ),
        cli(
            "-m",
            *FAST,
            "model.pretrain.batch_size=32",
            "method.batch_size=16",
            "strategy=ddp,fsdp,fsdp_grad_op",
            f"hydra.sweep.dir={tmp_path}/sweep",
            store=store,
            cwd=tmp_path,
        ),
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    for job in range(3):
        assert (tmp_path / "sweep" / str(job) / "metrics.json").exists()
    losses = trained_losses(store)
    assert len(losses) == 2 * 5, losses
    for kind in ("base", "adapter"):
        values = [v for k, v in losses.items() if k.startswith(kind)]
        assert (max(values) - min(values)) / min(values) < 1e-3, losses


def wait_for(path_glob, store: Path, process, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(store.glob(path_glob))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {path_glob} in {store} after {timeout}s")


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    args = [
        *FAST,
        "model.pretrain.n=4096",
        "model.pretrain.batch_size=16",
        "trainer.enable_checkpointing=true",
        "ckpt_every_n_steps=16",
    ]
    reference = cli(*args, f"hydra.run.dir={tmp_path}/reference", store=tmp_path / "reference_store", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    store = tmp_path / "store"
    crashing = cli(*args, f"hydra.run.dir={tmp_path}/run", store=store, cwd=tmp_path, popen=True)
    wait_for("base/.ckpt-*/pretrain/last.ckpt", store, crashing)
    time.sleep(random.uniform(0.0, 2.0))  # somewhere between two checkpoints of the 256 steps
    crashing.send_signal(signal.SIGKILL)
    crashing.wait()
    assert not list(store.glob(f"base/*/{MANIFEST}")), "the kill came after pretraining finished"

    rerun = cli(*args, f"hydra.run.dir={tmp_path}/run", store=store, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming pretrain from" in rerun.stderr
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-3 for k in expected), (got, expected)
    # every entry is complete, nothing half-built or left over from the killed run
    for kind in ("base", "adapter"):
        entries = [p for p in (store / kind).iterdir() if p.is_dir()]
        assert [p.name.startswith(".") for p in entries] == [False] and (entries[0] / MANIFEST).exists()
    base = ArtifactStore(store).manifest(next((store / "base").glob("[!.]*/")))
    reference_base = ArtifactStore(tmp_path / "reference_store").manifest(
        next((tmp_path / "reference_store" / "base").glob("[!.]*/"))
    )
    assert base["metrics"]["train/loss"] == pytest.approx(reference_base["metrics"]["train/loss"], abs=1e-6)


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.timeout_min=60",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (
        "gpu",
        4,
        4,
        60,
    )
    from hydra.utils import get_class

    get_class(launcher._target_)  # the plugin is installed


def test_method_schemas_survive_the_pickling_of_a_parallel_launcher():
    """hydra/launcher=joblib pickles Hydra's singletons (the ConfigStore) into each worker; the method schemas, built
    at run time, travel by value and must compose there as here (mask-DPO's once failed on a stray MISSING)."""
    import cloudpickle
    from hydra.core.singleton import Singleton

    def mask_dpo():
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return OmegaConf.to_yaml(compose("config", overrides=["method=mask_dpo"]).method)

    here, state = mask_dpo(), Singleton.get_state()
    try:
        Singleton.set_state(cloudpickle.loads(cloudpickle.dumps(state)))  # what the worker gets
        assert mask_dpo() == here
    finally:
        Singleton.set_state(state)


def test_joblib_multirun_trains_the_shared_base_once(tmp_path):
    """Two parallel jobs (seeds 0 and 1) need the same base: one trains it, the other waits and reuses it."""
    result = cli(
        "-m",
        "hydra/launcher=joblib",
        "+experiment=quickstart",
        "+debug=fast",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}/sweep",
        store=tmp_path / "store",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads((tmp_path / "sweep" / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert all(0 <= m["harmful/refusal_rate"] <= 1 for m in metrics)
    assert result.stderr.count("training base") == 1 and result.stderr.count("training adapter") == 2
    assert len([p for p in (tmp_path / "store" / "base").iterdir() if p.is_dir()]) == 1
