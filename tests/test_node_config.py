import dataclasses
from pathlib import Path

import pytest

from p2pmoe.cli import main
from p2pmoe.node.config import is_loopback, load_node_config
from p2pmoe.node.launch import check_role

PEERS = Path(__file__).parent.parent / "peers"


def test_lan_example_configs_load_and_agree():
    configs = {c.node_id: c for c in map(load_node_config, sorted(PEERS.glob("*.toml")))}
    assert set(configs) == {"server", "node-00", "node-01", "node-02"}
    assert set(configs["server"].peers) == {"node-00", "node-01", "node-02"}
    for node in ("node-00", "node-01", "node-02"):
        assert set(configs[node].peers) == {"server"}
        assert configs[node].experiment.config_hash == configs["server"].experiment.config_hash  # the same experiment
    assert configs["server"].experiment.run.nodes == 3


def _write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ('bind = "tcp://127.0.0.1:1"\n', "node_id"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\nbogus = 1\n', "unknown keys"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[peers]\na = "tcp://127.0.0.1:2"\n', "peers"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[timing]\nround_deadline = -1\n', "round_deadline"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[timing]\nheartbeet = 1\n', "timing"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[run]\nnodse = 3\n', "nodse"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[experiment]\nnodes = 3\n', r"unknown keys \['experiment'\]"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[run]\nrounds = "20"\n', r"node.toml: \[run\] rounds must be a int, got '20'"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[timing]\nheartbeat = "1s"\n', r"node.toml: \[timing\] heartbeat must be a number of seconds, got '1s'"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[timing]\nrequest_retries = 1.5\n', r"request_retries must be a number \(a whole count\)"),
        ('node_id = "a"\nbind = "127.0.0.1:1"\n', "bind must be an address like"),
        ('node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[security]\nsecret_key = "nope.key_secret"\npublic_key = "nope.key"\n', "no key file at"),
        ('node_id = "a"\nbind = = 3\n', "cannot read"),
    ],
)
def test_bad_node_configs_are_explained(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_node_config(_write(tmp_path, text))


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    cfg = load_node_config(_write(tmp_path, 'node_id = "a"\nbind = "tcp://127.0.0.1:1"\nout = "runs/a"\n'))
    assert cfg.out == tmp_path / "runs" / "a"
    assert cfg.checkpoint_path == tmp_path / "runs" / "a" / "checkpoint.safetensors"


@pytest.mark.parametrize(
    "role, config, message",
    [
        ("coordinator", PEERS / "node-00.toml", "not a coordinator config"),
        ("node", PEERS / "server.toml", "start it with `p2pmoe coordinator"),
    ],
)
def test_a_config_in_the_wrong_role_is_refused(role, config, message):
    with pytest.raises(ValueError, match=message):
        check_role(load_node_config(config), role, config)
    other = "node" if role == "coordinator" else "coordinator"
    check_role(load_node_config(config), other, config)  # the right role passes


def test_a_coordinator_needs_a_server_mediated_method(tmp_path):
    text = (PEERS / "server.toml").read_text()
    assert 'method = "fedavg"' in text
    path = _write(tmp_path, text.replace('method = "fedavg"', 'method = "gossip"'))
    with pytest.raises(ValueError, match="got 'gossip'"):
        check_role(load_node_config(path), "coordinator", path)


def test_the_cli_refuses_a_client_config_for_the_coordinator(capsys):
    assert main(["coordinator", "--config", str(PEERS / "node-00.toml")]) == 2
    assert "not a coordinator config" in capsys.readouterr().err


def test_a_relative_data_root_is_taken_from_the_config_folder(tmp_path):
    path = _write(tmp_path, 'node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[run]\ndata = "fmnist"\nmethod = "local"\ndata_root = "data/fmnist"\n')
    assert load_node_config(path).experiment.run.data_root == str(tmp_path / "data" / "fmnist")
    # a family that counts its clients from the data reads it while the file is resolved, and says where it looked
    path = _write(tmp_path, 'node_id = "a"\nbind = "tcp://127.0.0.1:1"\n[run]\ndata = "fkcb"\nmethod = "local"\ndata_root = "data/fkcb"\n')
    with pytest.raises(FileNotFoundError, match=f"not found in {tmp_path / 'data' / 'fkcb'}"):
        load_node_config(path)


def test_keys_refusing_to_overwrite_is_an_error_line_not_a_traceback(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path), "a"]) == 0
    capsys.readouterr()
    assert main(["keys", "--out", str(tmp_path), "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pmoe: error:") and "Traceback" not in err


def test_a_node_that_cannot_bind_says_so_in_one_line(tmp_path, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        path = _write(tmp_path, f'node_id = "node-00"\nbind = "tcp://127.0.0.1:{port}"\n[run]\nmethod = "local"\nnodes = 1\n')
        assert main(["node", "--config", str(path)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "cannot listen on" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "bind, loopback",
    [("tcp://127.0.0.1:5550", True), ("tcp://127.3.4.5:1", True), ("tcp://localhost:5550", True), ("tcp://[::1]:5550", True),
     ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5550", False), ("tcp://192.168.1.10:5550", False), ("tcp://*:5550", False)],
)  # fmt: skip
def test_loopback_addresses(bind, loopback):
    assert is_loopback(bind) is loopback


def test_plaintext_off_loopback_needs_insecure(tmp_path, capsys):
    """Issue 26 N2: a node without keys listens on another machine's reach only when told to."""
    path = tmp_path / "node.toml"
    path.write_text('node_id = "node-00"\nbind = "tcp://0.0.0.0:0"\n[peers]\nserver = "tcp://127.0.0.1:1"\n[run]\nmethod = "fedavg"\nnodes = 1\n')
    cfg = load_node_config(path)
    with pytest.raises(ValueError, match=r"--insecure"):
        cfg.check_plaintext_bind()
    dataclasses.replace(cfg, insecure=True).check_plaintext_bind()
    dataclasses.replace(cfg, bind="tcp://127.0.0.1:0").check_plaintext_bind()
    assert main(["node", "--config", str(path)]) == 2
    assert "without encryption or authentication" in capsys.readouterr().err
    path.write_text(path.read_text().replace('bind = "tcp://0.0.0.0:0"\n', 'bind = "tcp://0.0.0.0:0"\ninsecure = true\n'))
    assert load_node_config(path).insecure
    path.write_text(path.read_text().replace("insecure = true", 'insecure = "yes"'))
    with pytest.raises(ValueError, match="insecure must be true or false"):
        load_node_config(path)
