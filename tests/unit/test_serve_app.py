"""Scale and security settings flow from the config into the Serve deployment options."""

from __future__ import annotations

import pytest

from r2d.config import ConfigError, ServeConfig, load_config
from r2d.serve.app import _ingress_options


def test_keys_never_travel_in_a_ray_runtime_env(monkeypatch, tmp_path):
    """Ray shows runtime envs in its dashboard and job listings: the replica reads its keys itself."""
    import pickle

    monkeypatch.setenv("R2D_API_KEY", "api-secret-0451")
    monkeypatch.setenv("R2D_ADMIN_KEY", "admin-secret-0451")
    (tmp_path / "key").write_text("file-secret-0451")
    cfg = ServeConfig(api_key_file=str(tmp_path / "key"))
    options = _ingress_options(cfg)
    assert "runtime_env" not in options["ray_actor_options"]
    # Nothing Ray receives for the ingress (its options and its init arguments) holds a key.
    shipped = pickle.dumps((options, cfg))
    assert b"secret-0451" not in shipped


@pytest.mark.parametrize("override, field", [
    ("serve.allowed_modes=[hide, loud]", "allowed_modes"),
    ("serve.reload_poll_s=-1", "reload_poll_s"),
    ("serve.engine.max_model_len=512", "engine.max_model_len"),  # not above max_tokens_limit (1024)
    ("serve.engine.kind=openai", "engine"),
    ("serve.request_timeout_s=0", "request_timeout_s"),
    ("serve.reload_backoff_s=0", "reload_backoff_s"),
    ("serve.host=", "host"),
    ("serve.mode=guard", None),
])
def test_serve_config_checks(override, field):
    if field is None:
        assert load_config(None, [override]).serve.mode == "guard"
        return
    with pytest.raises(ConfigError, match=f"serve.{field}"):
        load_config(None, [override])


def test_the_alias_poller_backs_off_while_reloads_fail(monkeypatch):
    """Every 1 s normally; after failures 30, 60, 120, 240 s (doubling from serve.reload_backoff_s); back to 1 s."""
    import asyncio

    from r2d.serve import replica

    delays = []

    async def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 7:
            raise asyncio.CancelledError

    class Registry:
        calls = 0

        async def reload(self):
            self.calls += 1
            if self.calls <= 4:
                raise RuntimeError("the registry does not answer")
            return {"reloaded": False}

    monkeypatch.setattr(replica.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(replica.poll_reload(Registry(), every_s=1.0, backoff_s=30.0))
    assert delays == [1.0, 30.0, 60.0, 120.0, 240.0, 1.0, 1.0]
