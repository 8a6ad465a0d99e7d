"""Task families: registration, devices, templates built without data."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from p2pmoe.config import default_config, resolve, with_options
from p2pmoe.data.images import float_images
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.models.params import float_state
from p2pmoe.tasks.base import all_tasks, resolve_device, task_for_data
from p2pmoe.tasks.image import IMAGE_SHAPES, ImageTask, image_embedder


def test_every_data_set_belongs_to_exactly_one_family():
    owners = [d for t in all_tasks().values() for d in t.data]
    assert len(owners) == len(set(owners))
    assert task_for_data("fkcb").name == "sequential" and task_for_data("fmnist").name == "image"
    with pytest.raises(ValueError, match="unknown data 'imagenet'"):
        task_for_data("imagenet")


def test_device_auto_is_the_cpu_without_cuda_and_cuda_without_it_is_an_error():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_learners_put_their_model_on_the_run_device_and_methods_send_cpu_tensors(fkcb_like):
    base = default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like), device="cpu")
    cfg = with_options(base, task_options={"embed_dim": 8, "max_len": 8, "negatives": 20})
    client = build_experiment(resolve_experiment(cfg), only="node-00").nodes["node-00"]
    assert client.learner.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in client.learner.model.parameters())
    [upload] = client.start_round(0)
    assert all(t.device.type == "cpu" for t in upload.message.tensors.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_sends_the_same_bytes_as_a_cpu_run(fkcb_like, tmp_path):
    from p2pmoe.sim.runner import run_simulation

    small = {"embed_dim": 8, "max_len": 8, "negatives": 20}
    base = with_options(default_config(method="fmoe-cdsr", data="fkcb", data_root=str(fkcb_like), rounds=1), task_options=small)
    cpu = run_simulation(with_options(base, device="cpu", out=str(tmp_path / "cpu")), progress=False)
    gpu = run_simulation(with_options(base, device="cuda", out=str(tmp_path / "gpu")), progress=False)
    assert cpu["bytes"]["by_kind"] == gpu["bytes"]["by_kind"] and 0 < gpu["metrics"]["mrr"] <= 1


@pytest.mark.parametrize("data", sorted(IMAGE_SHAPES))
def test_an_image_coordinator_template_needs_no_data(data, monkeypatch):
    import p2pmoe.tasks.image as image

    for loader in ("_dataset", "_labels", "load_stored_images"):
        monkeypatch.setattr(image, loader, lambda *a: pytest.fail("the coordinator loaded data"))
    server = build_experiment(resolve_experiment(default_config(method="fedavg", data=data, nodes=2)), only="server").nodes["server"]
    assert isinstance(server, FedAvgServer)
    channels, side, classes = IMAGE_SHAPES[data]
    model = image.image_model(server_cfg := default_config(method="fedavg", data=data), channels, side, classes)
    del server_cfg
    assert {k: v.shape for k, v in server.global_state.items()} == {k: v.shape for k, v in float_state(model).items()}


def _image_learner(x: torch.Tensor, y: torch.Tensor) -> ImageClassifierLearner:
    torch.manual_seed(0)
    model = nn.Sequential(image_embedder(1, 28, 8), nn.Linear(8, 10))
    return ImageClassifierLearner(model, (x[:40], y[:40]), (x[40:], y[40:]), global_test=(x[::3], y[::3]), batch_size=16, lr=0.1, seed=3)


def test_an_image_learner_on_uint8_images_trains_and_scores_bit_identically_to_one_on_floats():
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, size=(60, 1, 28, 28), dtype=np.uint8), torch.from_numpy(rng.integers(0, 10, 60))
    stored, floats = _image_learner(torch.from_numpy(pixels), labels), _image_learner(float_images(pixels), labels)
    for _ in range(3):
        assert stored.train(1) == floats.train(1) and stored.evaluate() == floats.evaluate()
    assert stored.train_x.dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(stored.model.state_dict().values(), floats.model.state_dict().values(), strict=True))


def _idx(array: np.ndarray) -> bytes:
    return gzip.compress(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_an_image_node_built_alone_reads_only_its_rows_and_equals_one_built_with_everyone(tmp_path, monkeypatch):
    import p2pmoe.tasks.image as image

    rng = np.random.default_rng(1)
    for stem, n in (("train", 300), ("t10k", 80)):
        (tmp_path / f"{stem}-images-idx3-ubyte.gz").write_bytes(_idx(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)))
        (tmp_path / f"{stem}-labels-idx1-ubyte.gz").write_bytes(_idx(rng.integers(0, 10, n).astype(np.uint8)))
    base = default_config(method="fedavg", data="mnist", data_root=str(tmp_path), nodes=3, partition="dirichlet:0.5", batch_size=16, max_train_per_node=40)
    cfg = resolve(with_options(base, task_options={"global_test_size": 30, "embed_dim": 8, "expert_hidden": 8}))
    task = ImageTask()
    everyone = task.learners(cfg, [0, 1, 2])
    task.release_data()
    monkeypatch.setattr(image, "_dataset", lambda *a: pytest.fail("a node built alone loaded every image"))
    alone = task.learners(cfg, [1])[1]
    together = everyone[1]
    assert len(alone.train_y) == 40 and torch.equal(alone.train_x, together.train_x) and torch.equal(alone.test_x, together.test_x)
    assert all(torch.equal(a, b) for a, b in zip(alone.global_test, together.global_test, strict=True)) and len(alone.global_test[1]) == 30
    assert alone.train(1) == together.train(1) and alone.evaluate() == together.evaluate()
    assert float_state(alone.model).keys() == float_state(together.model).keys()
    assert all(torch.equal(a, b) for a, b in zip(float_state(alone.model).values(), float_state(together.model).values(), strict=True))
