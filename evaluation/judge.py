"""The book's LLM judge: another model scores each response from 0 to 100.

Chapter 7 asks Llama 3 (through Ollama) to grade every test response against
the reference. Here the judge is any OpenAI-compatible chat endpoint: a local
Ollama at ``http://localhost:11434/v1``, vLLM, llama.cpp's server, or a hosted
API. A reply that holds no usable score, an HTTP error or a timeout leaves
that response unscored, with the reason kept; it never stops the evaluation.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace

from data import format_input

DEFAULT_URL = "http://localhost:11434/v1"
DEFAULT_MODEL = "llama3"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def judge_prompt(entry: dict, response: str) -> str:
    """The book's grading prompt, word for word."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def chat_url(url: str) -> str:
    """``.../v1/chat/completions`` from a server URL given with or without ``/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def parse_score(reply: str) -> tuple[int | None, str | None]:
    """(score, None) from the first number in the reply, or (None, why) when there is no score in 0..100."""
    match = NUMBER.search(reply)
    if match is None:
        return None, f"no number in the reply {short(reply)!r}"
    value = float(match.group())
    if not 0 <= value <= 100:
        return None, f"{match.group()} is outside 0..100 (reply {short(reply)!r})"
    return round(value), None


def error_text(error: urllib.error.HTTPError) -> str:
    """The start of an HTTP error's body (servers put the real reason there), else its status text."""
    try:
        return short(error.read().decode("utf-8", "replace")) or str(error.reason)
    except (OSError, http.client.HTTPException):
        return str(error.reason)


def short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint that grades responses.

    After ``give_up_after`` requests in a row fail to get any reply (server
    down, HTTP errors, timeouts), the rest are left unscored without asking,
    so a dead server costs a few timeouts, not one per example.
    """

    url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)  # never in a job's settings that visitors see
    timeout: float = 60.0
    give_up_after: int = 5
    visitor: bool = False  # chosen by a visitor of a public server: see ``for_visitors``
    failures_in_a_row: int = field(default=0, init=False)

    def __post_init__(self):
        """A URL that cannot be an address is refused before anything is evaluated, not after every example failed."""
        parts = urllib.parse.urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in self.url.strip()):
            raise ValueError(f"judge URL must be an http(s) address such as {DEFAULT_URL}, got {self.url!r}")
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"judge timeout must be a number of seconds above 0, got {self.timeout}")

    @property
    def endpoint(self) -> str:
        return chat_url(self.url)

    def for_visitors(self) -> "Judge":
        """This judge as a visitor of a server that others can reach may use it: the visitor chose where the
        requests go, so they never carry the server's OPENAI_API_KEY (only the visitor's own ``api_key``), and
        never reach an address inside the server's own network (loopback, private, link-local), which the
        visitor could otherwise probe: refused here by name, then checked again on each connection (a name may
        resolve elsewhere by then), with no redirect followed and no proxy."""
        host = urllib.parse.urlsplit(self.endpoint).hostname
        for address in addresses_of(host):
            if not is_public(address):
                raise ValueError(f"judge URL: {host} is {address}, inside this server's own network; a server that "
                                 "others can reach calls judges on the public internet only")
        return replace(self, visitor=True)

    def describe(self) -> dict:
        """The settings worth saving with the results (never the key)."""
        return {"url": self.endpoint, "model": self.model, "timeout_s": self.timeout}

    def score(self, entry: dict, response: str) -> tuple[int | None, str | None]:
        """(score 0..100, None), or (None, the reason it is unscored)."""
        if self.failures_in_a_row >= self.give_up_after:
            return None, f"not asked: the judge failed {self.failures_in_a_row} times in a row"
        try:
            reply = self.ask(judge_prompt(entry, response))
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} from {self.endpoint}: {error_text(e)}"
        except urllib.error.URLError as e:
            reason = f"cannot reach {self.endpoint}: {e.reason}"
        except TimeoutError:
            reason = f"no reply from {self.endpoint} within {self.timeout:g} s"
        except (OSError, http.client.HTTPException) as e:
            reason = f"{type(e).__name__} from {self.endpoint}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            self.failures_in_a_row = 0
            return None, f"not an OpenAI chat completion: {type(e).__name__}: {short(str(e))}"
        else:
            self.failures_in_a_row = 0
            return parse_score(reply)
        self.failures_in_a_row += 1
        return None, reason

    def ask(self, prompt: str) -> str:
        """The judge's reply text to one user message, at temperature 0."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": False}
        headers = {"Content-Type": "application/json"}
        key = self.api_key or (None if self.visitor else os.environ.get("OPENAI_API_KEY"))
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        open_url = VISITOR_OPENER.open if self.visitor else urllib.request.urlopen
        with open_url(request, timeout=self.timeout) as reply:
            answer = json.loads(reply.read().decode("utf-8"))
        content = answer["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, not text")
        return content


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_global


def public_connection(address, *args, **kwargs) -> socket.socket:
    """``socket.create_connection`` refusing a peer inside this server's network, checked on the connected socket."""
    sock = socket.create_connection(address, *args, **kwargs)
    peer = sock.getpeername()[0]
    if not is_public(peer):
        sock.close()
        raise OSError(f"{address[0]} is {peer}, inside this server's own network")
    return sock


class PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = public_connection


class PublicHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = public_connection


class PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(PublicHTTPConnection, req)


class PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(PublicHTTPSConnection, req, context=self._context)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, which a visitor's judge does not follow",
                                     headers, fp)


VISITOR_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), PublicHTTPHandler, PublicHTTPSHandler, NoRedirects)


def addresses_of(host: str) -> list[str]:
    """The IP addresses ``host`` resolves to; ``ValueError`` when it does not."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except OSError as e:
        raise ValueError(f"judge URL: cannot resolve {host} ({e.strerror or e})") from None


def summarize_scores(scores: list[int | None]) -> dict:
    """Average over the scored responses, and how many were left unscored."""
    scored = [s for s in scores if s is not None]
    return {
        "judge_avg": sum(scored) / len(scored) if scored else None,
        "judge_scored": len(scored),
        "judge_unscored": len(scores) - len(scored),
    }


def judge_help() -> str:
    """How to turn the judge on: the book's setup with Ollama and Llama 3."""
    return (
        "No LLM judge configured, so responses are not scored 0-100. To score them as the book does: "
        "install Ollama (https://ollama.com), run `ollama run llama3` once to download the model, keep "
        f"`ollama serve` running, then pass `--judge {DEFAULT_URL}` (any OpenAI-compatible endpoint works; "
        "`--judge-model` names its model, OPENAI_API_KEY holds a key if it needs one)."
    )
