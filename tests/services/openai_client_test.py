#!/usr/bin/env python3
"""The real `openai` Python package against specontext-generator's OpenAI-compatible HTTP API.

  openai_client_test.py GENERATOR_BIN MODEL_DIR DEPS_DIR

Starts the generator (--http-port 0) on the stories260K model and drives completions and chat through
the client, streaming and not: greedy streamed text equals the non-streamed text, usage and
finish_reason arrive, models list the served model, a bad request raises BadRequestError (400) and the
server keeps serving. The package comes from DEPS_DIR, installed there from PyPI on first use
(pip install --target); when it cannot be had the test exits 77 (skipped, with the reason).
"""
import os
import signal
import subprocess
import sys
import tempfile
import time


def load_openai(deps_dir):
    sys.path.insert(0, deps_dir)
    try:
        import openai  # noqa: F401
        return openai
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", deps_dir, "openai"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        print(f"SKIPPED: cannot install the openai package into {deps_dir}:\n{r.stderr[-2000:]}")
        sys.exit(77)
    import importlib
    importlib.invalidate_caches()
    import openai
    return openai


def start_generator(binary, model_dir, work):
    port_file = os.path.join(work, "ports")
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([binary, "--model", f"{model_dir}/stories260K.bin", "--tokenizer",
                             f"{model_dir}/tok512.bin", "--backend", "cpu", "--threads", "1",
                             "--log-level", "warning", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                             "--metrics-host", "127.0.0.1", "--http-port", "0", "--http-host", "127.0.0.1",
                             "--port-file", port_file], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(port_file):
            ports = open(port_file).read().split()
            if len(ports) == 3:
                return proc, int(ports[2])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the generator did not start:\n" + open(os.path.join(work, "server.log")).read())


def main():
    binary, model_dir, deps_dir = sys.argv[1:4]
    if not os.path.exists(os.path.join(model_dir, "stories260K.bin")):
        print(f"FAILED: stories260K not found in {model_dir}")
        return 1
    openai = load_openai(deps_dir)
    print(f"openai {openai.__version__}")
    with tempfile.TemporaryDirectory(prefix="spc_openai_client_") as work:
        proc, port = start_generator(binary, model_dir, work)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            models = [m.id for m in client.models.list()]
            assert models == ["stories260K"], models

            c = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=24,
                                          temperature=0)
            text = c.choices[0].text
            assert text and c.choices[0].finish_reason == "length", c
            assert c.usage.completion_tokens == 24 and c.usage.prompt_tokens > 0, c.usage
            streamed, usage = "", None
            for chunk in client.completions.create(model="stories260K", prompt="Once upon a time",
                                                   max_tokens=24, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}):
                if chunk.choices:
                    streamed += chunk.choices[0].text
                if chunk.usage is not None:
                    usage = chunk.usage
            assert streamed == text, (streamed, text)
            assert usage is not None and usage.completion_tokens == 24, usage

            messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Lily"}]
            r = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=20,
                                               temperature=0, seed=3, stop=["zzz-never"])
            answer = r.choices[0].message.content
            assert answer and r.choices[0].message.role == "assistant", r
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20, r
            streamed, finish = "", None
            for chunk in client.chat.completions.create(model="stories260K", messages=messages, max_tokens=20,
                                                        temperature=0, stream=True):
                streamed += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            assert streamed == answer, (streamed, answer)
            assert finish == "length", finish

            try:
                client.completions.create(model="stories260K", prompt="x", max_tokens=2, n=2)
                raise AssertionError("n=2 was accepted")
            except openai.BadRequestError as e:
                assert e.status_code == 400 and "n must be 1" in str(e), e
            try:
                client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
                raise AssertionError("an unknown model was accepted")
            except openai.NotFoundError as e:
                assert e.status_code == 404, e
            c = client.completions.create(model="stories260K", prompt="Hi", max_tokens=2)
            assert c.usage.completion_tokens == 2, c
            print("PASSED: completions and chat, streaming and not, errors, models")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
