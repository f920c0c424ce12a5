"""The OpenAPI document of the chat API, sized to one server's limits (for clients and for fuzzing).

The routes read raw JSON themselves (strict validation, OpenAI-style errors), so FastAPI
cannot derive the request body; :func:`openapi` adds it from the pydantic schema.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from r2d.serve.pivot_modes import MODES
from r2d.serve.schemas import ChatCompletionRequest

_ERROR = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {"type": "object"}}}}
RESPONSES = {code: _ERROR for code in (400, 401, 403, 404, 413, 415, 422, 503, 504)}


def chat_operation() -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
        "security": [{"bearer": []}]}


def openapi(api: FastAPI, cfg) -> dict:
    """The OpenAPI document, with the request schema sized to this server's limits (for clients and fuzzers)."""
    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
    request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = request.pop("$defs", {})
    props = request["properties"]
    for key in ("max_tokens", "max_completion_tokens"):
        props[key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit}, {"type": "null"}]}
    props["messages"]["maxItems"] = cfg.max_messages
    props["n"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": cfg.max_choices}, {"type": "null"}]}
    props["model"] = {"type": "string", "enum": ["", cfg.served_model_name]}
    props["r2d_mode"] = {"anyOf": [{"type": "string", "enum": list(MODES)}, {"type": "null"}]}
    content = defs["ChatMessage"]["properties"]["content"]
    for option in content.get("anyOf", []):
        if option.get("type") == "string":
            option["maxLength"] = cfg.max_message_chars
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update({**defs, "ChatCompletionRequest": request})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    api.openapi_schema = schema
    return schema
