"""Several models behind one endpoint: which kind of target it is, and which models it serves.

Two programs put several llama-servers behind one address. llama-server's own router mode
(`--models-dir`, `--models-preset`) lists its models at `GET /models`; llama-swap lists them
at `GET /v1/models` and the running ones at `GET /running`. Both start a model when a request
names one that is not running, and may stop another to make room: the model production uses.
So whatever the exporter asks of such a target must name only a model these lists call loaded,
and every request to a router carries `autoload=false` (`router_path`), which makes it refuse
instead of load. What each program does was seen running or read from its source: see
docs/multi-model.md.

The parsers are pure: parsed JSON in, values out, or `ServerError(BAD_RESPONSE)` for an answer
that is not what these programs send. A model name is used as it was sent, in requests and as
the `model` label, so a name that is not already clean label text (`clean_text`) is refused:
a cleaned spelling could name another model, and naming a model is what loads it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote, urlencode

from exporter.llama.client import BAD_RESPONSE, HTTP_ERROR, LlamaClient, ServerError
from exporter.llama.redact import redacted
from exporter.llama.untrusted import LABEL_MAX_CHARS, clean_text

TargetKind = Literal["single", "router", "llama-swap"]
ModelStatus = Literal["loaded", "loading", "unloading", "unloaded", "failed", "unknown"]

# Beyond any real deployment (a router lists the GGUFs of a directory): a longer list is a
# broken or hostile answer, and every model becomes label series and per-model work.
MAX_MODELS: Final = 256
# A child's command line is a few dozen arguments; a path is at most PATH_MAX (4096).
MAX_ARGS: Final = 256
ARG_MAX_CHARS: Final = 4096
# llama-swap's `cmd` is a whole command line, often several lines of options.
CMD_MAX_CHARS: Final = 64 * 1024

# llama-server b11434 (server-models.h): a child that exited with an error is `unloaded`
# with `"failed": true` beside the value.
_ROUTER_STATUSES: Final[Mapping[str, ModelStatus]] = {
    "loaded": "loaded",
    "loading": "loading",
    "unloaded": "unloaded",
}
# llama-swap's process states (internal/process/process.go); `/running` leaves out the
# stopped and shut down ones, but the mapping is total all the same.
_SWAP_STATES: Final[Mapping[str, ModelStatus]] = {
    "ready": "loaded",
    "starting": "loading",
    "stopping": "unloading",
    "stopped": "unloaded",
    "shutdown": "unloaded",
}
# llama-swap's /v1/models also lists aliases, selectors, profile pins and peers' models
# (`meta.llamaswap.type`): names that route to a model, or to another machine. Only its own
# models are probed, by their own names; a listing without the field predates it (#901).
_SWAP_OWN_MODEL_TYPES: Final = frozenset({"model"})
# How the client words the refusals of a request for a model that is not loaded: b11434's
# answer to `autoload=false`, and llama-swap's to an ignored path (HTTP 409 "model X is not
# loaded; path matches upstream.ignorePaths").
_ROUTER_NOT_LOADED: Final = "HTTP 400: model is not loaded"
_SWAP_NOT_LOADED: Final = "HTTP 409: model "


@dataclass(frozen=True)
class RouterModel:
    """One model behind a router or llama-swap, as its listing describes it now."""

    name: str  # exactly as the server spells it: what a request names, and the label
    status: ModelStatus
    # The child's command line (router: `status.args`; llama-swap: its `cmd`, split as a
    # shell would). It may hold an API key: log it only through `redacted`.
    args: tuple[str, ...] = ()

    @property
    def loaded(self) -> bool:
        """Whether a request naming this model is served without loading anything."""
        return self.status == "loaded"

    def __repr__(self) -> str:
        args = redacted(self.args)
        return f"RouterModel(name={self.name!r}, status={self.status!r}, args={args})"


def kind_from_props(props: Any) -> Literal["single", "router"]:
    """A router's own `/props` says `"role": "router"`; a single server's has no role."""
    if not isinstance(props, dict):
        raise ServerError(BAD_RESPONSE, "/props is not a JSON object")
    return "router" if props.get("role") == "router" else "single"


def parse_router_models(data: Any) -> tuple[RouterModel, ...]:
    """llama-server router mode's `GET /models`: every model it knows, loaded or not."""
    entries = _entries(data, "/models")
    models = []
    for entry in entries:
        status = entry.get("status")
        status = status if isinstance(status, dict) else {}
        models.append(
            RouterModel(
                name=_name(entry.get("id"), "/models"),
                status=_router_status(status),
                args=_args(status.get("args", [])),
            )
        )
    return _distinct(models, "/models")


def parse_swap_running(data: Any) -> tuple[RouterModel, ...]:
    """llama-swap's `GET /running`: `{"running": [{"model", "state", "cmd", ...}]}`."""
    if not isinstance(data, dict) or not isinstance(data.get("running"), list):
        raise ServerError(BAD_RESPONSE, "/running is not an object with a `running` list")
    entries = data["running"]
    if len(entries) > MAX_MODELS:
        raise ServerError(BAD_RESPONSE, f"/running lists over {MAX_MODELS} models")
    models = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ServerError(BAD_RESPONSE, "/running holds an entry that is not an object")
        state = entry.get("state")
        models.append(
            RouterModel(
                name=_swap_name(entry.get("model"), "/running"),
                status=_SWAP_STATES.get(state, "unknown") if isinstance(state, str) else "unknown",
                args=_command_words(entry.get("cmd", "")),
            )
        )
    return _distinct(models, "/running")


def parse_swap_listing(data: Any) -> tuple[str, ...]:
    """The names of llama-swap's own models in its `GET /v1/models`, in the order listed."""
    names = []
    for entry in _entries(data, "/v1/models"):
        meta = entry.get("meta")
        own = meta.get("llamaswap") if isinstance(meta, dict) else None
        kind = own.get("type", "model") if isinstance(own, dict) else "model"
        if isinstance(kind, str) and kind in _SWAP_OWN_MODEL_TYPES:  # a list is unhashable
            names.append(_swap_name(entry.get("id"), "/v1/models"))
    if len(set(names)) != len(names):
        raise ServerError(BAD_RESPONSE, "/v1/models names a model twice")
    return tuple(names)


def merge_swap_models(
    listed: Iterable[str], running: Iterable[RouterModel]
) -> tuple[RouterModel, ...]:
    """Every model llama-swap lists or runs, with its state from `/running`.

    `/running` is the authority on state: `/v1/models` calls a starting model loaded. A
    running model that the listing leaves out (`unlisted: true`) is kept: it runs, and can
    be probed by its name without starting anything."""
    by_name = {model.name: model for model in running}
    merged = [by_name.pop(name, RouterModel(name, "unloaded")) for name in listed]
    return (*merged, *by_name.values())


def router_path(path: str, model: str) -> str:
    """`path` on a router, for `model` only, and refused rather than loading it.

    b11434 loads a model that any request names (`/props`, `/slots`, `/metrics` included),
    evicting the least recently used one at `--models-max`; with `autoload=false` in the query
    it answers HTTP 400 "model is not loaded" instead, whatever `--models-autoload` says. That
    closes the gap between reading `/models` and sending the request."""
    return f"{path}?{urlencode({'model': model, 'autoload': 'false'})}"


def swap_path(path: str, model: str) -> str:
    """`path` on llama-swap's pass-through to `model`'s own server.

    llama-swap starts the model for such a request when it is not running (unless the path
    matches its `upstream.ignorePaths`): the caller checks `/running` first."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    return f"/upstream/{quote(model, safe='/')}{path}"


def is_not_loaded(error: ServerError) -> bool:
    """Whether a request was refused because its model is not loaded: a router's answer to
    `autoload=false`, or llama-swap's to a path in its `upstream.ignorePaths`. The model
    unloaded after the list was read; the round ends there, and nothing was loaded."""
    if error.reason != HTTP_ERROR:
        return False
    if error.detail == _ROUTER_NOT_LOADED:
        return True
    return error.detail.startswith(_SWAP_NOT_LOADED) and " is not loaded;" in error.detail


async def detect_kind(client: LlamaClient) -> TargetKind:
    """What serves at the client's address, from reads that name no model.

    `/props` without a model: a router answers with `"role": "router"`, a single server with
    its model, llama-swap with HTTP 404 (it dispatches `/props` by its `model` parameter and
    finds none). Only then `/running`, which llama-swap serves and llama-server answers 404."""
    try:
        return kind_from_props(await client.get_json("/props"))
    except ServerError as exc:
        if exc.reason != HTTP_ERROR:
            raise  # unreachable, loading, refused key: the same for every kind
        props_error = exc
    try:
        parse_swap_running(await client.get_json("/running"))
    except ServerError as exc:
        if exc.reason == HTTP_ERROR:
            raise props_error from None  # neither: the /props answer says what is wrong
        raise
    return "llama-swap"


async def read_router_models(client: LlamaClient) -> tuple[RouterModel, ...]:
    return parse_router_models(await client.get_json("/models"))


async def read_swap_models(client: LlamaClient) -> tuple[RouterModel, ...]:
    # `/running` last: a model that starts between the two reads shows as loading or
    # loaded, never as unloaded while it is running.
    listed = parse_swap_listing(await client.get_json("/v1/models"))
    running = parse_swap_running(await client.get_json("/running"))
    return merge_swap_models(listed, running)


def _entries(data: Any, what: str) -> list[dict[str, Any]]:
    """The `data` list of an OpenAI-style listing, each entry an object, within MAX_MODELS."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ServerError(BAD_RESPONSE, f"{what} is not an object with a `data` list")
    entries: list[dict[str, Any]] = data["data"]
    # Counted before anything else is looked at: the list was bounded only by the body size.
    if len(entries) > MAX_MODELS:
        raise ServerError(BAD_RESPONSE, f"{what} lists over {MAX_MODELS} models")
    if not all(isinstance(entry, dict) for entry in entries):
        raise ServerError(BAD_RESPONSE, f"{what} holds an entry that is not an object")
    return entries


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or clean_text(value) != value:
        raise ServerError(
            BAD_RESPONSE,
            f"{what} names a model with other than printable text of 1 to "
            f"{LABEL_MAX_CHARS} characters",
        )
    return value


def _swap_name(value: Any, what: str) -> str:
    """A llama-swap name also becomes a path (`/upstream/<name>/...`): each of its segments
    must name something, or the path would lead elsewhere on the server."""
    name = _name(value, what)
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        raise ServerError(BAD_RESPONSE, f"{what} names a model that is not a path segment")
    return name


def _router_status(status: dict[str, Any]) -> ModelStatus:
    value = status.get("value")
    if status.get("failed") is True and value == "unloaded":
        return "failed"
    return _ROUTER_STATUSES.get(value, "unknown") if isinstance(value, str) else "unknown"


def _args(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        raise ServerError(BAD_RESPONSE, f"status.args is not a list of at most {MAX_ARGS}")
    if not all(isinstance(arg, str) and len(arg) <= ARG_MAX_CHARS for arg in value):
        raise ServerError(BAD_RESPONSE, f"status.args holds other than text of <= {ARG_MAX_CHARS}")
    # Read for options and perhaps logged: no control characters, no lone surrogates.
    return tuple(clean_text(arg, ARG_MAX_CHARS) for arg in value)


def _command_words(value: Any) -> tuple[str, ...]:
    """llama-swap's `cmd`, split as its shell-words parser would; () when it cannot be."""
    if not isinstance(value, str) or len(value) > CMD_MAX_CHARS:
        return ()
    try:
        words = shlex.split(value)
    except ValueError:  # an unbalanced quote: the command still ran, its options are unknown
        return ()
    if len(words) > MAX_ARGS or any(len(word) > ARG_MAX_CHARS for word in words):
        return ()
    return tuple(clean_text(word, ARG_MAX_CHARS) for word in words)


def _distinct(models: list[RouterModel], what: str) -> tuple[RouterModel, ...]:
    if len({model.name for model in models}) != len(models):
        raise ServerError(BAD_RESPONSE, f"{what} names a model twice")
    return tuple(models)
