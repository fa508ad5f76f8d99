#!/usr/bin/env python3
"""Validates rendered Kubernetes objects offline; driven by the xpu-deploy-check tests.

Input (stdin, JSON): {"versions": ["1.30", ...], "crd_files": [paths],
                      "objects": [{"source": str, "object": {...}}, ...]}
Output (stdout, JSON): {"checked": n, "errors": [{"source", "object", "version", "path", "message"}]}

Built-in kinds are validated against the Kubernetes OpenAPI schemas shipped by the PyPI package
`kubernetes-validate`, in strict mode (unknown fields are errors), for every requested Kubernetes
version. Kinds defined by a CustomResourceDefinition (ours in deploy/crds/, the third-party subsets
in deploy/check/schemas/, or one in the rendered objects) are validated against the CRD's own
openAPIV3Schema, also strictly: the API server would silently prune an unknown field, which in a
manifest is always a mistake.
"""

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import referencing
import yaml
from packaging.version import Version

SCHEMA_ROOT = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def schema_dir(version):
    """The newest shipped strict schema set not newer than `version` (as kubernetes-validate)."""
    want = Version(version)
    found = []
    for d in SCHEMA_ROOT.iterdir():
        m = re.match(r"^v(\d+\.\d+)\.\d+-local-strict$", d.name)
        if m and Version(m.group(1)) <= want:
            found.append((Version(m.group(1)), d))
    if not found:
        raise SystemExit(f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes {version}")
    return max(found)[1]


def convert(s):
    """A CRD structural schema (OpenAPI v3.0 subset) as a strict JSON Schema."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: convert(sub) for name, sub in v.items()}
        elif k in ("items", "not"):
            out[k] = convert(v)
        elif k == "additionalProperties":
            out[k] = convert(v) if isinstance(v, dict) else v
        elif k in ("anyOf", "oneOf", "allOf"):
            out[k] = [convert(sub) for sub in v]
        elif k in ("type", "required", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
                   "minProperties", "maxProperties", "multipleOf", "const"):
            out[k] = copy.deepcopy(v)
        # description, format, default, example, nullable and x-kubernetes-* are handled below or
        # carry no validation here.
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    preserve = s.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") in ("object", ["object", "null"]) and "properties" in out \
            and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_validators(crd, registry):
    """(apiVersion, kind) -> (validator, scope) for each served version of a CRD."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    result = {}
    for v in spec["versions"]:
        if not v.get("served", True):
            continue
        root = convert(v["schema"]["openAPIV3Schema"])
        root.setdefault("type", "object")
        props = root.setdefault("properties", {})
        props["apiVersion"] = {"const": f"{group}/{v['name']}"}
        props["kind"] = {"const": kind}
        props["metadata"] = {"$ref": OBJECT_META}
        root["additionalProperties"] = False
        root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata"})
        result[(f"{group}/{v['name']}", kind)] = (
            jsonschema.Draft202012Validator(root, registry=registry), spec.get("scope", "Namespaced"))
    return result


def path_of(error):
    return "." + ".".join(str(p) for p in error.absolute_path) if error.absolute_path else "(root)"


def main():
    req = json.load(sys.stdin)
    errors = []
    checked = 0
    for version in req["versions"]:
        sdir = schema_dir(version)
        definitions = json.loads((sdir / "_definitions.json").read_text())
        registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
        crds = {}
        crd_docs = []
        for f in req["crd_files"]:
            crd_docs.extend(d for d in yaml.safe_load_all(Path(f).read_text()) if d)
        crd_docs.extend(o["object"] for o in req["objects"]
                        if o["object"].get("kind") == "CustomResourceDefinition")
        for crd in crd_docs:
            crds.update(crd_validators(crd, registry))
        builtin = {}
        for item in req["objects"]:
            obj, source = item["object"], item["source"]
            api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
            ident = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
            if (api_version, kind) in crds:
                validator = crds[(api_version, kind)][0]
            else:
                key = (api_version, kind)
                if key not in builtin:
                    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
                    f = sdir / f"{kind.lower()}-{group_version}.json"
                    if not api_version or not kind or not f.exists():
                        builtin[key] = None
                    else:
                        schema = json.loads(f.read_text())
                        builtin[key] = jsonschema.Draft202012Validator(
                            schema, registry=referencing.Resource.from_contents(schema) @ registry)
                validator = builtin[key]
                if validator is None:
                    errors.append({"source": source, "object": ident, "version": version, "path": "(root)",
                                   "message": f"no schema for {api_version} {kind}: neither a Kubernetes "
                                              f"{version} kind nor a CRD in deploy/crds or deploy/check/schemas"})
                    continue
            checked += 1
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
                errors.append({"source": source, "object": ident, "version": version, "path": path_of(e),
                               "message": e.message[:400]})
    json.dump({"checked": checked, "errors": errors}, sys.stdout)


if __name__ == "__main__":
    main()
