"""The `serve` flags (generated from ServerConfig) and their defaults; no server started."""
from __future__ import annotations

import pytest

from turbollm.cli import build_parser
from turbollm.server.cli import server_config_from_args
from turbollm.server.config import ServerConfig


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_safe(monkeypatch):
    monkeypatch.delenv("TURBOLLM_API_KEY", raising=False)
    args = parse()
    cfg = server_config_from_args(args)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.origins) == ("127.0.0.1", 8000, None, [])
    assert (cfg.max_n, cfg.max_logprobs, cfg.max_stop_strings, cfg.max_stop_length) == \
        (16, 20, 16, 256)
    assert cfg.max_request_bytes_int == 1 << 20 and cfg.max_queued_requests == 256
    assert cfg.allow_request_chat_template is False
    assert args.model == "smollm2-135m" and args.func.__name__ == "run_serve"


def test_flags_and_env_key(monkeypatch):
    monkeypatch.setenv("TURBOLLM_API_KEY", "from-env")
    assert server_config_from_args(parse()).api_key == "from-env"
    cfg = server_config_from_args(parse(
        "--api-key", "flag", "--port", "9000", "--allowed-origins", "https://a, https://b",
        "--max-queued-requests", "3", "--shutdown-timeout", "2.5", "--max-request-bytes",
        "64KiB", "--allow-request-chat-template", "--served-model-name", "m", "--max-n", "2"))
    assert cfg.api_key == "flag" and cfg.port == 9000
    assert cfg.origins == ["https://a", "https://b"]
    assert (cfg.max_queued_requests, cfg.shutdown_timeout, cfg.max_request_bytes_int) == \
        (3, 2.5, 65536)
    assert cfg.allow_request_chat_template and cfg.served_model_name == "m" and cfg.max_n == 2


@pytest.mark.parametrize("kw", [dict(port=70000), dict(max_n=0), dict(max_logprobs=-1),
                                dict(max_queued_requests=-1), dict(max_queue_delay=-0.5),
                                dict(max_request_bytes="0"), dict(shutdown_timeout=-1),
                                dict(api_key="")])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        ServerConfig(**kw)


def test_an_empty_key_is_an_error_never_no_auth(monkeypatch, tmp_path):
    """`--api-key "$UNSET_VAR"` must not silently turn authentication off (issue 31)."""
    monkeypatch.delenv("TURBOLLM_API_KEY", raising=False)
    for argv in (("--api-key", ""), ("--api-key", "  ")):
        with pytest.raises(ValueError, match="--api-key is empty"):
            server_config_from_args(parse(*argv))
    monkeypatch.setenv("TURBOLLM_API_KEY", "")
    with pytest.raises(ValueError, match=r"\$TURBOLLM_API_KEY is empty"):
        server_config_from_args(parse())
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--api-key-file .* is empty"):
        server_config_from_args(parse("--api-key-file", str(empty)))


def test_the_key_from_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TURBOLLM_API_KEY", "from-env")  # a file given wins over the env
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    assert server_config_from_args(parse("--api-key-file", str(secret))).api_key == "s3cret"
    with pytest.raises(ValueError, match="not both"):
        server_config_from_args(parse("--api-key", "a", "--api-key-file", str(secret)))
    with pytest.raises(ValueError, match="cannot read"):
        server_config_from_args(parse("--api-key-file", str(tmp_path / "missing")))


def test_an_empty_key_stops_serve_with_one_line(monkeypatch, capsys):
    from turbollm.cli import main
    monkeypatch.delenv("TURBOLLM_API_KEY", raising=False)
    assert main(["serve", "--api-key", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api-key is empty" in err[0]
