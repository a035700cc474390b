#!/usr/bin/env python3
"""End-to-end tests of specontext_client against a real specontext-generator on stories260K.

Environment (set by CTest, see clients/python/CMakeLists.txt):
  SPECONTEXT_GENERATOR  the specontext-generator binary (required)
  SPECONTEXT_CLIENT     the specontext-client binary (optional: the text comparison with it)
  SPECONTEXT_MODEL      the llama2.c checkpoint (default: models/stories260K/stories260K.bin)
  SPECONTEXT_TOKENIZER  its tokenizer (default: models/stories260K/tok512.bin)
Exits 77 (CTest's skip) when grpcio, protobuf or a stub generator is missing, or when the generator
or the model is not there.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
REPO = os.path.normpath(os.path.join(PKG_ROOT, "..", ".."))
SKIP = 77

PROMPT = "Once upon a time"


def skip(msg):
    print("SKIPPED: " + msg, flush=True)
    if __name__ == "__main__":
        sys.exit(SKIP)
    raise unittest.SkipTest(msg)  # under pytest or `python3 -m unittest`


def prepare_package(tmp):
    """Copies specontext_client into tmp and generates its stubs there (the source tree stays clean)."""
    try:
        import grpc  # noqa: F401
        import google.protobuf  # noqa: F401
    except ImportError as e:
        skip("%s: install python3-grpcio and python3-protobuf (tools/install-deps.sh)" % e)
    sys.path.insert(0, PKG_ROOT)
    import build_stubs
    sys.path.pop(0)
    dst = os.path.join(tmp, "specontext_client")
    shutil.copytree(os.path.join(PKG_ROOT, "specontext_client"), dst,
                    ignore=shutil.ignore_patterns("_proto", "__pycache__"))
    try:
        build_stubs.build(package_dir=dst)
    except build_stubs.StubError as e:
        skip("%s\n  install python3-grpc-tools (or protobuf-compiler-grpc) (tools/install-deps.sh)" % e)
    sys.path.insert(0, tmp)


class Server:
    def __init__(self, tmp, extra_args=(), name="generator"):
        self.binary = os.environ.get("SPECONTEXT_GENERATOR")
        model = os.environ.get("SPECONTEXT_MODEL",
                               os.path.join(REPO, "models", "stories260K", "stories260K.bin"))
        tok = os.environ.get("SPECONTEXT_TOKENIZER",
                             os.path.join(REPO, "models", "stories260K", "tok512.bin"))
        if not self.binary or not os.access(self.binary, os.X_OK):
            skip("SPECONTEXT_GENERATOR does not name the specontext-generator binary")
        if not os.path.isfile(model) or not os.path.isfile(tok):
            skip("no stories260K model at %s" % model)
        port_file = os.path.join(tmp, name + ".ports")
        self.log = open(os.path.join(tmp, name + ".log"), "w+")
        self.proc = subprocess.Popen(
            [self.binary, "--model", model, "--tokenizer", tok, "--backend", "cpu",
             "--listen", "127.0.0.1:0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
             "--port-file", port_file] + list(extra_args),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the generator exited (%d):\n%s" % (self.proc.returncode, self.output()))
            if os.path.exists(port_file):
                with open(port_file) as f:
                    fields = f.read().split()
                if len(fields) >= 1:
                    self.port = int(fields[0])
                    break
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("the generator did not write its port file:\n" + self.output())
            time.sleep(0.05)
        self.address = "127.0.0.1:%d" % self.port

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from specontext_client import Client
        cls.server = SERVER
        cls.client = Client(SERVER.address, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def assert_serving(self):
        self.assertEqual(self.client.model_info().model_name, "stories260K")
        self.assertIsNone(self.server.proc.poll(), "the generator exited")

    def test_greedy_generate_matches_stream_and_cli(self):
        r = self.client.generate(PROMPT, max_new_tokens=24)
        self.assertTrue(r.text)
        self.assertEqual(len(r.token_ids), r.usage.generated_tokens)
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertIn(r.finish_reason, ("length", "stop"))
        if r.finish_reason == "length":
            self.assertEqual(len(r.token_ids), 24)
        self.assertTrue(r.request_id)
        # Greedy is deterministic: the same again, and the streamed pieces concatenate to it.
        again = self.client.generate(PROMPT, max_new_tokens=24)
        self.assertEqual((again.text, again.token_ids, again.finish_reason),
                         (r.text, r.token_ids, r.finish_reason))
        pieces = list(self.client.generate_stream(PROMPT, max_new_tokens=24))
        self.assertTrue(pieces[-1].done)
        self.assertTrue(all(not p.done for p in pieces[:-1]))
        self.assertGreater(len(pieces), 2, "expected the text to arrive in several messages")
        self.assertEqual("".join(p.text for p in pieces), r.text)
        self.assertEqual([t for p in pieces for t in p.token_ids], r.token_ids)
        self.assertEqual(pieces[-1].finish_reason, r.finish_reason)
        # A pre-tokenized prompt (BOS + ids): its length is the prompt token count.
        ids = [1] + r.token_ids[:5]
        by_ids = self.client.generate(token_ids=ids, max_new_tokens=8)
        self.assertEqual(by_ids.usage.prompt_tokens, len(ids))
        self.assertEqual(self.client.generate(token_ids=ids, max_new_tokens=8).token_ids, by_ids.token_ids)
        cli = os.environ.get("SPECONTEXT_CLIENT")
        if cli and os.access(cli, os.X_OK):
            out = subprocess.run([cli, "generate", "--addr", self.server.address, "--prompt", PROMPT,
                                  "--max-new-tokens", "24"], capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout.rstrip("\n"), r.text)
            out = subprocess.run([cli, "generate", "--addr", self.server.address, "--prompt", PROMPT,
                                  "--max-new-tokens", "24", "--print-tokens"],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual([int(t) for t in out.stdout.replace(",", " ").split()], r.token_ids)
        else:
            print("note: SPECONTEXT_CLIENT not set: no comparison with specontext-client", flush=True)

    def test_sampling_seeded(self):
        a = self.client.generate(PROMPT, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
        b = self.client.generate(PROMPT, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
        self.assertEqual(a.token_ids, b.token_ids)

    def test_stop_and_ignore_eos(self):
        r = self.client.generate(PROMPT, max_new_tokens=40, ignore_eos=True, dense=True)
        self.assertEqual(r.finish_reason, "length")
        self.assertEqual(len(r.token_ids), 40)
        words = r.text.split()
        self.assertGreater(len(words), 3)
        stop = " " + words[2]
        s = self.client.generate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=[stop])
        self.assertEqual(s.finish_reason, "stop_string")
        self.assertNotIn(stop, s.text)
        self.assertTrue(r.text.startswith(s.text))

    def test_chat_messages(self):
        msgs = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about a cat."}]
        r = self.client.generate(messages=msgs, max_new_tokens=12)
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertGreater(len(r.token_ids), 0)
        # Tuples work as well as dicts, with the same result.
        r2 = self.client.generate(messages=[(m["role"], m["content"]) for m in msgs], max_new_tokens=12)
        self.assertEqual(r2.token_ids, r.token_ids)

    def test_model_info(self):
        info = self.client.model_info()
        self.assertEqual(info.model_name, "stories260K")
        self.assertEqual(info.architecture, "llama")
        self.assertEqual(info.vocab_size, 512)
        self.assertEqual(info.max_context, 512)
        self.assertEqual(info.n_layers, 5)
        self.assertEqual(info.n_heads, 8)
        self.assertEqual(info.n_kv_heads, 4)
        self.assertEqual(info.head_dim, 8)
        self.assertEqual(info.backend, "cpu")
        self.assertTrue(info.has_tokenizer)
        self.assertIn(2, list(info.eos_token_ids))
        self.assertEqual(info.retriever, "none")
        self.assertGreater(info.max_batch, 0)

    def test_bad_requests_raise_and_server_keeps_serving(self):
        from specontext_client import SpeContextError
        with self.assertRaises(SpeContextError) as cm:
            self.client.generate(PROMPT, max_new_tokens=0)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("max_new_tokens", cm.exception.message)
        self.assertIn("INVALID_ARGUMENT", str(cm.exception))
        with self.assertRaises(SpeContextError) as cm:  # none of prompt, messages, token_ids
            self.client.generate(max_new_tokens=4)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        with self.assertRaises(SpeContextError) as cm:
            list(self.client.generate_stream(PROMPT, max_new_tokens=4, temperature=-1.0))
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assert_serving()
        self.assertTrue(self.client.generate(PROMPT, max_new_tokens=4).token_ids)

    def test_stream_left_early_and_context_manager(self):
        from specontext_client import Client
        with Client(self.server.address) as c:
            it = c.generate_stream(PROMPT, max_new_tokens=200, ignore_eos=True)
            first = next(it)
            self.assertFalse(first.done)
            it.close()  # cancels the call
            self.assertEqual(len(c.generate(PROMPT, max_new_tokens=3).token_ids), 3)
        self.assert_serving()

    def test_unreachable_server(self):
        from specontext_client import Client, SpeContextError
        with Client("127.0.0.1:1", timeout=5) as c:
            with self.assertRaises(SpeContextError) as cm:
                c.model_info()
            self.assertIn(cm.exception.code, ("UNAVAILABLE", "DEADLINE_EXCEEDED"))


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    if not shutil.which("openssl"):
        return None

    def ssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        with open(os.path.join(d, who + ".ext"), "w") as f:
            f.write(ext + "\n")
        ssl("req", "-new", *key, "-keyout", who + ".key", "-out", who + ".csr", "-subj", "/CN=" + who)
        ssl("x509", "-req", "-in", who + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", who + ".pem", "-days", "2", "-extfile", who + ".ext")
    return {n: os.path.join(d, n + ".pem") for n in ("ca", "server", "client")} | {
        n + "_key": os.path.join(d, n + ".key") for n in ("server", "client")}


class MutualTlsTest(unittest.TestCase):
    """A second generator requiring client certificates: the client's tls_* arguments."""

    def test_mutual_tls(self):
        from specontext_client import Client, SpeContextError
        d = os.path.join(_TMP.name, "certs")
        os.makedirs(d, exist_ok=True)
        certs = make_certs(d)
        if certs is None:
            self.skipTest("no openssl")
        server = Server(_TMP.name, ["--tls-cert", certs["server"], "--tls-key", certs["server_key"],
                                    "--tls-client-ca", certs["ca"]], name="generator-mtls")
        try:
            with Client(server.address, tls_ca=certs["ca"], tls_cert=certs["client"],
                        tls_key=certs["client_key"], timeout=60) as c:
                self.assertEqual(c.model_info().model_name, "stories260K")
                with open(certs["ca"], "rb") as f:
                    ca_bytes = f.read()
            with Client(server.address, tls_ca=ca_bytes, tls_cert=certs["client"],
                        tls_key=certs["client_key"], timeout=60) as c:
                r = c.generate(PROMPT, max_new_tokens=8)
                self.assertEqual(len(r.token_ids), r.usage.generated_tokens)
            # Without a client certificate the handshake is refused.
            with Client(server.address, tls_ca=certs["ca"], timeout=10) as c:
                with self.assertRaises(SpeContextError) as cm:
                    c.model_info()
                self.assertEqual(cm.exception.code, "UNAVAILABLE")
            with self.assertRaises(ValueError):
                Client(server.address, tls_ca=certs["ca"], tls_cert=certs["client"])
            self.assertIsNone(server.proc.poll())
        finally:
            server.stop()


SERVER = None
_TMP = None


def setUpModule():
    global SERVER, _TMP
    _TMP = tempfile.TemporaryDirectory()
    prepare_package(_TMP.name)
    SERVER = Server(_TMP.name)


def tearDownModule():
    if SERVER is not None:
        exited = SERVER.proc.poll()
        log = SERVER.output() if exited is not None else ""
        SERVER.stop()
        if exited is not None:
            raise AssertionError("the generator exited (%d) during the tests:\n%s" % (exited, log))
    if _TMP is not None:
        _TMP.cleanup()


if __name__ == "__main__":
    unittest.main(verbosity=2)
