"""Task families: registration, devices, templates built without data."""

from __future__ import annotations

import pytest
import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.experiment import build_experiment
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.models.params import float_state
from p2pmoe.tasks.base import all_tasks, resolve_device, task_for_data
from p2pmoe.tasks.image import IMAGE_SHAPES


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
    client = build_experiment(cfg, only="node-00").nodes["node-00"]
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

    monkeypatch.setattr(image, "_dataset", lambda *a: pytest.fail("the coordinator loaded data"))
    server = build_experiment(default_config(method="fedavg", data=data, nodes=2), only="server").nodes["server"]
    assert isinstance(server, FedAvgServer)
    channels, side, classes = IMAGE_SHAPES[data]
    model = image.image_model(server_cfg := default_config(method="fedavg", data=data), channels, side, classes)
    del server_cfg
    assert {k: v.shape for k, v in server.global_state.items()} == {k: v.shape for k, v in float_state(model).items()}
