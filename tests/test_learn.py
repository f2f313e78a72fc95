"""Learning substrate: data, seeded views, stored teacher logits, resumable training, DDP, evaluation."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploycomp.errors import DeployCompError
from deploycomp.learn.checkpoint import save_checkpoint
from deploycomp.learn.data import augment, load_fashion_mnist, view_seeds
from deploycomp.learn.distill import (LiveTeacher, StoredTeacher, ViewSpec, dense_targets, record_dtype,
                                      store_teacher_logits)
from deploycomp.learn.train import CHECKPOINT, TrainConfig, fit

PROXY = "timm:deit_fmnist_patch4_28"
TINY_PROXY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_ARGS = [a for k, v in TINY_PROXY.items() for a in ("--model-arg", f"{k}={v}")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist("train"), load_fashion_mnist("test")


def tiny_proxy(seed: int = 0):
    from deploycomp.frontend.timm_models import build_timm_model

    torch.manual_seed(seed)
    return build_timm_model("deit_fmnist_patch4_28", model_kwargs=TINY_PROXY)


def rel_diff(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts taken as one vector."""
    va = torch.cat([a[k].flatten().double() for k in sorted(b)])
    vb = torch.cat([b[k].flatten().double() for k in sorted(b)])
    return float((va - vb).norm() / vb.norm())


# ---- data ----------------------------------------------------------------------------------

def test_fashion_mnist_is_the_real_data_set(fmnist):
    train, test = fmnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x = train.normalize(train.images[:20000])
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02  # the recorded mean/std fit


def test_a_head_is_named_by_how_many_first_samples_of_the_set_it_holds(fmnist):
    train, _ = fmnist
    calibration = train.head(144).head(128)  # what int8 calibrates on, within the images it loaded
    assert calibration.name == f"{train.name}[:128]" and torch.equal(calibration.images, train.images[:128])
    assert train.head(None) is train and train.head(10**6) is train


def test_missing_or_corrupt_data_gets_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DeployCompError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    monkeypatch.setenv("DEPLOYCOMP_FASHION_MNIST", str(tmp_path))  # the directory the loader reads by default
    with pytest.raises(DeployCompError, match=f"Fashion-MNIST not found in {tmp_path}"):
        load_fashion_mnist("train")
    monkeypatch.delenv("DEPLOYCOMP_FASHION_MNIST")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(DeployCompError, match="corrupt data file"):
        load_fashion_mnist("train", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DeployCompError, match="corrupt data file"):
        load_fashion_mnist("train", root=tmp_path)


def test_image_folder_loader(tmp_path, fmnist):
    from PIL import Image

    from deploycomp.learn.data import load_data

    train, _ = fmnist
    for i in range(6):
        d = tmp_path / "val" / train.classes[int(train.labels[i])].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.images[i, 0].numpy()).save(d / f"{i}.png")
    data = load_data(str(tmp_path), "test", img_size=28, in_chans=1)
    assert data.images.shape == (6, 1, 28, 28) and len(set(data.labels.tolist())) == len(data.classes)
    assert {tuple(im.flatten().tolist()) for im in data.images} == {tuple(train.images[i].flatten().tolist()) for i in range(6)}
    with pytest.raises(DeployCompError, match="not found"):
        load_data(str(tmp_path / "nope"), "test")


# ---- seeded views --------------------------------------------------------------------------

def test_view_seeds_are_reproducible_and_distinct():
    idx = torch.arange(1000)
    a = view_seeds(0, 3, idx)
    assert torch.equal(a, view_seeds(0, 3, idx))
    assert len(set(a.tolist())) == 1000
    assert (a != view_seeds(0, 4, idx)).all() and (a != view_seeds(1, 3, idx)).all()
    assert (a >= 0).all()


def test_augment_is_an_exact_shift_and_flip():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    span = 5
    # seed encodes dy = s % 5 - 2, dx = (s // 5) % 5 - 2, flip = (s // 25) % 2
    identity = torch.full((4,), 2 + 2 * span)
    assert torch.equal(augment(x, identity), x)
    down = torch.full((4,), 3 + 2 * span)  # dy = +1: content moves one row down, zero fill at the top
    out = augment(x, down)
    assert torch.equal(out[:, :, 1:], x[:, :, :-1]) and (out[:, :, 0] == 0).all()
    flipped = augment(x, identity + 25)
    assert torch.equal(flipped, x.flip(-1))
    # every (dy, dx, flip) combination and real view seeds, against a per-image shift-then-flip
    # written here with slicing (the old check compared augment with itself)
    seeds = torch.cat([torch.arange(2 * span * span), view_seeds(7, 0, torch.arange(14))])
    images = torch.randint(0, 256, (len(seeds), 1, 28, 28), dtype=torch.uint8)
    got = augment(images, seeds)
    for image, seed, out in zip(images, seeds.tolist(), got):
        dy, dx, flip = seed % span - 2, (seed // span) % span - 2, (seed // (span * span)) % 2
        want = torch.zeros_like(image)
        want[:, max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
            image[:, max(-dy, 0):28 - max(dy, 0), max(-dx, 0):28 - max(dx, 0)]
        assert torch.equal(out, want.flip(-1) if flip else want), seed


# ---- stored teacher logits -----------------------------------------------------------------

def test_dense_targets_spread_the_missing_mass():
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.05]])
    index = torch.tensor([[2, 0], [1, 3]])
    dense = dense_targets(probs, index, 5)
    assert torch.allclose(dense.sum(1), torch.ones(2))
    assert torch.allclose(dense[0], torch.tensor([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]))
    assert torch.allclose(dense[1, [1, 3]], torch.tensor([0.9, 0.05]))
    full = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.allclose(dense_targets(full, torch.tensor([[2, 0, 1]]), 3), torch.tensor([[0.2, 0.1, 0.7]]))


def test_stored_logits_roundtrip_and_refusals(tmp_path, fmnist):
    train, _ = fmnist
    data = train.subset(range(300))
    teacher = tiny_proxy(1)
    view = ViewSpec(seed=5)
    path = tmp_path / "t.kd"
    info = store_teacher_logits(teacher, data, path, epochs=2, view=view, topk=3, batch_size=128)
    assert info["bytes_per_sample_epoch"] == record_dtype(3).itemsize == 8 + 3 * 2 + 3 * 2
    assert not list(tmp_path.glob(".*tmp"))
    stored = StoredTeacher(path)
    stored.check_compatible(data, view, epochs=2)
    idx = torch.tensor([299, 0, 17, 150])
    for epoch in (0, 1):
        seeds = view.seeds(epoch, idx)
        x = data.normalize(view.view(data.images[idx], seeds))
        live = LiveTeacher(teacher).targets(epoch, idx, seeds, x)
        top = live.topk(3, dim=1)
        expect = dense_targets(top.values, top.indices, 10)
        got = stored.targets(epoch, idx, seeds, x)
        assert torch.allclose(got, expect, atol=1e-3), (got - expect).abs().max()
    with pytest.raises(DeployCompError, match="augmentation seeds"):
        stored.targets(0, idx, ViewSpec(seed=6).seeds(0, idx), x)
    with pytest.raises(DeployCompError, match="cover 2 epochs"):
        stored.check_compatible(data, view, epochs=3)
    with pytest.raises(DeployCompError, match="stored for"):
        stored.check_compatible(data, ViewSpec(seed=6), epochs=2)
    broken = tmp_path / "broken.kd"
    broken.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DeployCompError, match="corrupt teacher logits"):
        StoredTeacher(broken)
    (tmp_path / "other.bin").write_bytes(b"something else entirely")
    with pytest.raises(DeployCompError, match="not a deploycomp teacher-logits"):
        StoredTeacher(tmp_path / "other.bin")


def test_kd_from_stored_full_logits_trains_like_the_live_teacher(tmp_path, fmnist):
    """With K = all classes the stored targets are the live ones up to fp16: the student sees the same views."""
    train, _ = fmnist
    data = train.subset(range(256))
    teacher = tiny_proxy(1)
    config = TrainConfig(epochs=1, batch_size=64, seed=3, warmup_epochs=0, save_every_s=1e9)
    runs = []
    for source in ("live", "stored", "other views"):
        student = tiny_proxy(2)
        if source == "other views":  # control: the same teacher, but the views of another seed
            config = TrainConfig(**{**config.__dict__, "seed": 4})
            t = LiveTeacher(teacher)
        elif source == "live":
            t = LiveTeacher(teacher)
        else:
            store_teacher_logits(teacher, data, tmp_path / "full.kd", epochs=1, view=config.view, topk=10)
            t = StoredTeacher(tmp_path / "full.kd")
        result = fit(student, data, None, config, teacher=t)
        runs.append((result.history[-1]["train_loss"], student.state_dict()))
    (loss_live, w_live), (loss_stored, w_stored), (_, w_other) = runs
    assert abs(loss_live - loss_stored) < 1e-3 * loss_live
    start = tiny_proxy(2).state_dict()
    moved = rel_diff(w_live, start)
    assert rel_diff(w_stored, w_live) < 0.02 * moved < rel_diff(w_other, w_live)


# ---- training: resume, atomic checkpoints --------------------------------------------------

def test_resume_after_interruption_reaches_the_same_weights(tmp_path, fmnist):
    train, test = fmnist
    data, held = train.subset(range(320)), test.subset(range(100))
    config = TrainConfig(epochs=2, batch_size=32, seed=1, warmup_epochs=0.5, save_every_s=0.0)
    whole = tiny_proxy()
    full = fit(whole, data, held, config, out_dir=tmp_path / "whole")
    assert full.finished and len(full.history) == 2 and (tmp_path / "whole" / "model.safetensors").is_file()

    part = tiny_proxy()
    stop = TrainConfig(**{**config.__dict__, "max_steps": 13})  # mid-epoch 2 (10 steps per epoch)
    first = fit(part, data, held, stop, out_dir=tmp_path / "split")
    assert not first.finished and (tmp_path / "split" / CHECKPOINT).is_file()
    resumed = tiny_proxy(seed=99)  # a fresh process would start from other weights: the checkpoint must win
    second = fit(resumed, data, held, config, out_dir=tmp_path / "split")
    assert second.finished and [r["epoch"] for r in second.history] == [1, 2]
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert second.history[-1]["test_accuracy"] == full.history[-1]["test_accuracy"]

    other = TrainConfig(**{**config.__dict__, "lr": 5e-4})
    with pytest.raises(DeployCompError, match="another recipe"):
        fit(tiny_proxy(), data, held, other, out_dir=tmp_path / "split")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_loading_runs_no_code(tmp_path):
    import pickle

    from deploycomp.learn.checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DeployCompError, match="corrupt or unsafe"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


# ---- distributed ---------------------------------------------------------------------------

# Wrap World.shard (records each rank's samples of every step) and fit (saves the weights it starts
# from), so the test sees what each process trained on. SPY runs the train command with them in a
# torchrun worker; the one-process run installs them in this process (saves a process start).
SPY_WRAPPERS = """
import json, os
from deploycomp.learn import distributed, train
from safetensors.torch import save_file

real_shard, real_fit = distributed.World.shard, train.fit

def shard(self, batch):
    part = real_shard(self, batch)
    with open(os.path.join(OUT, f"rank{self.rank}.jsonl"), "a") as f:
        f.write(json.dumps(part.tolist()) + "\\n")
    return part

def fit(model, *args, **kwargs):
    world = kwargs.get("world")
    if world is None or world.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(OUT, "init.safetensors"))
    return real_fit(model, *args, **kwargs)
"""
SPY = f"""
import os, sys
OUT = os.environ["SPY_OUT"]
{SPY_WRAPPERS}
distributed.World.shard, train.fit = shard, fit
from deploycomp.cli import main
sys.argv = ["deploycomp", *sys.argv[1:]]
main()
"""


def _train_cli(out: Path, nproc: int, monkeypatch, capsys) -> list[list[list[int]]]:
    """Train on ``nproc`` processes (1: in this process); returns, per rank, the sample indices of every step."""
    import json

    from deploycomp.learn import distributed, train

    from .conftest import invoke_cli

    out.mkdir()
    args = ["train", PROXY, "-o", str(out), *TINY_ARGS, "--train-subset", "256", "--test-subset", "200",
            "--epochs", "1", "--batch-size", "64", "--threads", "1", "--seed", "4"]
    if nproc == 1:
        spy = {"OUT": str(out)}
        exec(SPY_WRAPPERS, spy)
        with monkeypatch.context() as m:
            m.setattr(distributed.World, "shard", spy["shard"])
            m.setattr(train, "fit", spy["fit"])
            code, _, err = invoke_cli(m, capsys, *args)
        assert code == 0, err[-3000:]
    else:
        spy = out.parent / "spy.py"
        spy.write_text(SPY)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run([*launcher, str(spy), *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "SPY_OUT": str(out),
                                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(nproc)]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, monkeypatch, capsys):
    """Two processes split every global batch into disjoint halves that together are the one-process
    batch, and end at the one-process weights — which moved from where they started (equal weights
    alone would also hold if nothing trained, or if both ranks trained on the whole batch)."""
    import json

    (alone,) = _train_cli(tmp_path / "one", 1, monkeypatch, capsys)
    rank0, rank1 = _train_cli(tmp_path / "two", 2, monkeypatch, capsys)
    assert len(alone) == len(rank0) == len(rank1) == 256 // 64
    for batch, a, b in zip(alone, rank0, rank1):
        assert len(a) == len(b) == len(batch) // 2 and not set(a) & set(b) and sorted(a + b) == sorted(batch)
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    init = load_file(str(tmp_path / "one" / "init.safetensors"))
    assert rel_diff(init, load_file(str(tmp_path / "two" / "init.safetensors"))) == 0  # the same start
    moved = rel_diff(one, init)
    assert moved > 1e-3 and rel_diff(two, one) < 1e-3 * moved, (moved, rel_diff(two, one))
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert abs(m1["history"][0]["train_loss"] - m2["history"][0]["train_loss"]) < 1e-4
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 0.5  # 200 samples: at most one flips


def test_rank_shards_partition_a_batch():
    from deploycomp.learn.distributed import World

    batch = torch.randperm(64)
    for size in (1, 2, 4):
        parts = [World(rank, size).shard(batch) for rank in range(size)]
        assert all(len(p) == 64 // size for p in parts)
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())


# ---- evaluation of torch models and compiled artifacts -------------------------------------

@pytest.mark.slow
def test_compiled_artifact_scores_like_the_torch_model(tmp_path, fmnist):
    from deploycomp.api import CompileOptions, compile, evaluate
    from deploycomp.learn.checkpoint import save_weights

    train, _ = fmnist
    model = tiny_proxy()
    fit(model, train.subset(range(3200)), None, TrainConfig(epochs=2, batch_size=64, warmup_epochs=0, lr=3e-3))
    save_weights(tmp_path / "w.safetensors", model)
    options = CompileOptions(target="ort-cpu", weights=str(tmp_path / "w.safetensors"), model_kwargs=TINY_PROXY, data="fashion-mnist",
                             eval_samples=1000, measure_rounds=0)
    manifest = compile(PROXY, tmp_path / "art", options)
    acc = manifest["accuracy"]
    assert acc["samples"] == 1000 and acc["reference"] == "torch"
    assert acc["reference_top1"] > 20  # trained a little (chance and a constant predictor score 10 %)
    assert abs(acc["artifact_top1"] - acc["reference_top1"]) <= 0.1
    assert "top-1 on 1000 samples" in (tmp_path / "art" / "report.md").read_text()
    on_backend = evaluate(str(tmp_path / "art"), samples=1000)
    in_torch = evaluate(PROXY, weights=str(tmp_path / "w.safetensors"), samples=1000, model_kwargs=TINY_PROXY)
    assert on_backend["runtime"] == "ort-cpu" and on_backend["top1"] == acc["artifact_top1"]
    assert in_torch["runtime"] == "torch" and in_torch["top1"] == acc["reference_top1"]


def test_compile_refuses_data_of_another_geometry_before_compiling(tmp_path):
    from deploycomp.api import CompileOptions, compile

    from .conftest import TINY

    name, kwargs = TINY["deit"]
    with pytest.raises(DeployCompError, match="1x28x28 images; the model takes 3x32x32"):
        compile(f"timm:{name}", tmp_path / "out", CompileOptions(model_kwargs=kwargs, data="fashion-mnist"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_store_logits_train_evaluate_and_bad_input(tmp_path, monkeypatch, capsys):
    """The commands in this process (``invoke_cli``): what they do, not process start-up, is under test."""
    from .conftest import invoke_cli

    def cli(*args):
        code, out, err = invoke_cli(monkeypatch, capsys, *args)
        return code, " ".join(out.split()), err

    kd = tmp_path / "t.kd"
    code, out, err = cli("store-logits", PROXY, *TINY_ARGS, "-o", kd, "--epochs", "1", "--topk", "3", "--train-subset", "128")
    assert code == 0, err
    assert "128 samples x 1 epochs, top-3, 20 bytes per sample and epoch" in out
    run = ["train", PROXY, *TINY_ARGS, "-o", tmp_path / "run", "--train-subset", "128", "--test-subset", "100",
           "--batch-size", "64", "--teacher-logits", kd]
    code, out, err = cli(*run, "--epochs", "2")
    assert code == 2 and err.strip() == f"error: teacher logits {kd} cover 1 epochs; this run trains 2"
    assert not (tmp_path / "run").exists()
    code, out, err = cli(*run, "--epochs", "1")
    assert code == 0, err
    assert "finished, test top-1" in out and (tmp_path / "run" / "model.safetensors").is_file()
    code, out, err = cli("evaluate", PROXY, *TINY_ARGS, "--weights", tmp_path / "run" / "model.safetensors", "--samples", "100")
    assert code == 0 and "top-1" in out and "100 samples of fashion-mnist/test[:100] (torch)" in out
    for args, message in [
        (("evaluate", tmp_path / "missing"), "error: "),
        (("train", PROXY, "-o", tmp_path / "x", "--data", tmp_path / "nodata"), "error: image folder not found"),
        (("store-logits", PROXY, "-o", tmp_path / "y.kd", "--epochs", "1", "--weights", tmp_path / "nope.safetensors"),
         "error: weights file not found"),
        (("train", PROXY, "-o", tmp_path / "d1", "--device", "tpu"), "error: unknown training device 'tpu'"),
        (("train", PROXY, "-o", tmp_path / "d2", "--device", "xla"), "error: training runs on cpu or cuda, not 'xla'"),
        *([(("train", PROXY, "-o", tmp_path / "d3", "--device", "cuda"), "error: --device cuda: this torch sees no CUDA device")]
          if not torch.cuda.is_available() else []),
    ]:
        code, out, err = cli(*args)
        assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3"))  # refused before the run directory
