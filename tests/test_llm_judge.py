"""The LLM judges against a real HTTP server on 127.0.0.1 that answers like an OpenAI-compatible API, from a
script, and injects faults (timeouts, 429, 500, unparseable answers, broken JSON).

The scripted "judge model" reads markers the tests put into responses: `[harm=N]` → "Score: N", `[class=X]` →
"Verdict: X", `[q=N]` → prefers the answer of higher quality and, on a tie, always answer A (a position bias the
pairwise judge must cancel). Every number asserted is counted by hand from the script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from safety_lab.data.records import Probe
from safety_lab.errors import SafetyLabError
from safety_lab.eval.api_client import JudgeAPIError, MalformedAnswer, retry_after_seconds
from safety_lab.eval.judgement_cache import JudgementCache
from safety_lab.eval.judges import build_judge
from safety_lab.eval.llm_judge import last_tag
from safety_lab.eval.metrics import preference_score, suite_metrics

KEY = "sk-test-4f1c9a77-never-written-anywhere"
REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


class ScriptedJudgeAPI:
    """A chat-completions endpoint: `faults` are served one per incoming request (in arrival order) before normal
    answers; responses marked `[fail]` always get HTTP 500."""

    def __init__(self):
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = self.prompt_tokens = 0
        self.delay = 0.0
        self.retry_after = "0"  # the Retry-After header of scripted failures
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), "at": time.monotonic(), **body}
                    )
                    fault = api.faults.pop(0) if api.faults else None
                    api.in_flight += 1
                    api.max_in_flight = max(api.max_in_flight, api.in_flight)
                    self.counted = 1  # per request: a kept-alive connection reuses this handler
                try:
                    time.sleep(api.delay)
                    content = body["messages"][0]["content"]
                    if fault == "timeout":
                        time.sleep(3.0)  # the client gives up after 1.5 s
                    if (fault or "").isdigit() or "[fail]" in content:
                        return self.reply(int(fault or 500), {"error": "scripted"}, {"Retry-After": api.retry_after})
                    if fault == "badjson":
                        return self.reply(200, None)
                    answer = "I would rather not say." if fault == "malformed" else api.answer(content)
                    with api.lock:
                        api.prompt_tokens += len(content.split())
                    self.reply(
                        200,
                        {
                            "choices": [{"message": {"role": "assistant", "content": answer}}],
                            "usage": {"prompt_tokens": len(content.split()), "completion_tokens": 3},
                        },
                    )
                finally:
                    self.leave()

            def leave(self):
                """No longer in flight: called before the reply goes out, since the client may send its next
                request as soon as it has read this one."""
                with api.lock:
                    api.in_flight -= self.counted
                    self.counted = 0

            def reply(self, status: int, payload, headers=None):
                self.leave()
                data = b"{not json" if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(content: str) -> str:
        if m := re.search(r"\[harm=(\d)\]", content):
            return f"The answer goes along with the request.\nScore: {m.group(1)}"
        if m := re.search(r"\[class=(\w+)\]", content):
            return f"Reasoning: obvious.\nVerdict: {m.group(1)}"
        if qualities := re.findall(r"\[q=(\d)\]", content):
            a, b = map(int, qualities)
            return f"Comparison done.\nBetter: {'B' if b > a else 'A'}"  # ties go to A: position bias
        return "Nothing harmful here.\nScore: 1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server = ScriptedJudgeAPI()
    yield server
    server.close()


def llm(api, name="llm", **kwargs):
    args = dict(
        base_url=api.url,
        model="judge-model",
        api_key_env="JUDGE_TEST_KEY",
        timeout=1.5,
        max_retries=6,
        backoff=0.01,
        concurrency=3,
    )
    return build_judge(name, **{**args, **kwargs})


HARM = [1, 5, 3, 5, 2, 4]


def harmful(scores=HARM):
    return [Probe(f"harmful request {i}", True) for i in range(len(scores))], [
        f"answer {i} [harm={s}]" for i, s in enumerate(scores)
    ]


def test_harmfulness_judge_loses_nothing_to_faults_and_reruns_from_the_cache(api, tmp_path):
    probes, responses = harmful()
    api.faults = ["timeout", "429", "500", "malformed", "badjson"]
    judge = llm(api, cache=str(tmp_path / "cache.sqlite"), price_input=2.0, price_output=10.0)
    judgements = judge.judge(probes, responses)
    assert [j.score for j in judgements] == HARM
    assert [j.refused for j in judgements] == [s == 1 for s in HARM]
    assert [j.complied for j in judgements] == [s == 5 for s in HARM]
    assert len(api.requests) == 6 + 5  # every fault cost exactly one retry
    assert {r["path"] for r in api.requests} == {"/v1/chat/completions"}
    assert all(
        r["auth"] == f"Bearer {KEY}" and r["temperature"] == 0.0 and r["model"] == "judge-model" for r in api.requests
    )
    usage = judge.client.usage
    assert usage["requests"] == 11 and usage["retries"] == 5
    assert usage["completion_tokens"] == 3 * 7  # the 6 good answers and the malformed one carry a usage field
    assert usage["prompt_tokens"] == api.prompt_tokens > 0
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 2.0 + 21 * 10.0) / 1e6)

    m = suite_metrics("harmful", probes, judgements)
    assert m["harmful/harmfulness_score"] == pytest.approx(sum(HARM) / 6)  # 20 / 6
    assert m["harmful/harmfulness_rate"] == pytest.approx(2 / 6)
    assert m["harmful/compliance_rate"] == pytest.approx(2 / 6) and m["harmful/refusal_rate"] == pytest.approx(1 / 6)

    rerun = llm(api, cache=str(tmp_path / "cache.sqlite"))
    assert rerun.judge(probes, responses) == judgements
    assert len(api.requests) == 11 and rerun.client.usage["requests"] == 0  # zero new requests


def test_exhausted_retries_raise_a_clear_error_and_keep_the_other_verdicts(api, tmp_path):
    probes, responses = harmful([1, 5, 3, 2])
    responses[2] += " [fail]"  # this one always gets HTTP 500
    judge = llm(api, cache=str(tmp_path / "c.sqlite"), max_retries=2)
    with pytest.raises(JudgeAPIError, match=r"1 of 4 judge requests failed.*failed after 3 attempts; last: HTTP 500"):
        judge.judge(probes, responses)
    assert len(api.requests) == 3 + 3
    responses[2] = responses[2].replace(" [fail]", "")  # the API recovers: only the lost verdict is asked for
    again = llm(api, cache=str(tmp_path / "c.sqlite"))
    probes[2] = Probe(probes[2].prompt, True)
    assert [j.score for j in again.judge(probes, responses)] == [1, 5, 3, 2]
    assert len(api.requests) == 7


def test_unparseable_answers_are_retried_then_reported(api):
    api.faults = ["malformed"] * 3
    with pytest.raises(JudgeAPIError, match="after 3 attempts; last: malformed answer .*Score: <1|2|3|4|5>"):
        llm(api, max_retries=2).judge(*harmful([4]))


def test_a_429_waits_at_least_what_retry_after_asks(api):
    api.faults, api.retry_after = ["429"], "1"
    assert llm(api, backoff=0.01).judge(*harmful([4]))[0].score == 4
    first, second = api.requests
    assert second["at"] - first["at"] >= 1.0  # the backoff alone would have waited at most 0.01 s


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds(None) == 0.0
    assert retry_after_seconds("soon") == 0.0 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 3590 < retry_after_seconds(formatdate(time.time() + 3600, usegmt=True)) <= 3600


def test_changing_any_sampling_parameter_misses_the_cache(api, tmp_path):
    cache = str(tmp_path / "c.sqlite")
    probes, responses = harmful([3])
    for settings, asked in [
        ({}, 1),
        ({}, 1),
        ({"temperature": 0.7}, 2),
        ({"max_tokens": 64}, 3),
        ({"model": "another-judge"}, 4),
        ({"temperature": 0.0, "max_tokens": 512}, 4),
    ]:
        assert llm(api, cache=cache, **settings).judge(probes, responses)[0].score == 3
        assert len(api.requests) == asked, settings
    assert [(r["model"], r["temperature"], r["max_tokens"]) for r in api.requests] == [
        ("judge-model", 0.0, 512),
        ("judge-model", 0.7, 512),
        ("judge-model", 0.0, 64),
        ("another-judge", 0.0, 512),
    ]


def test_the_http_client_is_closed_after_use(api, monkeypatch):
    clients = []

    class Recorded(httpx.Client):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    monkeypatch.setattr(httpx, "Client", Recorded)
    judge = llm(api)
    judge.judge(*harmful([1, 2, 3]))
    api.faults = ["404"]
    with pytest.raises(JudgeAPIError):
        judge.judge(*harmful([4]))
    assert len(clients) == 2 and all(client.is_closed for client in clients)


def test_errors_that_retrying_cannot_fix_fail_at_once(api, monkeypatch):
    api.faults = ["404"]  # not in the retry set
    with pytest.raises(JudgeAPIError, match="HTTP 404 .not retried"):
        llm(api).judge(*harmful([2]))
    assert len(api.requests) == 1
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ValueError, match=r"\$JUDGE_TEST_KEY, which is not set"):
        llm(api)


def test_concurrency_limit_holds(api):
    api.delay = 0.1
    probes, responses = harmful([1, 2, 3, 4, 5, 1, 2, 3, 4])
    assert [j.score for j in llm(api, concurrency=3).judge(probes, responses)] == [1, 2, 3, 4, 5, 1, 2, 3, 4]
    assert 1 < api.max_in_flight <= 3


def test_over_refusal_judge_three_classes(api):
    classes = ["comply", "refuse", "partial", "comply", "refuse"]
    probes = [Probe(f"how do I kill a python process {i}", False) for i in range(5)]
    judgements = llm(api, "over_refusal").judge(probes, [f"resp [class={c}]" for c in classes])
    assert [j.label for j in judgements] == [
        "full_compliance",
        "full_refusal",
        "partial_refusal",
        "full_compliance",
        "full_refusal",
    ]
    m = suite_metrics("xstest", probes, judgements, build_judge.__globals__["JUDGES"]["over_refusal"].labels)
    assert m["xstest/refusal_rate"] == pytest.approx(3 / 5)  # full + partial refusals
    assert m["xstest/accuracy"] == pytest.approx(2 / 5)
    assert (
        m["xstest/full_compliance_rate"],
        m["xstest/full_refusal_rate"],
        m["xstest/partial_refusal_rate"],
    ) == pytest.approx((2 / 5, 2 / 5, 1 / 5))


def test_pairwise_judge_swaps_positions_to_cancel_position_bias(api, tmp_path):
    prompts = [f"question {i}" for i in range(5)]
    refs = tmp_path / "generations.jsonl"
    rows = [{"model": "base", "prompt": p, "response": f"ref [q={q}]"} for p, q in zip(prompts, [2, 2, 3, 1, 2])]
    rows += [{"model": "sft", "prompt": p, "response": "ignored [q=9]"} for p in prompts]
    refs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = llm(api, "pairwise", references=str(refs), reference_model="base", cache=str(tmp_path / "c.sqlite"))
    probes = [Probe(p, False) for p in prompts]
    candidate = [f"cand [q={q}]" for q in [3, 2, 1, 2, 2]]
    judgements = judge.judge(probes, candidate)
    # q 3>2 win; 2=2 tie (the server says A both times: +1 -1); 1<3 loss; 2>1 win; 2=2 tie
    assert [j.label for j in judgements] == ["win", "tie", "loss", "win", "tie"]
    assert len(api.requests) == 10  # both orders for each prompt
    first, swapped = [r["messages"][0]["content"] for r in api.requests if "question 0" in r["messages"][0]["content"]]
    assert {first.index("cand") < first.index("ref"), swapped.index("cand") < swapped.index("ref")} == {True, False}
    m = suite_metrics("chat", probes, judgements, judge.labels)
    assert m["chat/preference_score"] == pytest.approx(preference_score(2, 1, 2)) == pytest.approx(20.0)
    assert "chat/refusal_rate" not in m and m["chat/win_rate"] == pytest.approx(0.4)
    with pytest.raises(SafetyLabError, match="no reference response for 'unknown'"):
        judge.judge([Probe("unknown", False)], ["x"])


def test_a_user_rubric_template_replaces_ours(api, tmp_path):
    rubric = tmp_path / "mine.txt"
    rubric.write_text("Judge this.\nQ: $prompt\nA: $response\nReply 'Score: n'.")
    judge = llm(api, rubric=str(rubric))
    assert judge.judge(*harmful([4]))[0].score == 4
    assert (
        api.requests[0]["messages"][0]["content"] == "Judge this.\nQ: harmful request 0\nA: answer 0 [harm=4]\n"
        "Reply 'Score: n'."
    )
    rubric.write_text("only $prompt and $answer")
    with pytest.raises(SafetyLabError, match=r"needs \$\{'answer'\}"):
        llm(api, rubric=str(rubric)).judge(*harmful([4]))
    with pytest.raises(ValueError, match="does not exist"):
        llm(api, rubric=str(tmp_path / "missing.txt"))


def test_the_cache_key_covers_judge_prompt_and_response(tmp_path):
    cache = JudgementCache(tmp_path / "c.sqlite")
    keys = [
        JudgementCache.key("llm", "m", "h", "p", "r"),
        JudgementCache.key("llm", "m", "h", "p", "r2"),
        JudgementCache.key("llm", "m", "h", "p2", "r"),
        JudgementCache.key("over_refusal", "m", "h", "p", "r"),
    ]
    assert len(set(keys)) == 4
    cache.put(keys[0], {"refused": True, "complied": False, "score": 1, "label": None})
    assert cache.get(keys) == {keys[0]: {"refused": True, "complied": False, "score": 1, "label": None}}


@pytest.mark.parametrize(
    "text, value", [("Score: 4", "4"), ("score:2\nScore: 5", "5"), ("**Score:** 3", "3"), ("Verdict: REFUSE", "refuse")]
)
def test_last_tag(text, value):
    tag = "verdict" if "erdict" in text else "score"
    assert last_tag(text, tag, tuple("12345") + ("refuse",)) == value


def test_last_tag_rejects_missing_or_out_of_range():
    with pytest.raises(MalformedAnswer):
        last_tag("Score: 7", "score", tuple("12345"))
    with pytest.raises(MalformedAnswer):
        last_tag("no verdict here", "score", tuple("12345"))


def test_api_key_reaches_no_file_of_the_run_folder(api, tmp_path, tiny_hf_model):
    """Whole CLI runs judged by the LLM judge: the key is sent to the API and written nowhere; the second run is
    judged entirely from the cache in the store."""
    store = tmp_path / "store"
    env = {**os.environ, "JUDGE_TEST_KEY": KEY, "SAFETY_LAB_STORE": str(store)}

    def run(run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "safety_lab",
                "model=hf",
                f"model.path={tiny_hf_model}",
                "method=none",
                "eval=advbench",
                f"eval.suites.advbench.path={FIXTURES / 'advbench.csv'}",
                "eval.max_new_tokens=4",
                "eval.judge=llm",
                f"+eval.judge_args.base_url={api.url}",
                "+eval.judge_args.model=judge-model",
                "+eval.judge_args.api_key_env=JUDGE_TEST_KEY",
                f"+eval.judge_args.cache={store}/judgements.sqlite",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = run(tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["base.advbench/n"] == 5 and len(api.requests) == 5  # method=none: the base model's column
    assert metrics["base.advbench/harmfulness_score"] == 1.0 and metrics["base.advbench/harmfulness_rate"] == 0.0
    assert all(r["auth"] == f"Bearer {KEY}" for r in api.requests)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.json", "generations.jsonl"} <= {p.name for p in files}
    assert not [p for p in files if KEY.encode() in p.read_bytes()]
    assert KEY not in first.stdout + first.stderr
    assert not [p for p in store.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]

    second = run(tmp_path / "run2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(api.requests) == 5  # all from the cache
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text()) == metrics
