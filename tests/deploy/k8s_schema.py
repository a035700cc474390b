"""Strict validation of rendered Kubernetes objects against the API schema.

Built-in kinds are checked against the models of the Kubernetes Python client (Debian's
python3-kubernetes, API 1.22): every key must be in the model's attribute_map (the client's own
deserializer silently drops unknown keys, which `kubectl apply` with server-side field validation
rejects), every value must have the model's type, and the model's constructor then enforces the
required fields. The ServiceMonitor CRD is checked against the field subset written below.
"""
import re

import kubernetes.client
from kubernetes.client import models

# Fields the Python client types as str that Kubernetes types as resource.Quantity (which also
# accepts JSON numbers), by python attribute name.
QUANTITY_ATTRS = {"limits", "requests", "size_limit", "hard", "capacity", "allocatable", "divisor"}
# Fields typed object by the client that Kubernetes types IntOrString.
INT_OR_STRING_ATTRS = {"port", "target_port", "max_surge", "max_unavailable", "min_available"}
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(value):
    """A Kubernetes quantity ("64Gi", "4", 1, "500m") as a float, or None if it is not one."""
    text = str(value)
    m = _QUANTITY.match(text)
    if not m:
        return None
    suffix = m.group(3) or ""
    number = float(text[: len(text) - len(suffix)])
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * 10 ** int(suffix[1:])


# apiVersion/kind -> model class of the Python client.
BUILTIN = {
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
}


def _walk(value, typ, path, attr, errors):
    if value is None:
        return
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk(item, typ[5:-1], f"{path}[{i}]", attr, errors)
        return
    if typ.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        inner = typ[typ.index(",") + 1 : -1].strip()
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: key {k!r} is not a string")
            _walk(v, inner, f"{path}.{k}", attr, errors)
        return
    if typ == "str":
        if attr in QUANTITY_ATTRS:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or parse_quantity(value) is None:
                errors.append(f"{path}: {value!r} is not a quantity")
        elif not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
        return
    if typ == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return
    if typ in ("object", "datetime", "date"):  # IntOrString, raw JSON, timestamps
        if attr in INT_OR_STRING_ATTRS and (isinstance(value, bool) or not isinstance(value, (int, str))):
            errors.append(f"{path}: expected a number or a name, got {value!r}")
        return
    klass = getattr(models, typ, None)
    if klass is None:
        errors.append(f"{path}: no model {typ}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({typ}), got {type(value).__name__} {value!r}")
        return
    json_to_attr = {j: a for a, j in klass.attribute_map.items()}
    for key, v in value.items():
        if key not in json_to_attr:
            errors.append(f"{path}: unknown field \"{key}\" in {typ}")
            continue
        a = json_to_attr[key]
        _walk(v, klass.openapi_types[a], f"{path}.{key}", a, errors)


def _required_fields(obj, klass_name, path, errors):
    """The client's models raise ValueError from their constructor when a required field is missing."""
    client = kubernetes.client.ApiClient()
    try:
        client._ApiClient__deserialize(obj, klass_name)  # pylint: disable=protected-access
    except (ValueError, TypeError) as e:
        errors.append(f"{path}: {e}")


# monitoring.coreos.com/v1 ServiceMonitor: the properties of the CRD in prometheus-operator
# v0.84.1 (example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml). Nested
# objects beyond the ones listed (tlsConfig, oauth2, relabelings...) are checked for type only.
SERVICE_MONITOR_SPEC = {
    "attachMetadata": dict, "bodySizeLimit": str, "convertClassicHistogramsToNHCB": bool, "endpoints": list,
    "fallbackScrapeProtocol": str, "jobLabel": str, "keepDroppedTargets": int, "labelLimit": int,
    "labelNameLengthLimit": int, "labelValueLengthLimit": int, "namespaceSelector": dict,
    "nativeHistogramBucketLimit": int, "nativeHistogramMinBucketFactor": (int, str), "podTargetLabels": list,
    "sampleLimit": int, "scrapeClass": str, "scrapeClassicHistograms": bool, "scrapeProtocols": list,
    "selector": dict, "selectorMechanism": str, "targetLabels": list, "targetLimit": int,
}
SERVICE_MONITOR_REQUIRED = {"endpoints", "selector"}
SERVICE_MONITOR_ENDPOINT = {
    "authorization": dict, "basicAuth": dict, "bearerTokenFile": str, "bearerTokenSecret": dict,
    "enableHttp2": bool, "filterRunning": bool, "followRedirects": bool, "honorLabels": bool,
    "honorTimestamps": bool, "interval": str, "metricRelabelings": list, "noProxy": str, "oauth2": dict,
    "params": dict, "path": str, "port": str, "proxyConnectHeader": dict, "proxyFromEnvironment": bool,
    "proxyUrl": str, "relabelings": list, "scheme": str, "scrapeTimeout": str, "targetPort": (int, str),
    "tlsConfig": dict, "trackTimestampsStaleness": bool,
}
NAMESPACE_SELECTOR = {"any": bool, "matchNames": list}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def _check_fields(obj, fields, path, errors):
    if not isinstance(obj, dict):
        errors.append(f"{path}: expected an object, got {obj!r}")
        return
    for key, value in obj.items():
        if key not in fields:
            errors.append(f"{path}: unknown field \"{key}\"")
        elif value is not None and (isinstance(value, bool) and fields[key] is not bool
                                    or not isinstance(value, fields[key])):
            errors.append(f"{path}.{key}: {value!r} has the wrong type")


def _check_service_monitor(obj, path, errors):
    spec = obj.get("spec")
    _check_fields(spec, SERVICE_MONITOR_SPEC, f"{path}.spec", errors)
    if not isinstance(spec, dict):
        return
    for key in sorted(SERVICE_MONITOR_REQUIRED - spec.keys()):
        errors.append(f"{path}.spec: required field \"{key}\" is missing")
    if isinstance(spec.get("selector"), dict):
        _walk(spec["selector"], "V1LabelSelector", f"{path}.spec.selector", "selector", errors)
    if "namespaceSelector" in spec:
        _check_fields(spec["namespaceSelector"], NAMESPACE_SELECTOR, f"{path}.spec.namespaceSelector", errors)
    for i, ep in enumerate(spec.get("endpoints") or []):
        ep_path = f"{path}.spec.endpoints[{i}]"
        _check_fields(ep, SERVICE_MONITOR_ENDPOINT, ep_path, errors)
        if not isinstance(ep, dict):
            continue
        for key in ("interval", "scrapeTimeout"):
            if isinstance(ep.get(key), str) and not DURATION.match(ep[key]):
                errors.append(f"{ep_path}.{key}: {ep[key]!r} is not a Prometheus duration")
        if ep.get("scheme") not in (None, "http", "https"):
            errors.append(f"{ep_path}.scheme: {ep['scheme']!r} is not http or https")


def validate(obj, path):
    """Schema errors of one rendered object (a list of strings, empty when it is valid)."""
    errors = []
    if not isinstance(obj, dict):
        return [f"{path}: a document must be a mapping"]
    key = (obj.get("apiVersion"), obj.get("kind"))
    path = f"{path} ({key[1]} {(obj.get('metadata') or {}).get('name')})"
    if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        _check_fields(obj, {"apiVersion": str, "kind": str, "metadata": dict, "spec": dict}, path, errors)
        _walk(obj.get("metadata"), "V1ObjectMeta", f"{path}.metadata", "metadata", errors)
        _check_service_monitor(obj, path, errors)
        return errors
    if key not in BUILTIN:
        return [f"{path}: no schema for apiVersion {key[0]} kind {key[1]}"]
    _walk(obj, BUILTIN[key], path, "", errors)
    if not errors:
        _required_fields(obj, BUILTIN[key], path, errors)
    return errors
