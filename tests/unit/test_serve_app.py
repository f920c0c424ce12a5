"""Scale and security settings flow from the config into the Serve deployment options."""

from __future__ import annotations

import pytest

from r2d.config import ConfigError, ServeConfig, load_config
from r2d.serve.app import _ingress_options


def test_api_key_reaches_the_ingress_replica_only_through_its_env(monkeypatch):
    monkeypatch.delenv("R2D_API_KEY", raising=False)
    assert "runtime_env" not in _ingress_options(ServeConfig())["ray_actor_options"]
    monkeypatch.setenv("R2D_API_KEY", "k")
    assert _ingress_options(ServeConfig())["ray_actor_options"]["runtime_env"] == {"env_vars": {"R2D_API_KEY": "k"}}


@pytest.mark.parametrize("override, field", [
    ("serve.allowed_modes=[hide, loud]", "allowed_modes"),
    ("serve.reload_poll_s=-1", "reload_poll_s"),
    ("serve.engine.max_model_len=512", "engine.max_model_len"),  # not above max_tokens_limit (1024)
    ("serve.engine.kind=openai", "engine"),
    ("serve.mode=guard", None),
])
def test_serve_config_checks(override, field):
    if field is None:
        assert load_config(None, [override]).serve.mode == "guard"
        return
    with pytest.raises(ConfigError, match=f"serve.{field}"):
        load_config(None, [override])
