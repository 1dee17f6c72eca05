"""The deregistration delay as an operator sets it: ``join --drain-delay SECONDS``
(default 2), kept in the node's data dir, refused clearly when it is not a number
of seconds from 0 to 300; FLYNNP2P_DRAIN_DELAY_S overrides it (for tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flynnp2p import config
from flynnp2p.cli.join import resolve_node
from flynnp2p.cli.main import build_parser, main
from flynnp2p.errors import ConfigError
from flynnp2p.token import ClusterToken


def join_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["join", "--name", "n1", "--addr", "127.0.0.2", "--data-dir", str(tmp_path / "n1"), *extra]


def test_the_default_is_two_seconds_and_the_flag_sets_it_and_it_is_kept(tmp_path: Path) -> None:
    cfg, _, _ = resolve_node(build_parser().parse_args(join_args(tmp_path)))
    assert cfg.drain_delay_s == config.DEFAULT_DRAIN_DELAY_S == 2.0
    cfg, _, _ = resolve_node(build_parser().parse_args(join_args(tmp_path, "--drain-delay", "0.5")))
    assert cfg.drain_delay_s == 0.5
    config.save_node(cfg, ClusterToken.generate())
    again, _, fresh = resolve_node(build_parser().parse_args(["join", "--data-dir", str(tmp_path / "n1")]))
    assert not fresh and again.drain_delay_s == 0.5  # a restarted node keeps it
    cfg, _, _ = resolve_node(build_parser().parse_args(join_args(tmp_path, "--drain-delay", "0")))
    assert cfg.drain_delay_s == 0.0  # no delay at all is allowed


@pytest.mark.parametrize("bad", ["-1", "abc", "", "nan", "inf", "301"])
def test_a_bad_drain_delay_is_a_clear_configuration_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="--drain-delay"):
        resolve_node(build_parser().parse_args(join_args(tmp_path, "--drain-delay", bad)))


def test_the_cli_answers_a_bad_drain_delay_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(join_args(tmp_path, "--drain-delay", "-3")) == 2
    err = capsys.readouterr().err
    assert "--drain-delay" in err and "Traceback" not in err


def test_the_environment_overrides_the_setting_for_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.job_drain_delay_s(2.0) == 2.0
    monkeypatch.setenv("FLYNNP2P_DRAIN_DELAY_S", "0.25")
    assert config.job_drain_delay_s(2.0) == 0.25
    for bad in ("x", "-1"):
        monkeypatch.setenv("FLYNNP2P_DRAIN_DELAY_S", bad)
        assert config.job_drain_delay_s(2.0) == 2.0  # ignored, like FLYNNP2P_STOP_GRACE_S's
