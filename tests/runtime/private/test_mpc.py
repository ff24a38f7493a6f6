"""Secret-shared runs with three local MPyC party processes: bit-exact against the integer reference,
the worst-case input computed without wrapping, TLS between parties, the CLI contract, serve/query."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from secquant.runtime.private import PrivateBackend, compile_program, run_reference, worst_case_input
from secquant.runtime.private.launch import free_ports, party_command, run_local
from secquant.runtime.private.tls import issue_party_certificates

from .conftest import hostile_mlp

K = 30  # MPyC's default statistical security parameter: p has bit_length + K + 2 bits


@pytest.fixture(scope="module")
def digits_run(digits_w8a8):
    """Two held-out digits and the first layer's worst-case input, one secure session, logits revealed."""
    from secquant.models.digits import splits

    be = PrivateBackend.load(digits_w8a8)
    codes = np.concatenate([be.encode(splits()["test_x"][:2]), worst_case_input(be.program, 5)])
    return be, codes, be.run_codes(codes, reveal_logits=True)


def test_secret_shared_digits_logits_are_bit_exact(digits_run, digits_w8a8):
    be, codes, res = digits_run
    ref = run_reference(be.program, codes)
    assert res.int_logits == ref["logits"].tolist()
    assert res.labels.tolist() == ref["labels"].tolist()
    from secquant.models.digits import splits

    with torch.no_grad():
        plain = digits_w8a8.module(splits()["test_x"][:2]).argmax(1).tolist()
    assert res.labels[:2].tolist() == plain
    assert res.p.bit_length() == be.program.bit_length + K + 2
    assert res.bytes_total > 0 and len(res.bytes_by_party) == 3


def test_worst_case_input_is_computed_without_wrapping():
    """The hostile MLP's worst-case inputs drive every bound to its end; with the field chosen from the bounds,
    the secure result equals the exact integer result (a 32-bit secure type would have wrapped)."""
    prog = compile_program(hostile_mlp(), (1, 8, 8))
    codes = np.concatenate([worst_case_input(prog, c) for c in range(4)] + [np.zeros((1, 64), dtype=np.int64)])
    ref = run_reference(prog, codes, dtype=object)
    res = run_local(prog, codes, reveal_logits=True, timeout=300)
    assert [[int(v) for v in row] for row in res["logits"]] == ref["logits"].tolist()
    assert max(abs(int(v)) for v in ref["logits"].ravel()) > 2 ** 31


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "party process exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("party never listened")


def _closed_by_peer(raw: socket.socket) -> bool:
    """True when the server closes the connection (after at most a TLS alert record) within 5 s."""
    raw.settimeout(5)
    got = b""
    try:
        while chunk := raw.recv(256):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return got == b"" or got[:1] == b"\x15"   # 0x15: TLS alert


def _handshake(port: int, conf) -> bytes | None:
    """TLS connect as a would-be party 0 with certificate `conf` (dir with party_0.crt/.key); returns what the
    server sends within 1 s, b'' if it closed the connection, None if the connection stayed open (accepted)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(conf / "party_0.crt", conf / "party_0.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="MPyC party 2") as s:
                s.settimeout(1.0)
                try:
                    return s.recv(1)
                except TimeoutError:
                    return None
        except (ssl.SSLError, ConnectionError):
            return b""


def test_party_refuses_peers_without_a_certificate_from_the_session_ca(tmp_path):
    """MPyC unpickles what peers send: a party must not accept anyone the session's CA did not certify."""
    homes = [tmp_path / f"party{i}" for i in range(3)]
    issue_party_certificates(homes)
    rogue = [tmp_path / f"rogue{i}" for i in range(3)]
    issue_party_certificates(rogue)                      # a self-made CA issuing "MPyC party 0"
    prog = compile_program(hostile_mlp(), (1, 8, 8))
    (tmp_path / "public.json").write_text(prog.public_json())
    ports = free_ports(3)
    peers = [f"127.0.0.1:{p}" for p in ports]
    proc = subprocess.Popen(party_command(2, peers, homes[2], tmp_path / "public.json"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(ports[2], proc)
        with socket.create_connection(("127.0.0.1", ports[2]), timeout=5) as raw:   # no TLS: MPyC's own framing
            raw.sendall(b"\x00\x00" + b"\x80\x04N." * 64)                         # (pid 0, then pickles)
            assert _closed_by_peer(raw)
        assert _handshake(ports[2], rogue[0] / ".config") == b""     # refused
        assert _handshake(ports[2], homes[0] / ".config") is None    # the real party 0 certificate is accepted
        assert proc.poll() is None                                   # and the party is still waiting for peers
    finally:
        proc.kill()
        proc.wait()


def test_cli_private_eval_json_contract(cli, digits_artifact):
    r = cli("private-eval", digits_artifact("w8a8"), "--parties", "3", "--samples", "1", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    for k in ("agreement", "accuracy", "plain_accuracy", "seconds_per_sample", "bytes_per_sample", "p", "engine"):
        assert k in res
    assert res["agreement"] == 1.0 and res["bit_exact"] is True
    assert res["engine"].startswith("mpyc ") and int(res["p"]).bit_length() == res["bit_length"] + K + 2
    assert res["seconds_per_sample"] > 0 and res["bytes_per_sample"] > 0
    from secquant.report.sections import private_inference_section  # the demo report renders this result

    html = private_inference_section(res)["html"]
    assert "2: helper" in html and "<td>bit_exact</td><td>True</td>" in html and res["engine"] in html


def test_cli_refuses_two_parties_and_unsupported_artifacts(cli, digits_artifact, assert_user_error):
    assert_user_error(cli("private-eval", digits_artifact("w8a8"), "--parties", "2"), contains=("3 parties",))
    assert_user_error(cli("private-eval", digits_artifact("w8a16"), "--samples", "1"),
                      contains=("features.0", "float activations"))


def test_serve_and_query_run_as_separate_processes(tmp_path, digits_artifact, digits_w8a8):
    bundle = tmp_path / "client"
    port = free_ports(1)[0]
    secquant = [sys.executable, "-m", "secquant"]
    server = subprocess.Popen([*secquant, "private-serve", str(digits_artifact("w8a8")), "--bundle",
                               str(bundle), "--base-port", str(port), "--sessions", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (bundle / "peers.json").exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.2)
        # the client's bundle holds the public program and its own TLS identity, nothing of the model
        names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
        assert names == [".config/mpyc_ca.crt", ".config/party_0.crt", ".config/party_0.key", "peers.json",
                         "public.json"]
        public = json.loads((bundle / "public.json").read_text())
        assert set(public) == {"ops", "input", "bit_length", "secret_shapes"}
        r = subprocess.run([*secquant, "private-query", "--bundle", str(bundle), "--index", "0", "--index", "7",
                            "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        from secquant.models.digits import splits

        with torch.no_grad():
            plain = digits_w8a8.module(splits()["test_x"][[0, 7]]).argmax(1).tolist()
        assert res["labels"] == plain
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
