"""The output canary's request, and what a valid answer to it is.

Each round may end with one fixed request: the same token ids (derived from the vocabulary
size alone), greedy decoding (`top_k` 1 at temperature 0) of a fixed number of tokens, a fixed
seed, no prompt cache, the probe's slot. On the same model file, build and hardware, llama.cpp
answers it with the same tokens every time (docs/quality.md, "The daemon's output canary"),
so a different answer means the server now computes something else. The answer's token ids
give a fingerprint; the probability the model gave each of them (`n_probs`) gives a drift
signal that moves before a token flips.

The answer is read whole, not streamed: llama-server streams no event for a token whose text
ends inside a UTF-8 character, so only the whole answer (`return_tokens`) has every token id.
Everything in it is untrusted: the client bounds its size, and `read_answer` accepts exactly
the ids asked for, each in the vocabulary, and probabilities that are finite and in [0, 1];
anything else is a failure with a reason, never a fingerprint.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Final

from exporter.llama.client import ServerError, Timings
from exporter.probe.results import INVALID_OUTPUT, INVALID_PREDICTED_N, CanaryOutput

PROMPT_TOKENS: Final = 32
GENERATED_TOKENS: Final = 32
# Greedy decoding ignores the seed; it is fixed anyway, so that a server whose greedy path
# draws from the RNG (a future sampler, a bug) still answers the same way each time.
SEED: Final = 1_126_925_111
_PROMPT_DOMAIN: Final = b"llama-speed-exporter canary prompt token "


def prompt(n_vocab: int) -> list[int]:
    """The canary's token ids: a function of the vocabulary size only, the same in every
    exporter process and Python version (a hash, not an RNG whose algorithm may change)."""
    return [
        int.from_bytes(hashlib.sha256(_PROMPT_DOMAIN + str(i).encode()).digest()[:8], "big")
        % n_vocab
        for i in range(PROMPT_TOKENS)
    ]


def request_body(n_vocab: int, slot: int) -> dict[str, Any]:
    return {
        "prompt": prompt(n_vocab),
        "n_predict": GENERATED_TOKENS,
        # Always the full count: a model that would stop early stops at a different point
        # after a change, and a fixed length keeps the answer's size known.
        "ignore_eos": True,
        "temperature": 0,
        "samplers": ["top_k"],
        "top_k": 1,
        "seed": SEED,
        # A reused prefix would change what the server computes (fewer tokens in the batch).
        "cache_prompt": False,
        "id_slot": slot,
        "return_tokens": True,
        # The probabilities before sampling: after `top_k` 1 the chosen token's is always 1.
        "n_probs": 1,
        "post_sampling_probs": False,
        # Not the prompt's text, the generation settings or the content: nothing read.
        "response_fields": ["stop", "tokens", "completion_probabilities", "timings"],
    }


def read_answer(answer: Any, n_vocab: int) -> CanaryOutput:
    """The output in a whole (non-streamed) answer; raises ServerError with INVALID_OUTPUT
    or the predicted_n mismatch reason when it is not the output asked for."""
    if not isinstance(answer, dict):
        raise _invalid("not a JSON object")
    if "timings" not in answer:
        raise _invalid("no timings")
    predicted = Timings.parse(answer["timings"]).predicted_n
    if predicted != GENERATED_TOKENS:
        raise ServerError(
            INVALID_PREDICTED_N,
            f"canary: server reported predicted_n={predicted}, asked for {GENERATED_TOKENS}",
        )
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != GENERATED_TOKENS:
        raise _invalid(f"tokens is not a list of the {GENERATED_TOKENS} generated ids")
    ids = tuple(_token(t, n_vocab) for t in tokens)
    entries = answer.get("completion_probabilities")
    if not isinstance(entries, list) or len(entries) > len(ids):
        raise _invalid("completion_probabilities is not a list of at most one per token")
    return CanaryOutput(ids, _mean_probability(entries, ids, n_vocab))


def _mean_probability(entries: list[Any], ids: tuple[int, ...], n_vocab: int) -> float | None:
    """The mean over the tokens that carry a probability. llama-server leaves out a token
    whose text ends inside a UTF-8 character (a byte token, part of an emoji): the same
    output always leaves out the same ones, so the mean still compares round to round."""
    probabilities: list[float] = []
    position = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise _invalid("a completion_probabilities entry is not an object")
        token = _token(entry.get("id"), n_vocab)
        # The entries are some of the generated tokens, in their order.
        while position < len(ids) and ids[position] != token:
            position += 1
        if position == len(ids):
            raise _invalid("completion_probabilities name a token that was not generated")
        position += 1
        probabilities.append(_probability(entry.get("logprob")))
    return math.fsum(probabilities) / len(probabilities) if probabilities else None


def _token(value: Any, n_vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("a token id is not an integer")
    if not 0 <= value < n_vocab:
        raise _invalid(f"token id {value} outside the vocabulary of {n_vocab}")
    return value


def _probability(logprob: Any) -> float:
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        raise _invalid("a token's logprob is not a number")
    try:
        value = float(logprob)
    except OverflowError:  # an integer past 1e308
        raise _invalid("a token's logprob is out of range") from None
    # NaN fails the comparison; a positive logprob is a probability above 1. The model chose
    # the token, so it cannot have ruled it out (-inf).
    if not (math.isfinite(value) and value <= 0):
        raise _invalid("a token's logprob is not a finite log-probability")
    return math.exp(value)


def _invalid(detail: str) -> ServerError:
    return ServerError(INVALID_OUTPUT, f"canary answer: {detail}")
