"""The KV-cache settings of a running llama-server, from its argv and environment.

llama-server exposes none of these over HTTP, so a colocated exporter reads
`/proc/<pid>/cmdline` and `/proc/<pid>/environ`. The rules are those of llama.cpp b11434's
`common/arg.cpp` and `tools/server/server.cpp`:

* every option can also come from a `LLAMA_ARG_*` variable; the command line beats it;
* a repeated option keeps its last value;
* `-np -1` (the server's default) means 4 slots with a unified cache, whatever `-kvu` says.

The command line is read by `exporter.llama.argv`, as every llama-server command line is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from exporter.kv.cache import (
    DEFAULT_CACHE_TYPE,
    DEFAULT_N_BATCH,
    DEFAULT_N_UBATCH,
    cache_type,
)
from exporter.llama.argv import ArgvError, find_options

# tools/server/server.cpp: what `-np -1` (auto) resolves to.
AUTO_PARALLEL_SLOTS: Final = 4


class ServerArgsError(ValueError):
    """An option value llama-server would refuse (so it is not the running server's)."""


@dataclass(frozen=True)
class KvServerArgs:
    """What llama-server's options say about its KV cache, resolved as llama-server does."""

    type_k: str = DEFAULT_CACHE_TYPE
    type_v: str = DEFAULT_CACHE_TYPE
    # 0: the model's training context (which `--fit` may shrink on a GPU).
    ctx_size: int = 0
    # After resolving `-np -1` to AUTO_PARALLEL_SLOTS.
    n_parallel: int = AUTO_PARALLEL_SLOTS
    kv_unified: bool = True
    swa_full: bool = False
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
    # "on", "off" or "auto".
    flash_attn: str = "auto"
    kv_unified_per_slot: int = 0
    # `-c 0` given explicitly: llama-server then keeps the full training context.
    ctx_size_explicit_zero: bool = False

    @property
    def effective_ctx_size(self) -> int:
        """The context llama-server asks llama.cpp for; 0 still means the training context."""
        if self.ctx_size == 0 and self.kv_unified_per_slot > 0 and not self.ctx_size_explicit_zero:
            # --kv-unified-per-slot sizes the pool when -c does not.
            return self.n_parallel * self.kv_unified_per_slot
        return self.ctx_size


def server_kv_args(argv: Sequence[str], environ: Mapping[str, str]) -> KvServerArgs:
    """Parse llama-server's argv (program name optional) and environment."""
    state = _State()
    for env_option in _OPTIONS:
        env_option.apply_env(state, environ)
    try:
        options = list(find_options(argv, _TAKES_VALUE))
    except ArgvError as exc:
        raise ServerArgsError(str(exc)) from None
    for option in options:
        _BY_FLAG[option.name].apply(state, option.name, option.value)
    return state.resolve()


class _State:
    def __init__(self) -> None:
        self.args = KvServerArgs(n_parallel=-1, kv_unified=False)

    def set(self, **changes: object) -> None:
        self.args = replace(self.args, **changes)  # type: ignore[arg-type]

    def resolve(self) -> KvServerArgs:
        if self.args.n_parallel < 0:
            # server.cpp overrides -kvu/-no-kvu here: auto slots always share one cache.
            return replace(self.args, n_parallel=AUTO_PARALLEL_SLOTS, kv_unified=True)
        return self.args


_TRUTHY: Final = frozenset({"on", "enabled", "true", "1"})
_FALSEY: Final = frozenset({"off", "disabled", "false", "0"})
_AUTO: Final = frozenset({"auto", "-1"})


def _need(name: str, value: str | None) -> str:
    if value is None:
        raise ServerArgsError(f"{name} needs a value")
    return value


def _int(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ServerArgsError(f"{name}: {value!r} is not an integer") from None


def _bool(name: str, value: str) -> bool:
    if value in _TRUTHY:
        return True
    if value in _FALSEY:
        return False
    raise ServerArgsError(f"{name}: {value!r} is not a boolean (on/off, true/false, 1/0)")


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    env: str
    # Called with the option's value (None for a flag without one); updates the state.
    handler: Callable[[_State, str, str | None], None]
    takes_value: bool = True
    # Flags that set the option to false (`-no-kvu`); the env also has a LLAMA_ARG_NO_ twin.
    negative_flags: tuple[str, ...] = ()

    def apply(self, state: _State, name: str, value: str | None) -> None:
        if name in self.negative_flags:
            self.handler(state, name, "0")
        else:
            self.handler(state, name, value)

    def apply_env(self, state: _State, environ: Mapping[str, str]) -> None:
        if self.negative_flags:
            # common_arg::get_value_from_env: LLAMA_ARG_NO_X, whatever its value, means false.
            negative = self.env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_", 1)
            if negative in environ:
                self.handler(state, negative, "0")
                return
        value = environ.get(self.env)
        if value is None:
            return
        if not self.takes_value and not self.negative_flags:
            # A flag-only option from the env is set only by a truthy value.
            if value in _TRUTHY:
                self.handler(state, self.env, None)
            return
        self.handler(state, self.env, value)


def _set_type(field_name: str) -> Callable[[_State, str, str | None], None]:
    def handler(state: _State, name: str, value: str | None) -> None:
        value = _need(name, value)
        cache_type(value)  # llama-server exits on a name it does not know; so do we
        state.set(**{field_name: value})

    return handler


def _set_int(
    field_name: str, *, minimum: int | None = None
) -> Callable[[_State, str, str | None], None]:
    def handler(state: _State, name: str, value: str | None) -> None:
        number = _int(name, _need(name, value))
        if minimum is not None and number < minimum:
            raise ServerArgsError(f"{name}: {number} is below {minimum}")
        state.set(**{field_name: number})

    return handler


def _set_ctx(state: _State, name: str, value: str | None) -> None:
    n = _int(name, _need(name, value))
    if n < 0:
        raise ServerArgsError(f"{name}: {n} is negative")
    state.set(ctx_size=n, ctx_size_explicit_zero=n == 0)


def _set_parallel(state: _State, name: str, value: str | None) -> None:
    n = _int(name, _need(name, value))
    if n == 0:
        raise ServerArgsError(f"{name}: 0 slots is invalid")
    state.set(n_parallel=n)


def _set_unified(state: _State, name: str, value: str | None) -> None:
    state.set(kv_unified=True if value is None else _bool(name, value))


def _set_swa_full(state: _State, name: str, value: str | None) -> None:
    state.set(swa_full=True if value is None else _bool(name, value))


def _set_flash_attn(state: _State, name: str, value: str | None) -> None:
    value = _need(name, value)
    if value in _TRUTHY:
        state.set(flash_attn="on")
    elif value in _FALSEY:
        state.set(flash_attn="off")
    elif value in _AUTO:
        state.set(flash_attn="auto")
    else:
        raise ServerArgsError(f"{name}: {value!r} is not on, off or auto")


_OPTIONS: Final = (
    _Option(("-ctk", "--cache-type-k"), "LLAMA_ARG_CACHE_TYPE_K", _set_type("type_k")),
    _Option(("-ctv", "--cache-type-v"), "LLAMA_ARG_CACHE_TYPE_V", _set_type("type_v")),
    _Option(("-c", "--ctx-size"), "LLAMA_ARG_CTX_SIZE", _set_ctx),
    _Option(("-np", "--parallel"), "LLAMA_ARG_N_PARALLEL", _set_parallel),
    _Option(
        ("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"),
        "LLAMA_ARG_KV_UNIFIED",
        _set_unified,
        takes_value=False,
        negative_flags=("-no-kvu", "--no-kv-unified"),
    ),
    _Option(("--swa-full",), "LLAMA_ARG_SWA_FULL", _set_swa_full, takes_value=False),
    _Option(("-b", "--batch-size"), "LLAMA_ARG_BATCH", _set_int("n_batch", minimum=1)),
    _Option(("-ub", "--ubatch-size"), "LLAMA_ARG_UBATCH", _set_int("n_ubatch", minimum=1)),
    _Option(("-fa", "--flash-attn"), "LLAMA_ARG_FLASH_ATTN", _set_flash_attn),
    _Option(
        ("--kv-unified-per-slot",),
        "LLAMA_ARG_KV_UNIFIED_PER_SLOT",
        _set_int("kv_unified_per_slot", minimum=0),
    ),
)
_BY_FLAG: Final = {flag: option for option in _OPTIONS for flag in option.flags}
_TAKES_VALUE: Final = {flag: option.takes_value for flag, option in _BY_FLAG.items()}
