"""Quality beside speed: llama-perplexity's PPL and KL divergence of a bench's model.

With `--quality-text`, a launching bench runs llama-perplexity with the server command's model
and options (`exporter.bench.quality_command`) once its first run's server has stopped, so that
the two never share the GPUs, and records the result in every run: llama-perplexity's context
is `--quality-ctx`, not the run's `-c`, so a second measurement would only repeat the first.

With `--quality-baseline MODEL.gguf`, the baseline's distributions over the text are written
once, before the first run (`--kl-divergence-base`), and every quality run compares against
them (`--kl-divergence`): mean KL divergence, its percentiles and how often the most likely
token is the same, besides PPL. An earlier bench's file (`--quality-baseline FILE.kld`) is used
again once its sidecar says it was made from the same text and context (`exporter.bench.kld_file`).

A failure (no llama-perplexity, a wrapper command, out of memory, a crash, a text too short, a
timeout) is recorded with its reason, and the speed results stay as they are.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from exporter.bench.files import create_private, make_private_dir
from exporter.bench.kld_file import (
    BaselineFileError,
    TextInfo,
    file_bytes,
    max_chunks,
    read_header,
    write_sidecar,
)
from exporter.bench.launch import ServerCommand
from exporter.bench.perplexity_output import (
    MissingFigureError,
    PerplexityOutputError,
    PerplexityResult,
    error_lines,
    failure_reason,
    parse_kl_divergence,
    parse_perplexity,
)
from exporter.bench.quality_command import QualityCommand, QualityCommandError, quality_command
from exporter.bench.record import Estimate, QualityBaselineRecord, QualityMode, QualityRecord
from exporter.bench.tool_options import clean_environment
from exporter.bench.tool_process import ToolResult, ToolStartError, run_tool
from exporter.bench.units import size
from exporter.kv.gguf_meta import ModelFileError, read_model_meta
from exporter.llama.redact import redacted, redacted_text

log = structlog.get_logger(__name__)

DEFAULT_CTX: Final = 512  # llama-perplexity's own default, and the community's figures'
# 50 chunks of 512 score 12,750 tokens: same-top to about ±0.3 %, in a minute or two on a GPU,
# and a baseline file of about 3.9 GB for a 150k-token vocabulary.
DEFAULT_CHUNKS: Final = 50
DEFAULT_TIMEOUT_S: Final = 3600.0
# The per-chunk lines of thousands of chunks fit many times over; a runaway tool does not.
MAX_OUTPUT_BYTES: Final = 16 * 1024 * 1024
BASELINE_FILE: Final = "baseline.kld"
# Half of it is context, half is scored: smaller says little about a model.
MIN_QUALITY_CTX: Final = 16
_LOG_LINES_KEPT: Final = 20
# A run whose output was cut (`_ended_early`) is run again; on a busy machine about one in five
# is, so three make a failure rare.
_ATTEMPTS: Final = 3
_TOKENS_KEY: Final = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class QualitySettings:
    text: TextInfo
    ctx: int
    chunks: int
    out_dir: Path  # where a new baseline file is written
    log_dir: Path
    baseline_model: Path | None = None
    reused: QualityBaselineRecord | None = None  # an earlier bench's baseline, checked
    baseline_args: tuple[str, ...] = ()  # llama-perplexity options for the baseline only
    timeout: float = DEFAULT_TIMEOUT_S
    max_output_bytes: int = MAX_OUTPUT_BYTES

    @property
    def logits_path(self) -> Path:
        if self.reused is not None:
            return Path(self.reused.logits_file)
        return self.out_dir / BASELINE_FILE


@dataclass(frozen=True)
class BaselineEstimate:
    """What a new baseline file will take, said before it is written."""

    path: Path
    n_vocab: int
    chunks: int  # at most this many: the text may tokenize to fewer
    bytes: int
    free_bytes: int | None  # on the file system it goes to

    def text(self) -> str:
        free = f"; {size(self.free_bytes)} free there" if self.free_bytes is not None else ""
        return (
            f"the baseline's distributions will take at most {size(self.bytes)} in {self.path} "
            f"({self.n_vocab:,}-token vocabulary × {self.chunks} chunks × scored tokens × about "
            f"2 bytes){free}"
        )


def model_vocabulary(model: Path) -> int:
    """The vocabulary size in a GGUF model's header; raises ModelFileError."""
    tokens = read_model_meta(model).get(_TOKENS_KEY)
    if not isinstance(tokens, tuple) or not tokens:
        raise ModelFileError(model, f"no {_TOKENS_KEY} array in its header")
    return len(tokens)


def estimate_baseline(settings: QualitySettings, n_vocab: int) -> BaselineEstimate:
    chunks = max_chunks(settings.ctx, settings.chunks, settings.text.size)
    free: int | None
    try:
        # Where the file will go: its directory may not exist yet.
        free = shutil.disk_usage(_existing(settings.logits_path.parent)).free
    except OSError:
        free = None
    return BaselineEstimate(
        path=settings.logits_path,
        n_vocab=n_vocab,
        chunks=chunks,
        bytes=file_bytes(n_vocab, settings.ctx, chunks),
        free_bytes=free,
    )


def _baseline_problem(
    settings: QualitySettings, estimate: BaselineEstimate, tool: QualityCommand | str
) -> str | None:
    """Why the baseline cannot be measured, known before llama-perplexity runs."""
    if estimate.free_bytes is not None and estimate.bytes > estimate.free_bytes:
        return "not enough disk: " + estimate.text()
    short = text_too_short(settings.text, settings.ctx)
    if short is not None:
        return short
    return tool if isinstance(tool, str) else None


def _existing(path: Path) -> Path:
    for candidate in (path, *path.absolute().parents):
        if candidate.is_dir():
            return candidate
    return Path.cwd()


def text_too_short(text: TextInfo, ctx: int) -> str | None:
    """Why the text cannot give one chunk, when even one token per byte is not enough."""
    if max_chunks(ctx, 2, text.size) >= 2:
        return None
    return (
        f"{text.name} is {text.size:,} bytes: fewer than the 2 × {ctx} tokens llama-perplexity "
        f"needs at --quality-ctx {ctx}"
    )


class QualityStep:
    """A bench's quality measurements: the baseline first, then one for all runs."""

    def __init__(
        self,
        settings: QualitySettings,
        command: ServerCommand,
        *,
        phase: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._command = command
        self._phase = phase
        self._clock = clock
        self._tool: QualityCommand | str | None = None  # the command, or why there is none
        self._baseline: QualityBaselineRecord | None = settings.reused
        self._measured: QualityRecord | None = None

    def _quality_command(self) -> QualityCommand | str:
        if self._tool is None:
            try:
                self._tool = quality_command(self._command)
            except QualityCommandError as exc:
                self._tool = redacted_text(str(exc))
        return self._tool

    # -- the baseline --------------------------------------------------------------------

    def baseline(self) -> QualityBaselineRecord | None:
        """The baseline's distributions, written now unless an earlier file is used again."""
        settings = self.settings
        if self._baseline is not None or settings.baseline_model is None:
            return self._baseline
        model = settings.baseline_model
        logits = settings.logits_path
        record = QualityBaselineRecord(
            status="failed",
            model=model.name,
            model_bytes=_size_of(model),
            logits_file=str(logits),
            text=settings.text.name,
            text_sha256=settings.text.sha256,
            ctx=settings.ctx,
            chunks=settings.chunks,
        )
        self._baseline = self._measure_baseline(record, model, logits)
        if self._baseline.status != "measured":
            with contextlib.suppress(FileNotFoundError):
                logits.unlink()  # gigabytes, and no sidecar to make them usable
        return self._baseline

    def _measure_baseline(
        self, record: QualityBaselineRecord, model: Path, logits: Path
    ) -> QualityBaselineRecord:
        settings = self.settings
        try:
            n_vocab = model_vocabulary(model)
        except ModelFileError as exc:
            return record.model_copy(update={"reason": f"baseline model: {exc.reason}"})
        estimate = estimate_baseline(settings, n_vocab)
        record = record.model_copy(update={"n_vocab": n_vocab, "estimated_bytes": estimate.bytes})
        tool = self._quality_command()
        problem = _baseline_problem(settings, estimate, tool)
        if problem is not None or isinstance(tool, str):
            return record.model_copy(update={"reason": problem or tool})
        argv = tool.baseline(
            model,
            settings.baseline_args,
            text=settings.text.path,
            ctx=settings.ctx,
            chunks=settings.chunks,
            logits=logits,
        )
        log_path = settings.log_dir / "llama-perplexity-baseline.log"
        record = record.model_copy(
            update={"command": tuple(redacted(tool.shown(argv))), "log_file": str(log_path)}
        )
        self._phase("quality baseline: llama-perplexity --kl-divergence-base")
        make_private_dir(settings.out_dir)
        # Private before the tool writes it: the file is created so, not changed after.
        create_private(logits)
        outcome = self._run(argv, log_path)
        if isinstance(outcome, _NoResult):
            return record.model_copy(update=outcome.update())
        try:
            if outcome.stopped is not None or outcome.returncode != 0:
                raise BaselineFileError("llama-perplexity did not end cleanly")
            # The file, not the printed estimate, is the result: the tool's last log lines
            # are sometimes lost (see _ended_early), and every KL divergence run prints the
            # baseline's PPL over the same tokens again.
            header = read_header(logits)
        except BaselineFileError as exc:
            failed = _failure(outcome, exc)
            return record.model_copy(update={"seconds": outcome.seconds, **failed})
        try:
            ppl: Estimate | None = parse_perplexity(outcome.output).ppl
        except PerplexityOutputError:
            ppl = None
        measured = record.model_copy(
            update={
                "seconds": outcome.seconds,
                "ppl": ppl,
                "status": "measured",
                "n_chunk": header.n_chunk,
                "logits_bytes": logits.stat().st_size,
            }
        )
        write_sidecar(logits, measured)
        log.info(
            "quality_baseline_measured",
            file=str(logits),
            bytes=measured.logits_bytes,
            chunks=header.n_chunk,
        )
        return measured

    # -- a run's model -------------------------------------------------------------------

    def measure(self, run_number: int) -> QualityRecord:
        """The quality of the server command's model and options, measured on the first call."""
        if self._measured is None or self._measured.status == "interrupted":
            self._measured = self._measure(run_number)
        return self._measured

    def _measure(self, run_number: int) -> QualityRecord:
        settings = self.settings
        baseline = self._baseline
        usable = baseline is not None and baseline.status in ("measured", "reused")
        mode: QualityMode = "kl_divergence" if usable else "perplexity"
        record = QualityRecord(
            status="failed",
            mode=mode,
            text=settings.text.name,
            text_sha256=settings.text.sha256,
            ctx=baseline.ctx if baseline is not None and usable else settings.ctx,
            baseline_model=baseline.model if baseline is not None and usable else None,
            baseline_model_bytes=baseline.model_bytes if baseline is not None and usable else None,
            measured_in_run=run_number,
        )
        tool = self._quality_command()
        if isinstance(tool, str):
            return record.model_copy(update={"reason": tool})
        record = record.model_copy(update={"dropped_options": tool.dropped})
        if mode == "kl_divergence":
            argv = tool.kl_divergence(settings.logits_path, record.ctx)
        else:
            short = text_too_short(settings.text, settings.ctx)
            if short is not None:
                return record.model_copy(update={"reason": short})
            argv = tool.perplexity(settings.text.path, settings.ctx, settings.chunks)
        log_path = settings.log_dir / "llama-perplexity.log"
        record = record.model_copy(
            update={"command": tuple(redacted(tool.shown(argv))), "log_file": str(log_path)}
        )
        self._phase("quality: llama-perplexity")
        parse = parse_kl_divergence if mode == "kl_divergence" else parse_perplexity
        result = self._run_parsed(argv, log_path, parse)
        if isinstance(result, dict):
            return record.model_copy(update=result)
        seconds, figures = result
        measured = record.model_copy(
            update={"status": "measured", "seconds": seconds, **_figures(figures)}
        )
        log.info(
            "quality_measured",
            mode=mode,
            ppl=figures.ppl.value,
            kld=figures.kld.value if figures.kld else None,
        )
        return measured

    def _run_parsed(
        self, argv: Sequence[str], log_path: Path, parse: Callable[[str], PerplexityResult]
    ) -> tuple[float, PerplexityResult] | dict[str, object]:
        """The run's seconds and figures, or the record's update saying why there are none.

        A run whose output ended early (`_ended_early`) is run again, up to _ATTEMPTS times.
        """
        outcome = self._run(argv, log_path)
        for attempt in range(2, _ATTEMPTS + 1):
            if isinstance(outcome, _NoResult) or not _cut(outcome, parse):
                break
            log.warning("quality_output_cut", attempt=attempt, log=str(log_path))
            outcome = self._run(argv, log_path)
        if isinstance(outcome, _NoResult):
            return outcome.update()
        try:
            return outcome.seconds, parse(outcome.output)
        except PerplexityOutputError as exc:
            return {"seconds": outcome.seconds, **_failure(outcome, exc)}

    def _run(self, argv: Sequence[str], log_path: Path) -> ToolResult | _NoResult:
        """The tool's result, or why there is none."""
        settings = self.settings
        try:
            return run_tool(
                argv,
                log_path=log_path,
                timeout=settings.timeout,
                max_output_bytes=settings.max_output_bytes,
                env=clean_environment(),
                clock=self._clock,
            )
        except ToolStartError as exc:
            return _NoResult(redacted_text(str(exc)))
        except KeyboardInterrupt:
            # The tool is stopped; the caller ends the bench with what it has.
            return _NoResult("interrupted", interrupted=True)


@dataclass(frozen=True)
class _NoResult:
    reason: str
    interrupted: bool = False

    def update(self) -> dict[str, object]:
        return {"status": "interrupted" if self.interrupted else "failed", "reason": self.reason}


def _cut(outcome: ToolResult, parse: Callable[[str], PerplexityResult]) -> bool:
    try:
        parse(outcome.output)
    except MissingFigureError:
        return _ended_early(outcome)
    except PerplexityOutputError:
        return False  # printed, and would print the same again
    return False


def _ended_early(outcome: ToolResult) -> bool:
    """Whether the tool ended cleanly but its log thread lost its last lines.

    llama.cpp b11434's tools log through a background thread, and on a busy machine a run
    sometimes ends (exit status 0) before that thread has written its last lines, the result
    among them: from one run in seventy to one in five, seen on this project's 2-core machine.
    Run again, such a run prints them.
    """
    return outcome.stopped is None and outcome.returncode == 0 and not error_lines(outcome.output)


def _failure(outcome: ToolResult, error: Exception) -> dict[str, object]:
    """Why a run that ended gave no result: its bound, its own words, or what the bench found
    wrong with its output (too few tokens, a figure that is not a number, a bad file)."""
    if outcome.stopped is not None:
        reason = outcome.stopped
    elif isinstance(error, MissingFigureError):
        # It printed no result: its own error lines say why, or that it said nothing.
        reason = failure_reason(outcome.output, outcome.returncode)
    elif error_lines(outcome.output) or outcome.returncode != 0:
        reason = failure_reason(outcome.output, outcome.returncode)
    else:
        reason = str(error)
    lines = outcome.output.splitlines()[-_LOG_LINES_KEPT:]
    return {
        "status": "failed",
        "reason": redacted_text(reason),
        "log_lines": tuple(redacted_text(line) for line in lines),
    }


def _figures(result: PerplexityResult) -> dict[str, object]:
    return {
        "chunks": result.chunks,
        "ppl": result.ppl,
        "ppl_base": result.ppl_base,
        "ppl_ratio": result.ppl_ratio,
        "ln_ppl_ratio": result.ln_ppl_ratio,
        "kld": result.kld,
        "kld_median": result.kld_median,
        "kld_p99": result.kld_p99,
        "kld_max": result.kld_max,
        "same_top_percent": result.same_top_percent,
    }


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
