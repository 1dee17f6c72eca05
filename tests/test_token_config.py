from __future__ import annotations

import os
from pathlib import Path

import pytest

from flynnp2p.config import NodeConfig, load_node, save_node
from flynnp2p.errors import ConfigError, UserError
from flynnp2p.gossip.service import gossip_target
from flynnp2p.token import ClusterToken, api_key_from


def test_token_round_trip_and_bearer() -> None:
    t = ClusterToken.generate()
    parsed = ClusterToken.parse(t.encode())
    assert parsed == t
    assert len(t.gossip_key) == 32
    assert t.accepts_bearer(t.api_key) and t.accepts_bearer(t.encode())
    assert not t.accepts_bearer(ClusterToken.generate().api_key)
    assert not t.accepts_bearer("")
    assert api_key_from(t.encode()) == t.api_key
    assert api_key_from(t.api_key) == t.api_key
    assert t.api_key not in repr(t) and t.encode() not in repr(t)


@pytest.mark.parametrize("bad", ["", "abc", "!!!!", ClusterToken.generate().encode()[:-3]])
def test_bad_tokens_are_rejected_clearly(bad: str) -> None:
    with pytest.raises(UserError, match="token"):
        ClusterToken.parse(bad)


def test_node_saved_0600_and_reloaded(tmp_path: Path) -> None:
    t = ClusterToken.generate()
    cfg = NodeConfig(name="n1", addr="127.0.0.2", data_dir=tmp_path, cluster_id=t.cluster_id_hex,
                     tags={"disk": "ssd"})
    save_node(cfg, t)
    assert os.stat(tmp_path / "token").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "node.json").st_mode & 0o777 == 0o600
    loaded = load_node(tmp_path)
    assert loaded == (cfg, t)
    assert load_node(tmp_path / "nothing") is None
    (tmp_path / "node.json").write_text("{")
    with pytest.raises(ConfigError, match="damaged"):
        load_node(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("name", "bad name", "node name"), ("addr", "host1", "--addr"), ("api_port", 0, "--api-port"),
     ("tags", {"Bad": "x"}, "tag key")],
)
def test_node_config_validation(tmp_path: Path, field: str, value: object, message: str) -> None:
    cfg = NodeConfig(name="n1", addr="127.0.0.2", data_dir=tmp_path)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_gossip_target_defaults_port() -> None:
    assert gossip_target("10.0.0.1") == "10.0.0.1:7946"
    assert gossip_target("host1:8000") == "host1:8000"
    assert gossip_target("::1") == "[::1]:7946"
    assert gossip_target("[::1]:99") == "[::1]:99"


def test_a_relative_data_dir_is_made_absolute_at_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flynnp2p.cli.join import resolve_node
    from flynnp2p.cli.main import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["join", "--name", "n1", "--addr", "127.0.0.2", "--data-dir", "rel/n1"])
    cfg, _, fresh = resolve_node(args)
    assert fresh and cfg.data_dir == tmp_path / "rel" / "n1"
    assert (tmp_path / "rel" / "n1").is_dir()
    monkeypatch.chdir(tmp_path / "rel")  # a restart from elsewhere, by its absolute path
    args = build_parser().parse_args(["join", "--data-dir", str(tmp_path / "rel" / "n1")])
    save_node(cfg, ClusterToken.generate())
    again, _, fresh = resolve_node(args)
    assert not fresh and again.data_dir == tmp_path / "rel" / "n1"


def test_path_variables_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flynnp2p import config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYNNP2P_DATA_DIR", "data")
    monkeypatch.setenv("FLYNNP2P_SERF", "bin/serf")
    monkeypatch.setenv("FLYNNP2P_ETCD", "etcd")  # a bare name: looked up on PATH
    assert config.default_data_dir() == tmp_path / "data"
    assert config.serf_binary() == str(tmp_path / "bin" / "serf")
    assert config.etcd_binary() == "etcd"
    assert config.absolute_path("~/x") == Path.home() / "x"
    assert config.absolute_path("a/../b") == tmp_path / "b"


def test_a_relative_data_dir_in_a_config_is_refused(tmp_path: Path) -> None:
    cfg = NodeConfig(name="n1", addr="127.0.0.2", data_dir=Path("rel/n1"))
    with pytest.raises(ConfigError, match="absolute"):
        cfg.validate()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("name", "n1\n", "node name"), ("domain", "example.com\n", "--domain"),
     ("tags", {"zone": "a b"}, "tag value")],
)  # fmt: skip
def test_node_config_names_match_whole(tmp_path: Path, field: str, value: object, message: str) -> None:
    """Names are matched whole: ``re.match`` with ``$`` let a trailing newline through."""
    cfg = NodeConfig(name="n1", addr="127.0.0.2", data_dir=tmp_path)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
