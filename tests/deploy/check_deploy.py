#!/usr/bin/env python3
"""Syntax checks of deploy/: the dashboard is valid JSON whose metrics the services export, the chart's
static files are valid YAML, and the chart's templates balance their {{ }} actions."""
import json
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
errors = []
dash = json.loads((root / "deploy/grafana/specontext-dashboard.json").read_text())
sources = "".join(p.read_text() for p in list(root.glob("generator/*.cc")) + list(root.glob("retriever/*.cc")))
for panel in dash["panels"]:
    for target in panel["targets"]:
        for metric in re.findall(r"spc_[a-z_]+", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if f'"{base}"' not in sources:
                errors.append(f"dashboard panel '{panel['title']}' uses {metric}, which no service exports")
for name in ["Chart.yaml", "values.yaml"]:
    text = (root / "deploy/helm/specontext" / name).read_text()
    try:
        import yaml  # python3-yaml, when installed
        yaml.safe_load(text)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        errors.append(f"{name}: {e}")
for tpl in (root / "deploy/helm/specontext/templates").glob("*"):
    text = tpl.read_text()
    if text.count("{{") != text.count("}}"):
        errors.append(f"{tpl.name}: unbalanced template actions")
    opens = len(re.findall(r"{{-?\s*(if|range|with|define)\b", text))
    ends = len(re.findall(r"{{-?\s*end\s*-?}}", text))
    if opens != ends:
        errors.append(f"{tpl.name}: {opens} blocks opened, {ends} closed")
# Every flag the chart passes is one the binaries define (a renamed flag would fail the pod at startup).
flag_sources = "".join(p.read_text() for p in [root / "generator/generator_main.cc", root / "retriever/retriever_main.cc",
                                                root / "core/runtime/runtime.cc"])
for tpl in (root / "deploy/helm/specontext/templates").glob("*.yaml"):
    for flag in re.findall(r"^\s*- --([a-z0-9-]+)", tpl.read_text(), re.M):
        if f'"{flag}"' not in flag_sources:
            errors.append(f"{tpl.name}: passes --{flag}, which neither binary defines")
print("\n".join(errors) if errors else "deploy checks passed")
sys.exit(1 if errors else 0)
