"""The testbed's fake service, exercised over real loopback HTTP (no privileges needed)."""

import http.client
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed import workload
from nodeagent.testbed.workload import (
    DEFAULT_PROPAGATE_HEADERS,
    MAX_DELAY,
    FakeServiceConfig,
    build_server,
    delay_seconds,
    main,
    parse_fib_trie,
    status_choice,
)
from tests.tls_certs import write_app_pki
from tests.waiting import wait_for

TIMEOUT = 5.0
# The tests' own client must not be sent through a proxy from the environment either.
CLIENT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

StartService = Callable[..., str]


def fetch(
    url: str, headers: Mapping[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, Any]]:
    """The status and JSON answer of one request, whatever the status."""
    req = urllib.request.Request(url, headers=dict(headers or {}), method=method)
    try:
        with CLIENT.open(req, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _serve_in_thread(server: ThreadingHTTPServer) -> Callable[[], None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)

    return stop


@pytest.fixture
def start_service() -> Iterator[StartService]:
    """Start fake services on 127.0.0.1 (any free port); all are stopped after the test."""
    stops: list[Callable[[], None]] = []

    def start(**env: str) -> str:
        config = FakeServiceConfig.from_env({"LISTEN_ADDR": "127.0.0.1:0", **env})
        server = build_server(config)
        stops.append(_serve_in_thread(server))
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for stop in reversed(stops):
            stop()


class _CannedHandler(BaseHTTPRequestHandler):
    """An upstream that is not a fake service: a fixed status and body, e.g. Envoy's 503."""

    status = 503
    body = b"no healthy upstream"

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def start_canned() -> Iterator[Callable[[int, bytes], str]]:
    stops: list[Callable[[], None]] = []

    def start(status: int, body: bytes) -> str:
        handler = type("Canned", (_CannedHandler,), {"status": status, "body": body})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        stops.append(_serve_in_thread(server))
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for stop in reversed(stops):
            stop()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback URL that refuses connections: the port is bound (so nobody else takes it)
    but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- the answer ---------------------------------------------------------------------------------


def test_answer_names_the_service_and_echoes_the_request(start_service: StartService) -> None:
    url = start_service(NAME="web", VERSION="v2", MESSAGE="hi", POD_IP="10.1.2.3")

    code, answer = fetch(f"{url}/some/path?x=1", headers={"X-Custom": "Yes"})

    assert code == 200
    assert answer["name"] == "web"
    assert answer["version"] == "v2"
    assert answer["body"] == "hi"
    assert answer["uri"] == "/some/path?x=1"
    assert answer["method"] == "GET"
    assert answer["type"] == "HTTP"
    assert answer["code"] == 200
    assert answer["headers"]["x-custom"] == "Yes"
    assert answer["pod_ip"] == "10.1.2.3"
    assert isinstance(answer["ip_addresses"], list)
    assert "127.0.0.1" not in answer["ip_addresses"]
    assert answer["upstream_calls"] == {}
    assert answer["duration"].endswith("ms")
    assert answer["start_time"] <= answer["end_time"]
    assert answer["start_time"].endswith("+00:00")


def test_pod_ip_defaults_to_the_first_namespace_address(start_service: StartService) -> None:
    _, answer = fetch(start_service())

    assert answer["pod_ip"] == (answer["ip_addresses"] or [""])[0]
    assert answer["body"] == "Hello from fake-service"


def test_request_count_rises_with_every_request(start_service: StartService) -> None:
    url = start_service()

    counts = [fetch(url)[1]["request_count"] for _ in range(3)]

    assert counts == [1, 2, 3]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_answered_too(start_service: StartService, method: str) -> None:
    code, answer = fetch(start_service(), method=method)

    assert code == 200
    assert answer["method"] == method


def test_request_bodies_are_discarded_on_a_kept_alive_connection(
    start_service: StartService,
) -> None:
    url = start_service()
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=TIMEOUT)
    try:
        conn.request("POST", "/fixed", body=b"x" * 100_000)
        first = conn.getresponse()
        assert first.status == 200
        assert json.loads(first.read())["uri"] == "/fixed"

        conn.request("PUT", "/chunked", body=iter([b"abc", b"defgh"]), encode_chunked=True)
        second = conn.getresponse()
        assert second.status == 200
        assert json.loads(second.read())["uri"] == "/chunked"

        conn.request("HEAD", "/head")
        head = conn.getresponse()
        assert head.status == 200
        assert int(head.getheader("Content-Length", "0")) > 0
        assert head.read() == b""
    finally:
        conn.close()


def test_a_client_that_hangs_up_does_not_hurt_the_service(
    start_service: StartService, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start_service(DELAY="0.1")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")

    stderr: list[str] = []

    def answered() -> bool:
        # The service logs its answer just before writing it into the void.
        stderr.append(capsys.readouterr().err)
        return "GET /gone 200" in "".join(stderr)

    wait_for(answered, TIMEOUT, "the service to answer the client that hung up")
    code, answer = fetch(url)

    assert code == 200
    assert answer["request_count"] == 2


# --- upstream calls -----------------------------------------------------------------------------


def test_a_chain_of_three_services_nests_every_answer(start_service: StartService) -> None:
    c = start_service(NAME="c")
    b = start_service(NAME="b", UPSTREAM_URIS=f"{c}/from-b")
    a = start_service(NAME="a", UPSTREAM_URIS=b)

    code, answer = fetch(a)

    assert code == 200
    assert answer["name"] == "a"
    b_answer = answer["upstream_calls"][b]
    assert b_answer["name"] == "b"
    assert b_answer["code"] == 200
    c_answer = b_answer["upstream_calls"][f"{c}/from-b"]
    assert c_answer["name"] == "c"
    assert c_answer["uri"] == "/from-b"
    assert c_answer["upstream_calls"] == {}


def test_upstreams_are_called_in_order(start_service: StartService) -> None:
    first = start_service(NAME="first")
    second = start_service(NAME="second")
    front = start_service(UPSTREAM_URIS=f" {first} ,{second},")

    code, answer = fetch(front)

    assert code == 200
    assert list(answer["upstream_calls"]) == [first, second]
    assert (
        answer["upstream_calls"][first]["end_time"]
        <= answer["upstream_calls"][second]["start_time"]
    )


def test_listed_headers_propagate_down_the_chain_and_others_do_not(
    start_service: StartService,
) -> None:
    c = start_service(NAME="c")
    b = start_service(NAME="b", UPSTREAM_URIS=c)
    a = start_service(NAME="a", UPSTREAM_URIS=b)

    _, answer = fetch(a, headers={"User": "Tom", "X-Request-Id": "req-1", "X-Secret": "no"})

    assert answer["headers"]["x-secret"] == "no"
    c_headers = answer["upstream_calls"][b]["upstream_calls"][c]["headers"]
    assert c_headers["user"] == "Tom"
    assert c_headers["x-request-id"] == "req-1"
    assert "x-secret" not in c_headers


def test_propagated_headers_are_configurable(start_service: StartService) -> None:
    b = start_service(NAME="b")
    a = start_service(NAME="a", UPSTREAM_URIS=b, PROPAGATE_HEADERS="X-Tenant")

    _, answer = fetch(a, headers={"x-tenant": "blue", "user": "Tom"})

    b_headers = answer["upstream_calls"][b]["headers"]
    assert b_headers["x-tenant"] == "blue"
    assert "user" not in b_headers


def test_upstream_calls_ignore_proxies_in_the_environment(
    start_service: StartService, refused_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, refused_url)
    b = start_service(NAME="b")
    a = start_service(NAME="a", UPSTREAM_URIS=b)

    code, answer = fetch(a)

    assert code == 200
    assert answer["upstream_calls"][b]["name"] == "b"


def test_an_unreachable_upstream_fails_the_request(
    start_service: StartService, refused_url: str
) -> None:
    url = start_service(UPSTREAM_URIS=refused_url, UPSTREAM_TIMEOUT="2")

    code, answer = fetch(url)

    assert code == 500
    assert answer["code"] == 500
    failure = answer["upstream_calls"][refused_url]
    assert failure["uri"] == refused_url
    assert failure["code"] == -1
    assert "refused" in failure["error"].lower()


def test_a_slow_upstream_times_out(start_service: StartService) -> None:
    slow = start_service(NAME="slow", DELAY="1")
    url = start_service(UPSTREAM_URIS=slow, UPSTREAM_TIMEOUT="0.2")

    started = time.monotonic()
    code, answer = fetch(url)

    assert time.monotonic() - started < 0.9
    assert code == 500
    assert answer["upstream_calls"][slow]["code"] == -1
    assert "timed out" in answer["upstream_calls"][slow]["error"]


def test_a_failing_fake_service_upstream_is_embedded_with_its_code(
    start_service: StartService,
) -> None:
    broken = start_service(NAME="broken", ERROR_RATE="1", ERROR_CODE="503")
    url = start_service(UPSTREAM_URIS=broken)

    code, answer = fetch(url)

    assert code == 500
    embedded = answer["upstream_calls"][broken]
    assert embedded["name"] == "broken"
    assert embedded["code"] == 503


def test_a_non_json_error_answer_is_recorded(
    start_service: StartService, start_canned: Callable[[int, bytes], str]
) -> None:
    envoy = start_canned(503, b"no healthy upstream")
    url = start_service(UPSTREAM_URIS=envoy)

    code, answer = fetch(url)

    assert code == 500
    failure = answer["upstream_calls"][envoy]
    assert failure["code"] == 503
    assert "no healthy upstream" in failure["error"]


def test_a_non_json_success_answer_is_a_failure(
    start_service: StartService, start_canned: Callable[[int, bytes], str]
) -> None:
    html = start_canned(200, b"<html>hello</html>")
    url = start_service(UPSTREAM_URIS=html)

    code, answer = fetch(url)

    assert code == 500
    assert answer["upstream_calls"][html]["code"] == 200
    assert "not JSON" in answer["upstream_calls"][html]["error"]


# --- fault injection ----------------------------------------------------------------------------


def test_error_rate_one_always_answers_the_error_code(start_service: StartService) -> None:
    url = start_service(ERROR_RATE="1", ERROR_CODE="503")

    answers = [fetch(url) for _ in range(5)]

    assert {code for code, _ in answers} == {503}
    assert {answer["code"] for _, answer in answers} == {503}
    assert answers[-1][1]["name"] == "fake-service"


def test_error_rate_zero_never_fails(start_service: StartService) -> None:
    url = start_service(ERROR_RATE="0", ERROR_CODE="503")

    assert {fetch(url)[0] for _ in range(20)} == {200}


def test_delay_holds_the_answer_back(start_service: StartService) -> None:
    url = start_service(DELAY="0.2")

    started = time.monotonic()
    code, _ = fetch(url)

    assert code == 200
    assert time.monotonic() - started >= 0.2


# --- health -------------------------------------------------------------------------------------


def test_health_neither_calls_upstreams_nor_counts(
    start_service: StartService, refused_url: str
) -> None:
    url = start_service(UPSTREAM_URIS=refused_url)

    assert fetch(f"{url}/health") == (200, {"status": "ok"})
    code, answer = fetch(f"{url}/")

    assert code == 500  # the upstream is still unreachable for ordinary requests
    assert answer["request_count"] == 1


# --- httpbin's endpoints and the request counter ------------------------------------------------


def test_status_answers_that_status_and_names_the_version(start_service: StartService) -> None:
    url = start_service(NAME="httpbin", VERSION="v2")

    code, answer = fetch(f"{url}/status/503")

    assert code == 503
    assert (answer["name"], answer["version"], answer["code"]) == ("httpbin", "v2", 503)
    assert answer["uri"] == "/status/503"


def test_status_list_with_zero_weights_always_picks_the_weighted_code(
    start_service: StartService,
) -> None:
    url = start_service()

    assert {fetch(f"{url}/status/200:0,418:1,500:0")[0] for _ in range(10)} == {418}


def test_status_list_picks_codes_in_proportion_to_their_weights() -> None:
    rng = random.Random(15)

    draws = [status_choice("200:3, 503:1", rng) for _ in range(4000)]

    assert set(draws) == {200, 503}
    assert 0.72 <= draws.count(200) / len(draws) <= 0.78
    unweighted = [status_choice("200,503", rng) for _ in range(4000)]
    assert 0.47 <= unweighted.count(503) / len(unweighted) <= 0.53


def test_status_204_has_no_body(start_service: StartService) -> None:
    port = int(start_service().rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/status/204")
        response = conn.getresponse()
        assert response.status == 204
        assert response.read() == b""
        conn.request("GET", "/health")  # the connection is still usable
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/status/abc", "invalid status code 'abc'"),
        ("/status/600", "status code 600 is outside 200-599"),
        ("/status/100", "status code 100 is outside 200-599"),
        ("/status/200:x,500", "invalid status code '200:x'"),
        ("/status/200:0,500:0", "add up to 0"),
        ("/delay/soon", "invalid delay 'soon'"),
        ("/delay/-1", "invalid delay '-1'"),
    ],
)
def test_bad_httpbin_paths_answer_400_saying_why(
    start_service: StartService, path: str, problem: str
) -> None:
    code, answer = fetch(f"{start_service()}{path}")

    assert code == 400
    assert answer["error"].startswith(f"{path}: ")
    assert problem in answer["error"]


def test_delay_waits_that_long_and_says_so(start_service: StartService) -> None:
    url = start_service(VERSION="v3")

    started = time.monotonic()
    code, answer = fetch(f"{url}/delay/0.3")

    assert time.monotonic() - started >= 0.3
    assert code == 200
    assert (answer["version"], answer["delay"]) == ("v3", 0.3)


def test_delay_is_capped_at_ten_seconds_as_in_httpbin() -> None:
    assert MAX_DELAY == 10.0
    assert delay_seconds("25") == 10.0
    assert delay_seconds("1.5") == 1.5
    assert delay_seconds("0") == 0.0


def test_headers_echoes_the_request_headers_as_received(start_service: StartService) -> None:
    port = int(start_service().rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", "/headers", skip_accept_encoding=True)
        conn.putheader("x-MiXed", "Yes")
        conn.putheader("end-user", "jason")
        conn.putheader("X-Twice", "1")
        conn.putheader("X-Twice", "2")
        conn.endheaders()
        response = conn.getresponse()
        code, answer = response.status, json.loads(response.read())
    finally:
        conn.close()

    assert code == 200
    assert answer == {
        "headers": {
            "Host": f"127.0.0.1:{port}",
            "x-MiXed": "Yes",
            "end-user": "jason",
            "X-Twice": "1, 2",
        }
    }


def test_httpbin_endpoints_ignore_the_configured_faults_and_upstreams(
    start_service: StartService, refused_url: str
) -> None:
    url = start_service(ERROR_RATE="1", ERROR_CODE="503", UPSTREAM_URIS=refused_url)

    assert fetch(f"{url}/status/200")[0] == 200
    assert fetch(f"{url}/headers")[0] == 200
    code, answer = fetch(f"{url}/delay/0")
    assert code == 200
    assert answer["upstream_calls"] == {}
    assert fetch(url)[0] == 503  # the ordinary answer still fails as configured


def test_requests_counts_what_was_served_per_path_but_not_itself_or_health(
    start_service: StartService,
) -> None:
    url = start_service()
    assert fetch(f"{url}/requests") == (200, {"count": 0, "by_path": {}})

    for path in ("/", "/a?x=1", "/a", "/status/503", "/health", "/requests", "/headers"):
        fetch(f"{url}{path}")
    fetch(f"{url}/a", method="POST")

    code, counts = fetch(f"{url}/requests")
    assert code == 200
    assert counts == {
        "count": 6,
        "by_path": {"/": 1, "/a": 3, "/status/503": 1, "/headers": 1},
    }
    assert fetch(url)[1]["request_count"] == 7


def test_requests_keeps_a_bounded_number_of_paths_apart(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workload, "MAX_COUNTED_PATHS", 2)
    url = start_service()

    for path in ("/one", "/two", "/three", "/four", "/one"):
        fetch(f"{url}{path}")

    assert fetch(f"{url}/requests")[1] == {
        "count": 5,
        "by_path": {"/one": 2, "/two": 1, "<other>": 2},
    }


# --- configuration ------------------------------------------------------------------------------


def test_defaults() -> None:
    config = FakeServiceConfig.from_env({})

    assert config == FakeServiceConfig()
    assert config.name == "fake-service"
    assert config.version == "v1"
    assert config.message == "Hello from fake-service"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert config.upstream_uris == ()
    assert config.upstream_timeout == 5.0
    assert config.propagate_headers == DEFAULT_PROPAGATE_HEADERS
    assert {"user", "end-user", "x-request-id", "traceparent"} <= set(config.propagate_headers)
    assert (config.error_rate, config.error_code, config.delay) == (0.0, 500, 0.0)


def test_parsed_values() -> None:
    config = FakeServiceConfig.from_env(
        {
            "NAME": "reviews",
            "LISTEN_ADDR": "[::]:9090",
            "UPSTREAM_URIS": "http://ratings:9080,https://other:9443/path",
            "UPSTREAM_TIMEOUT": "1.5",
            "PROPAGATE_HEADERS": "User, X-Tenant,user",
            "ERROR_RATE": "0.25",
            "ERROR_CODE": "503",
            "DELAY": "0.5",
        }
    )

    assert config.message == "Hello from reviews"
    assert (config.listen_host, config.listen_port) == ("::", 9090)
    assert config.upstream_uris == ("http://ratings:9080", "https://other:9443/path")
    assert config.upstream_timeout == 1.5
    assert config.propagate_headers == ("user", "x-tenant")
    assert (config.error_rate, config.error_code, config.delay) == (0.25, 503, 0.5)
    assert FakeServiceConfig.from_env({"LISTEN_ADDR": ":8081"}).listen_host == "0.0.0.0"
    assert FakeServiceConfig.from_env({"PROPAGATE_HEADERS": ""}).propagate_headers == ()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ERROR_RATE", "abc"),
        ("ERROR_RATE", "1.5"),
        ("ERROR_RATE", "-0.1"),
        ("ERROR_RATE", "nan"),
        ("ERROR_CODE", "5xx"),
        ("ERROR_CODE", "600"),
        ("DELAY", "-1"),
        ("DELAY", "soon"),
        ("UPSTREAM_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "inf"),
        ("LISTEN_ADDR", "8080"),
        ("LISTEN_ADDR", "0.0.0.0:http"),
        ("LISTEN_ADDR", "0.0.0.0:70000"),
        ("LISTEN_ADDR", "::1:8080"),
        ("UPSTREAM_URIS", "recommendation:8080"),
        ("UPSTREAM_URIS", "ftp://files:21"),
        ("UPSTREAM_URIS", "http://b:port"),
        ("PROPAGATE_HEADERS", "user,bad header"),
    ],
)
def test_invalid_values_name_the_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"^{variable}=") as caught:
        FakeServiceConfig.from_env({variable: value})

    assert repr(value) in str(caught.value)
    assert "expected" in str(caught.value)


def test_error_rate_message() -> None:
    with pytest.raises(ValueError) as caught:
        FakeServiceConfig.from_env({"ERROR_RATE": "abc"})

    assert str(caught.value) == "ERROR_RATE='abc': expected a number between 0 and 1"


def test_main_rejects_bad_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ERROR_RATE", "abc")

    assert main([]) == 2
    assert "ERROR_RATE='abc'" in capsys.readouterr().err


def test_main_serves_until_sigterm() -> None:
    env = {**os.environ, "NAME": "terminated", "LISTEN_ADDR": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent.testbed.workload"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr
    assert stderr is not None

    def read_stderr() -> None:
        # readline() cannot time out; a thread and a queue can.
        for line in stderr:
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=TIMEOUT)
        assert "listening on 127.0.0.1:" in first, first
        port = int(first.rsplit(":", 1)[1])
        assert fetch(f"http://127.0.0.1:{port}/health")[0] == 200

        proc.send_signal(signal.SIGTERM)

        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        reader.join(TIMEOUT)


# --- addresses ----------------------------------------------------------------------------------

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.7
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.0
           /8 host LOCAL
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.7
           /32 host LOCAL
     |-- 192.168.5.9
        /32 host LOCAL
"""


def test_parse_fib_trie_lists_local_non_loopback_addresses_once() -> None:
    assert parse_fib_trie(FIB_TRIE) == ["10.244.1.7", "192.168.5.9"]
    assert parse_fib_trie("") == []


# -- serving TLS itself (DestinationRule tls SIMPLE / MUTUAL tests) ------------------------------


def _https_answer(url: str, sni: str, ca: str, cert: str = "", key: str = "") -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # the test CA's names are checked by the tests that use them
    if cert:
        context.load_cert_chain(cert, key)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=TIMEOUT)
    # server_hostname sets the SNI (http.client takes it from the host, so wrap ourselves).
    connection.sock = context.wrap_socket(
        socket.create_connection((host, int(port)), TIMEOUT), server_hostname=sni
    )
    connection.request("GET", "/")
    response = connection.getresponse()
    answer: dict[str, Any] = json.loads(response.read())
    connection.close()
    return answer


def test_tls_mode_tells_the_sni_and_the_client_certificate(
    start_service: StartService, tmp_path: Path
) -> None:
    ca = str(write_app_pki(tmp_path, "app.example", "client.example"))
    serve = {
        "TLS_CERT": str(tmp_path / "app.example.pem"),
        "TLS_KEY": str(tmp_path / "app.example.key"),
    }
    url = start_service(**serve)
    assert _https_answer(url, "app.example", ca)["tls"] == {"sni": "app.example"}
    mutual = start_service(**serve, TLS_CLIENT_CA=ca)
    cert, key = str(tmp_path / "client.example.pem"), str(tmp_path / "client.example.key")
    assert _https_answer(mutual, "other.example", ca, cert, key)["tls"] == {
        "sni": "other.example",
        "client_cert": {"subject": "commonName=client.example", "sans": ["DNS:client.example"]},
    }
    with pytest.raises(OSError):  # no client certificate: the handshake (or the read) fails
        _https_answer(mutual, "app.example", ca)


def test_tls_settings_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="TLS_CERT and TLS_KEY"):
        FakeServiceConfig.from_env({"TLS_CERT": "/c.pem"})
    with pytest.raises(ValueError, match="TLS_CLIENT_CA"):
        FakeServiceConfig.from_env({"TLS_CLIENT_CA": "/ca.pem"})
