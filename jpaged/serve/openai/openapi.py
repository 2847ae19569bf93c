"""The server's OpenAPI 3.1 schema (``GET /openapi.json``), built from the
pydantic models of `protocol`: each route, its request body, its answers
(JSON or Server-Sent Events) and every error status it can give, in OpenAI's
error shape. tests/test_openapi.py runs schemathesis against it on a live
server: no answer may be a 5xx or contradict this schema.
"""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from jpaged.serve.openai import protocol as P

_REF = "#/components/schemas/{model}"
_REQUESTS = (P.CompletionRequest, P.ChatCompletionRequest, P.TokenizeRequest,
             P.DetokenizeRequest)
_RESPONSES = (P.CompletionResponse, P.ChatCompletionResponse, P.ModelList, P.TokenizeResponse,
              P.DetokenizeResponse)
_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       # the HTTP status, or OpenAI's code name ("invalid_api_key")
                       "code": {"type": ["integer", "string", "null"]}}}},
}
_DESCRIPTIONS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
                 408: "The body took too long to arrive", 413: "The body is too large",
                 500: "Internal error (the request's engine step failed)",
                 503: "Refused: the queue is full, the deadline cannot be met, the engine "
                      "is down or the server is shutting down"}


def _ref(cls) -> dict:
    return {"$ref": _REF.format(model=cls.__name__)}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": _DESCRIPTIONS[c], "content": {
        "application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
        for c in codes}


def _json(cls, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(cls)}}}


def _post(summary: str, req, ok: dict, *codes: int) -> dict:
    return {"post": {"summary": summary, "requestBody": {
        "required": True, "content": {"application/json": {"schema": _ref(req)}}},
        "responses": {"200": ok, **_errors(*codes)}}}


def _generation(summary: str, req, resp) -> dict:
    ok = _json(resp, "The result; with stream=true, Server-Sent Events of chunks")
    # One event: its data is a chunk's JSON, an error's, or "[DONE]".
    ok["content"]["text/event-stream"] = {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}
    return _post(summary, req, ok, 400, 401, 404, 408, 413, 500, 503)


def build_openapi(title: str, version: str, auth: bool) -> dict:
    """The schema of this server; ``auth``: routes other than /health (and
    /openapi.json) need a bearer API key."""
    _, defs = models_json_schema([(m, "validation") for m in _REQUESTS]
                                 + [(m, "serialization") for m in _RESPONSES],
                                 ref_template=_REF)
    schemas = {**defs.get("$defs", {}), "ErrorResponse": _ERROR}
    text = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    paths = {
        "/health": {"get": {"summary": "Liveness", "security": [], "responses": {
            "200": {"description": "The engine is running"}, **_errors(503)}}},
        "/version": {"get": {"summary": "Server version", "responses": {"200": {
            "description": "OK", "content": {"application/json": {"schema": {
                "type": "object", "required": ["version"],
                "properties": {"version": {"type": "string"}}}}}}, **_errors(401)}}},
        "/v1/models": {"get": {"summary": "Served models", "responses": {
            "200": _json(P.ModelList, "OK"), **_errors(401)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": text, **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "This schema", "security": [], "responses": {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": {"type": "object"}}}}}}},
        "/tokenize": _post("Tokenize a prompt or chat messages", P.TokenizeRequest,
                           _json(P.TokenizeResponse, "OK"), 400, 401, 404, 408, 413, 500),
        "/detokenize": _post("Token ids to text", P.DetokenizeRequest,
                             _json(P.DetokenizeResponse, "OK"), 400, 401, 404, 408, 413),
        "/v1/completions": _generation("Text completion", P.CompletionRequest,
                                       P.CompletionResponse),
        "/v1/chat/completions": _generation("Chat completion", P.ChatCompletionRequest,
                                            P.ChatCompletionResponse),
    }
    doc = {"openapi": "3.1.0", "info": {"title": title, "version": version},
           "paths": paths, "components": {"schemas": schemas}}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
