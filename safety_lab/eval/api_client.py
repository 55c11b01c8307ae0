"""A small client for an OpenAI-compatible chat-completions API, as the LLM judges use it.

The key comes from an environment variable whose *name* is configured, so it never reaches a config, log or output
file. Each request has a timeout. 429/5xx answers, transport faults and answers the caller's parser rejects are
retried by tenacity with full-jitter exponential backoff (concurrent requests do not retry in lockstep), never
sooner than a `Retry-After` header asks. At most `concurrency` requests are in flight, on one HTTP client that is
closed when the batch ends; tokens and cost are counted.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from safety_lab.errors import SafetyLabError

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class JudgeAPIError(SafetyLabError):
    """A judge request that failed for good: after every retry, or with an answer that retrying cannot fix."""


class MalformedAnswer(ValueError):
    """The judge model's answer has no parseable verdict; retried like a transient fault."""


class TransientFault(Exception):
    """A failed attempt worth retrying; `retry_after` is the wait in seconds the server asked for (0: none)."""

    def __init__(self, problem: str, retry_after: float = 0.0):
        super().__init__(problem)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float:
    """A `Retry-After` header in seconds: a number of seconds or an HTTP date; 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class ChatClient:
    """Chat completions with retries, a concurrency limit and token/cost accounting (prices in dollars per million
    tokens). `sampling` is everything besides the message that decides an answer: the judges key their cache on it."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
        max_tokens: int = 512,
        temperature: float = 0.0,
        price_input: float = 0.0,
        price_output: float = 0.0,
    ):
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"need concurrency >= 1 and max_retries >= 0, got {concurrency} and {max_retries}")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not key:
            raise ValueError(
                f"the judge's API key is read from ${api_key_env}, which is not set "
                f"(set it, or api_key_env=null for a server without keys)"
            )
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.sampling = {"model": model, "temperature": temperature, "max_tokens": max_tokens}
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.price_input, self.price_output = price_input, price_output
        self._backoff = wait_random_exponential(multiplier=backoff, max=max_backoff)
        self._lock = threading.Lock()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    def _count(self, **amounts) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self.usage[key] += amount

    def _wait(self, state: RetryCallState) -> float:
        return max(self._backoff(state), state.outcome.exception().retry_after)

    def _before_sleep(self, state: RetryCallState) -> None:
        self._count(retries=1)
        log.warning(
            "judge request failed (%s); retry %d/%d in %.2fs",
            state.outcome.exception(),
            state.attempt_number,
            self.max_retries,
            state.next_action.sleep,
        )

    def _attempt(self, http: httpx.Client, body: dict, parse: Callable[[str], object]):
        self._count(requests=1)
        try:
            reply = http.post(self.url, json=body)
        except httpx.TransportError as e:  # timeouts, refused or dropped connections
            raise TransientFault(type(e).__name__) from e
        if reply.status_code in RETRY_STATUS:
            raise TransientFault(f"HTTP {reply.status_code}", retry_after_seconds(reply.headers.get("retry-after")))
        if reply.status_code != 200:
            raise JudgeAPIError(
                f"judge API {self.url} answered HTTP {reply.status_code} (not retried): {reply.text[:200]!r}"
            )
        try:
            data = reply.json()
            usage = data.get("usage") or {}
            prompt_tokens, completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            self._count(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost_usd=(prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6,
            )
            return parse(data["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # unparseable body or verdict
            raise TransientFault(f"malformed answer ({type(e).__name__}: {e})") from e

    def _complete(self, http: httpx.Client, content: str, parse: Callable[[str], object]):
        """`parse(answer)` of the model's answer to one user message; `JudgeAPIError` once the retries are spent."""
        body = {**self.sampling, "messages": [{"role": "user", "content": content}]}
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(TransientFault),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, http, body, parse)
        except TransientFault as e:
            raise JudgeAPIError(f"judge API {self.url} failed after {self.max_retries + 1} attempts; last: {e}") from e

    def complete_many(self, contents: list[str], parse: Callable[[str], object], done: Callable[[int, object], None]):
        """Ask every message with at most `concurrency` in flight; `done(i, parsed)` as each succeeds. Every
        request is tried even when some fail; then the first failure is raised."""
        failures = []
        with (
            httpx.Client(timeout=self.timeout, headers=self._headers) as http,
            ThreadPoolExecutor(max_workers=self.concurrency) as pool,
        ):
            futures = {pool.submit(self._complete, http, content, parse): i for i, content in enumerate(contents)}
            for future in as_completed(futures):
                try:
                    done(futures[future], future.result())
                except JudgeAPIError as e:
                    failures.append(e)
        if failures:
            raise JudgeAPIError(
                f"{len(failures)} of {len(contents)} judge requests failed (the other verdicts "
                f"are cached): {failures[0]}"
            )

    def summary(self) -> str:
        u = self.usage
        return (
            f"{u['requests']} requests ({u['retries']} retries), {u['prompt_tokens']} prompt + "
            f"{u['completion_tokens']} completion tokens, ${u['cost_usd']:.4f}"
        )
