#!/usr/bin/env python3
"""Renders deploy/helm/specontext with tools/helm-render (Go text/template + sprig, as `helm template`
does) for several value sets, validates every object against the Kubernetes API schema
(k8s_schema.py) and checks that the chart agrees with the services: container args are flags the
binaries accept (from their --help), probes hit ports and paths the servers serve, the sidecar's
address is the generator's --retriever, /dev/shm and memory hold the kvstore segment, the GPU
request is well formed, and the Service and ServiceMonitor reach the pod's ports.

usage: check_chart.py ROOT --renderer PATH [--generator PATH] [--retriever PATH] [--kvstore PATH]
Exit 0: all passed; 1: a check failed; 77: skipped (no renderer or no python3-kubernetes).
"""
import argparse
import difflib
import pathlib
import re
import subprocess
import sys

SKIP = 77
HERE = pathlib.Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(HERE))
try:
    import yaml  # python3-yaml
    import k8s_schema  # needs python3-kubernetes
    MISSING = None
except ImportError as e:
    MISSING = e

# (name, renderer arguments); value files live in tests/deploy/values/.
VALUE_SETS = [
    ("default", []),
    ("split-tls", ["-f", "values/split-tls.yaml"]),
    ("inproc-cpu", ["-f", "values/inproc-cpu.yaml"]),
    ("tensor-parallel", ["-f", "values/tensor-parallel.yaml"]),
    ("tensor-parallel-cpu", ["-f", "values/inproc-cpu.yaml", "--set", "generator.tensorParallel=4"]),
    ("set-flags", ["--set", r"model.retrievalHead=/models/head,generator.resources.limits.nvidia\.com/gpu=1",
                   "--set", "replicaCount=3,serviceMonitor.interval=30s,generator.drainTimeoutS=60",
                   "--set", "terminationGracePeriodSeconds=90,generator.batchInvariant=true"]),
]
# What a value set's render must hold besides the general checks: generator flags and its GPU limit.
EXPECTED = {
    "default": {"args": {"tensor-parallel": "1"}, "gpus": 1},
    "tensor-parallel": {"args": {"tensor-parallel": "2", "retriever": "inproc"}, "gpus": 2},
    "tensor-parallel-cpu": {"args": {"tensor-parallel": "4", "retriever": "inproc"}, "gpus": 0},
}
# Value sets the chart must refuse, with a piece of the message it must give.
BAD_VALUE_SETS = [
    ("tls-without-secret", ["--set", "tls.enabled=true"], "tls.secretName"),
    ("unknown-retriever-mode", ["--set", "model.retrievalHead=/h,generator.retrieverMode=remote"], "retrieverMode"),
    ("tensor-parallel-zero", ["--set", "generator.tensorParallel=0"], "generator.tensorParallel"),
    ("tensor-parallel-sidecar", ["--set", "model.retrievalHead=/h,generator.tensorParallel=2"], "retrieverMode inproc"),
    ("tensor-parallel-gpu-count", ["--set", r"generator.tensorParallel=2,generator.resources.limits.nvidia\.com/gpu=4"],
     "generator.tensorParallel"),
]
BINARIES = {"specontext-generator": "generator", "specontext-retriever": "retriever", "specontext-kvstore": "kvstore"}
NUMBER = re.compile(r"-?\d+(\.\d+)?")
SIZE = re.compile(r"^\d+(KiB|MiB|GiB|KB|MB|GB|B)?$")  # core/cli/args.cc GetBytes
SIZE_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1, "": 1}
GPU = "nvidia.com/gpu"


def parse_size(text):
    m = SIZE.match(text)
    return int(text[: len(text) - len(m.group(1) or "")]) * SIZE_UNITS[m.group(1) or ""] if m else None


class Flags:
    """The flags a binary's --help lists: name -> (takes a value, default or None, help)."""

    def __init__(self, path):
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60, check=False)
        text = out.stdout + out.stderr
        self.flags = {}
        for m in re.finditer(r"^  --([a-z0-9-]+)( VALUE)?\n      (.*)$", text, re.M):
            default = re.search(r"\(default: ([^)]*)\)$", m.group(3))
            self.flags[m.group(1)] = (bool(m.group(2)), default.group(1) if default else None, m.group(3))
        if not self.flags:  # a usage synopsis (specontext-kvstore): every --word it names
            for name in re.findall(r"--([a-z][a-z0-9-]*)", text):
                self.flags.setdefault(name, (True, None, ""))
        if not self.flags:
            raise RuntimeError(f"{path} --help lists no flags:\n{text}")

    def check(self, args, where, errors):
        """Parses args as the binary would; returns {flag: value}."""
        values, i = {}, 0
        while i < len(args):
            arg = str(args[i])
            i += 1
            if not arg.startswith("--"):
                errors.append(f"{where}: stray word {arg!r} (the binaries take no positional arguments)")
                continue
            name, eq, value = arg[2:].partition("=")
            if name not in self.flags:
                errors.append(f"{where}: --{name} is not a flag of the binary")
                continue
            takes_value, default, help_text = self.flags[name]
            if takes_value and not eq:
                if i >= len(args):
                    errors.append(f"{where}: --{name} has no value")
                    continue
                value, i = str(args[i]), i + 1
            # A numeric flag (its default is a number) takes a plain number: Go templates print a
            # float64 of a million or more as 1e+06, which the binaries' integer parsing rejects.
            numeric = default is not None and NUMBER.fullmatch(default) and "e.g." not in help_text
            if takes_value and numeric:
                if not NUMBER.fullmatch(value):
                    errors.append(f"{where}: --{name}={value} is not a plain number")
            if takes_value and ((default and SIZE.match(default) and not default.isdigit()) or
                                re.search(r"e\.g\. \d+[KMG]i?B", help_text)):
                if not SIZE.match(value):
                    errors.append(f"{where}: --{name}={value} is not a size such as 4GiB")
            values[name] = value
        return values


def render(renderer, chart, extra):
    cmd = [renderer, "--strict", "--release-name", "sc", "--namespace", "inference", *extra, str(chart)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=120, check=False)


def as_int(text, default):
    """A flag's integer value; None if it is not one (Flags.check reports that)."""
    text = str(text if text is not None else default)
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def port_of(container, ref):
    """A probe or Service target port (name or number) -> the container port number, or None."""
    for p in container.get("ports") or []:
        if ref in (p.get("name"), p.get("containerPort")):
            return p.get("containerPort")
    return None


def host_port(address):
    host, _, port = str(address).rpartition(":")
    return host, int(port) if port.isdigit() else None


def check_pod(deploy, flags, errors):
    """Chart-to-service consistency of the Deployment's pod."""
    pod = deploy["spec"]["template"]["spec"]
    where = "Deployment"
    containers = {c["name"]: c for c in pod["containers"]}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    args = {}
    bound = {}  # port -> the container flag that binds it: all containers share the pod's network
    for c in pod["containers"]:
        cw = f"{where} container {c['name']}"
        binary = (c.get("command") or [None])[0]
        if binary not in BINARIES:
            errors.append(f"{cw}: command {c.get('command')} is not a specontext binary")
            continue
        kind = BINARIES[binary]
        if kind in flags:
            args[kind] = flags[kind].check(c.get("args") or [], cw, errors)
        else:  # binary not built: still read the --name=value pairs for the checks below
            args[kind] = dict(a[2:].partition("=")[::2] for a in map(str, c.get("args") or []) if a.startswith("--"))
        a = args[kind]
        # Ports: --listen and --metrics-port are the container's grpc and metrics ports.
        metrics_port = as_int(a.get("metrics-port"), 9464 if kind == "generator" else 9465)
        _, grpc = host_port(a.get("listen", "127.0.0.1:50051" if kind == "generator" else "127.0.0.1:50052"))
        for port, what in ((grpc, "--listen"), (metrics_port, "--metrics-port")):
            if kind in ("generator", "retriever") and port in bound:
                errors.append(f"{cw}: {what} port {port} is already bound by {bound[port]} (one network namespace)")
            bound.setdefault(port, f"{c['name']} {what}")
        if kind == "generator":
            if port_of(c, "grpc") != grpc:
                errors.append(f"{cw}: port 'grpc' is {port_of(c, 'grpc')}, --listen serves {grpc}")
            if not a.get("listen", "").startswith(("0.0.0.0:", "[::]:")):
                errors.append(f"{cw}: --listen={a.get('listen')} is not reachable from the Service")
        metric_ports = [p for p in c.get("ports") or [] if p.get("containerPort") == metrics_port]
        if kind in ("generator", "retriever") and not metric_ports:
            errors.append(f"{cw}: no container port for --metrics-port {metrics_port}")
        # Probes: /healthz (readiness) and /metrics on the metrics port; TCP on a served port.
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if not probe:
                continue
            pw = f"{cw} {probe_name}"
            if "httpGet" in probe:
                path, port = probe["httpGet"].get("path"), port_of(c, probe["httpGet"].get("port"))
                if path not in ("/healthz", "/metrics"):
                    errors.append(f"{pw}: the metrics server serves /healthz and /metrics, not {path}")
                if port != metrics_port:
                    errors.append(f"{pw}: port {probe['httpGet'].get('port')} is not --metrics-port {metrics_port}")
                if probe_name == "readinessProbe" and path != "/healthz":
                    errors.append(f"{pw}: readiness is /healthz (it turns 503 while draining)")
            elif "tcpSocket" in probe:
                if port_of(c, probe["tcpSocket"].get("port")) is None:
                    errors.append(f"{pw}: port {probe['tcpSocket'].get('port')} is not a container port")
            else:
                errors.append(f"{pw}: neither httpGet nor tcpSocket")
        if kind in ("generator", "retriever") and not c.get("readinessProbe"):
            errors.append(f"{cw}: no readiness probe")
        # Resources: requests within limits; the GPU an integer, requests equal to limits.
        res = c.get("resources") or {}
        for r, req in (res.get("requests") or {}).items():
            lim = (res.get("limits") or {}).get(r)
            if lim is not None and k8s_schema.parse_quantity(req) > k8s_schema.parse_quantity(lim):
                errors.append(f"{cw}: request {r}={req} above its limit {lim}")
        for section in ("limits", "requests"):
            gpu = (res.get(section) or {}).get(GPU)
            if gpu is not None and not re.fullmatch(r"\d+", str(gpu)):
                errors.append(f"{cw}: {section} {GPU}={gpu!r} is not a whole number of GPUs")
        if GPU in (res.get("requests") or {}) and str(res["requests"][GPU]) != str((res.get("limits") or {}).get(GPU)):
            errors.append(f"{cw}: {GPU} must be requested as a limit (requests == limits)")
        if kind == "retriever" and GPU in (res.get("limits") or {}):
            errors.append(f"{cw}: the retriever runs on the CPU; a GPU limit would take the generator's device")
        # /dev/shm: a memory-backed emptyDir in every service container.
        shm = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
        if not shm:
            errors.append(f"{cw}: /dev/shm is not mounted (kvstore segment and host KV tier)")
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                errors.append(f"{cw}: mount of undefined volume {m['name']}")
        # TLS files lie in a mounted secret with a name.
        for flag in ("tls-cert", "tls-key", "tls-client-ca"):
            if a.get(flag):
                mounts = [m for m in c.get("volumeMounts") or []
                          if a[flag].startswith(m["mountPath"].rstrip("/") + "/")]
                secret = volumes.get(mounts[0]["name"], {}).get("secret") if mounts else None
                if not secret or not secret.get("secretName"):
                    errors.append(f"{cw}: --{flag}={a[flag]} is not in a mounted secret with a name")

    gen = args.get("generator")
    if gen is None:
        errors.append(f"{where}: no generator container")
        return
    # The retriever: the generator's --retriever is the sidecar's --listen, or inproc without one.
    retr = args.get("retriever")
    mode = gen.get("retriever", "none")
    if retr is not None:
        host, port = host_port(mode)
        r_host, r_port = host_port(retr.get("listen", "127.0.0.1:50052"))
        if host not in ("127.0.0.1", "localhost") or port != r_port:
            errors.append(f"{where}: generator --retriever={mode} is not the sidecar's --listen={retr.get('listen')}")
        if r_host not in ("127.0.0.1", "localhost", "0.0.0.0"):
            errors.append(f"{where}: the sidecar listens on {r_host}, not on the pod's loopback")
        if retr.get("head") != gen.get("retrieval-head"):
            errors.append(f"{where}: sidecar --head={retr.get('head')} != --retrieval-head={gen.get('retrieval-head')}")
    elif mode not in ("none", "inproc"):
        errors.append(f"{where}: generator --retriever={mode} but the pod has no retriever container")
    if mode != "none" and not gen.get("retrieval-head"):
        errors.append(f"{where}: --retriever={mode} without --retrieval-head")
    # The kvstore segment fits the memory-backed /dev/shm and the generator's memory.
    shm_volume = next((volumes.get(m["name"]) for m in containers["generator"].get("volumeMounts") or []
                       if m.get("mountPath") == "/dev/shm"), None)
    if shm_volume is not None:
        empty_dir = shm_volume.get("emptyDir")
        if not empty_dir or empty_dir.get("medium") != "Memory":
            errors.append(f"{where}: /dev/shm is not an emptyDir with medium Memory")
        elif gen.get("kvstore"):
            segment = (as_int(gen.get("kvstore-blocks"), 4096) or 0) * (
                parse_size(gen.get("kvstore-block-bytes", "64KiB")) or 0)
            limit = k8s_schema.parse_quantity(empty_dir.get("sizeLimit", "0"))
            if not empty_dir.get("sizeLimit") or limit < segment:
                errors.append(f"{where}: /dev/shm sizeLimit {empty_dir.get('sizeLimit')} < kvstore segment "
                              f"{segment / 2**30:.1f} GiB (--kvstore-blocks x --kvstore-block-bytes)")
            res = containers["generator"].get("resources") or {}
            for section in ("limits", "requests"):
                mem = (res.get(section) or {}).get("memory")
                gpus = as_int((res.get("limits") or {}).get(GPU), 0) or 0
                if mem is not None and gpus > 0 and k8s_schema.parse_quantity(mem) < segment:
                    errors.append(f"{where}: generator memory {section} {mem} < the page-locked kvstore segment "
                                  f"{segment / 2**30:.1f} GiB")
    # Tensor parallelism: one GPU per rank when the generator asks for GPUs; no split mode.
    tp = as_int(gen.get("tensor-parallel"), 1)
    gres = containers["generator"].get("resources") or {}
    gpus = as_int((gres.get("limits") or {}).get(GPU), 0) or 0
    if tp is None or tp < 1:
        errors.append(f"{where}: --tensor-parallel={gen.get('tensor-parallel')} is not a number of ranks")
    elif gpus > 0 and gpus != tp:
        errors.append(f"{where}: generator {GPU}={gpus} but --tensor-parallel={tp} (one GPU per rank)")
    elif tp > 1 and mode not in ("none", "inproc"):
        errors.append(f"{where}: --tensor-parallel={tp} with --retriever={mode} (the generator refuses split mode)")
    # Draining: the grace period outlasts the generator's --drain-timeout-s.
    drain = as_int(gen.get("drain-timeout-s"), 300)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if drain is not None and grace <= drain:
        errors.append(f"{where}: terminationGracePeriodSeconds {grace} <= --drain-timeout-s {drain}")


def check_expected(objs, expected, errors):
    """The generator container's flags and GPU limit that a value set asks for."""
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    gen = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "generator")
    args = dict(a[2:].partition("=")[::2] for a in map(str, gen.get("args") or []) if a.startswith("--"))
    for flag, value in expected.get("args", {}).items():
        if args.get(flag) != value:
            errors.append(f"generator --{flag}={args.get(flag)}, expected {value}")
    if "gpus" in expected:
        res = gen.get("resources") or {}
        got = as_int((res.get("limits") or {}).get(GPU), 0) or 0
        if got != expected["gpus"]:
            errors.append(f"generator {GPU} limit {got}, expected {expected['gpus']}")
        req = (res.get("requests") or {}).get(GPU)
        if req is not None and as_int(req, 0) != expected["gpus"]:
            errors.append(f"generator {GPU} request {req}, expected {expected['gpus']}")


def check_objects(objs, flags, errors):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    deploys, services = by_kind.get("Deployment", []), by_kind.get("Service", [])
    if len(deploys) != 1 or len(services) != 1:
        errors.append(f"expected one Deployment and one Service, got {len(deploys)} and {len(services)}")
        return
    deploy, service = deploys[0], services[0]
    pod_labels = deploy["spec"]["template"]["metadata"].get("labels") or {}
    selector = deploy["spec"]["selector"].get("matchLabels") or {}
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        errors.append(f"Deployment: selector {selector} does not match the pod labels {pod_labels}")
    check_pod(deploy, flags, errors)
    containers = deploy["spec"]["template"]["spec"]["containers"]
    svc_sel = service["spec"].get("selector") or {}
    if not svc_sel or any(pod_labels.get(k) != v for k, v in svc_sel.items()):
        errors.append(f"Service: selector {svc_sel} does not match the pod labels {pod_labels}")
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        if not any(port_of(c, target) is not None for c in containers):
            errors.append(f"Service port {p.get('name')}: targetPort {target} is no container port")
    svc_ports = {p.get("name") for p in service["spec"]["ports"]}
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        svc_labels = service["metadata"].get("labels") or {}
        if not sel or any(svc_labels.get(k) != v for k, v in sel.items()):
            errors.append(f"ServiceMonitor: selector {sel} does not match the Service labels {svc_labels}")
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in svc_ports:
                errors.append(f"ServiceMonitor: endpoint port {ep.get('port')} is no Service port {sorted(svc_ports)}")
            if ep.get("path", "/metrics") != "/metrics":
                errors.append(f"ServiceMonitor: endpoint path {ep.get('path')} is not /metrics")
    retriever_in_pod = any(c["name"] == "retriever" for c in containers)
    if retriever_in_pod and "retr-metrics" not in svc_ports:
        errors.append("Service: the retriever sidecar's metrics port is not exposed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--renderer", default="")
    for b in ("generator", "retriever", "kvstore"):
        ap.add_argument(f"--{b}", default="")
    opts = ap.parse_args()
    chart = (pathlib.Path(opts.root) / "deploy/helm/specontext").resolve()
    opts.renderer = str(pathlib.Path(opts.renderer).resolve()) if opts.renderer else ""
    if not opts.renderer or not pathlib.Path(opts.renderer).exists():
        print("SKIPPED: tools/helm-render was not built (needs golang-go, golang-github-masterminds-sprig-dev and "
              "golang-k8s-sigs-yaml-dev: tools/install-deps.sh installs them)")
        return SKIP
    if MISSING is not None:
        print(f"SKIPPED: {MISSING} (python3-kubernetes and python3-yaml: tools/install-deps.sh installs them)")
        return SKIP
    flags = {}
    for b in ("generator", "retriever", "kvstore"):
        path = getattr(opts, b)
        if path and pathlib.Path(path).exists():
            flags[b] = Flags(path)
        else:
            print(f"note: specontext-{b} is not built here: its flags are not compared ({path or 'no path'})")
    failed = 0
    # The renderer itself: a fixture chart whose output under Helm is written down in expected.yaml
    # (tpl, include, toYaml, float64 numbers from values files, --set typing and escapes, null).
    fixture = HERE / "render_fixture"
    out = subprocess.run([opts.renderer, "--strict", "--release-name", "fx", "--namespace", "ns", "--set",
                          r"dotted\.key=v,count=3,gone=null", "--set-string", "label=7", str(fixture)],
                         capture_output=True, text=True, timeout=120, check=False)
    expected = (fixture / "expected.yaml").read_text()
    if out.returncode != 0 or out.stdout != expected:
        print(f"[FAIL] renderer self-test (render_fixture): rc {out.returncode} {out.stderr.strip()}")
        for line in difflib.unified_diff(expected.splitlines(), out.stdout.splitlines(), "expected", "rendered",
                                         lineterm=""):
            print(f"    {line}")
        failed += 1
    else:
        print("[ok] renderer self-test (render_fixture)")
    for name, extra in VALUE_SETS:
        errors = []
        out = render(opts.renderer, chart, extra)
        if out.returncode != 0:
            errors.append(f"render failed: {out.stderr.strip()}")
        else:
            objs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
            for i, obj in enumerate(objs):
                errors += k8s_schema.validate(obj, f"document {i}")
            if not errors:
                check_objects(objs, flags, errors)
            if not errors and name in EXPECTED:
                check_expected(objs, EXPECTED[name], errors)
        kinds = "" if out.returncode else ", ".join(re.findall(r"^kind: (\w+)", out.stdout, re.M))
        print(f"[{'FAIL' if errors else 'ok'}] {name}: {kinds}")
        for e in errors:
            print(f"    {e}")
        failed += bool(errors)
    for name, extra, message in BAD_VALUE_SETS:
        out = render(opts.renderer, chart, extra)
        ok = out.returncode != 0 and message in out.stderr
        print(f"[{'ok' if ok else 'FAIL'}] {name}: refused" if ok else
              f"[FAIL] {name}: expected a render error naming {message}, got rc {out.returncode}: {out.stderr.strip()}")
        failed += not ok
    print("chart checks passed" if not failed else f"{failed} value set(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
