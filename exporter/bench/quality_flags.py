"""`bench`'s quality flags (`--quality-*`), and every check of them before anything runs.

A mistake in them (a text that cannot be read, a baseline file made from another text, options
the bench sets itself, too few tokens for KL statistics) is a usage error, like a mistake in any
other flag: the owner learns it at once, not after the first context has loaded. What only a
run can tell (out of memory, a crash) is recorded by `exporter.bench.quality` instead.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Final

from exporter.bench.flag_types import positive
from exporter.bench.kld_file import (
    BaselineFileError,
    TextInfo,
    check_reuse,
    is_logits_file,
    scored_tokens,
)
from exporter.bench.perplexity_output import MIN_KLD_TOKENS
from exporter.bench.quality import (
    DEFAULT_CHUNKS,
    DEFAULT_CTX,
    DEFAULT_TIMEOUT_S,
    MIN_QUALITY_CTX,
    BaselineEstimate,
    QualitySettings,
    estimate_baseline,
    model_vocabulary,
)
from exporter.bench.quality_command import BENCH_OPTIONS
from exporter.kv.gguf_meta import ModelFileError
from exporter.llama.argv import option_name


def add_quality_flags(run: argparse.ArgumentParser) -> None:
    quality = run.add_argument_group(
        "quality", "llama-perplexity beside the speed, with the server command's model and options"
    )
    quality.add_argument(
        "--quality-text",
        type=Path,
        metavar="FILE",
        help="measure PPL (and KL divergence with --quality-baseline) over this text",
    )
    quality.add_argument(
        "--quality-baseline",
        type=Path,
        metavar="MODEL.gguf|FILE.kld",
        help="the reference model (highest precision that fits), or an earlier bench's "
        "baseline file (its quality/baseline.kld)",
    )
    quality.add_argument(
        "--quality-baseline-args",
        metavar="ARGS",
        default="",
        help='llama-perplexity options for the baseline only, e.g. "-ngl 0 -t 16"',
    )
    quality.add_argument(
        "--quality-ctx",
        type=positive(int),
        metavar="N",
        help=f"llama-perplexity's context (default {DEFAULT_CTX}, or the baseline file's)",
    )
    quality.add_argument(
        "--quality-chunks",
        type=positive(int),
        metavar="N",
        help=f"chunks of the text to evaluate (default {DEFAULT_CHUNKS}, or the baseline file's)",
    )
    quality.add_argument(
        "--quality-timeout",
        type=positive(float),
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds one llama-perplexity run may take (default {DEFAULT_TIMEOUT_S:g})",
    )


# The quality flags that mean nothing without --quality-text, by their argparse names.
_NEED_TEXT: Final = ("quality_baseline", "quality_ctx", "quality_chunks")


def quality_settings(
    args: argparse.Namespace, out: Path
) -> tuple[QualitySettings | None, BaselineEstimate | None]:
    """The quality step's settings, every input checked before anything runs."""
    if args.quality_text is None:
        given = [name for name in _NEED_TEXT if getattr(args, name) is not None]
        if given or args.quality_baseline_args:
            flag = "--" + (given[0] if given else "quality_baseline_args").replace("_", "-")
            raise ValueError(f"{flag} needs --quality-text")
        return None, None
    if args.server_cmd is None:
        raise ValueError(
            "--quality-text needs --server-cmd: llama-perplexity runs the server command's "
            "model and options"
        )
    try:
        text = TextInfo.of(args.quality_text)
    except OSError as exc:
        raise ValueError(f"--quality-text: {args.quality_text}: {exc.strerror or exc}") from None
    baseline_args = _baseline_args(args.quality_baseline_args)
    reused = None
    model = None
    path: Path | None = args.quality_baseline
    if path is not None and is_logits_file(path):
        try:
            reused = check_reuse(path, text, args.quality_ctx, args.quality_chunks)
        except BaselineFileError as exc:
            raise ValueError(f"--quality-baseline: {exc}") from None
    elif path is not None:
        model = path
    ctx = reused.ctx if reused else args.quality_ctx or DEFAULT_CTX
    chunks = reused.chunks if reused else args.quality_chunks or DEFAULT_CHUNKS
    if ctx < MIN_QUALITY_CTX:
        raise ValueError(f"--quality-ctx: {ctx} is below {MIN_QUALITY_CTX}")
    if path is not None and chunks * scored_tokens(ctx) < MIN_KLD_TOKENS:
        raise ValueError(
            f"--quality-chunks: {chunks} chunks of {ctx} score {chunks * scored_tokens(ctx)} "
            f"tokens; llama-perplexity computes KL divergence statistics from {MIN_KLD_TOKENS}"
        )
    quality = QualitySettings(
        text=text,
        ctx=ctx,
        chunks=chunks,
        out_dir=out / "quality",
        log_dir=out / "logs",
        baseline_model=model,
        reused=reused,
        baseline_args=baseline_args,
        timeout=args.quality_timeout,
    )
    if model is None:
        return quality, None
    try:
        n_vocab = model_vocabulary(model)
    except ModelFileError as exc:
        raise ValueError(f"--quality-baseline: {model}: {exc.reason}") from None
    return quality, estimate_baseline(quality, n_vocab)


def _baseline_args(text: str) -> tuple[str, ...]:
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"--quality-baseline-args: {exc}") from None
    owned = [token for token in argv if option_name(token) in BENCH_OPTIONS]
    if owned:
        raise ValueError(
            f"--quality-baseline-args: {owned[0]} is set by the bench (--quality-* flags)"
        )
    return tuple(argv)
