"""The Kubernetes manifests in deploy/kubernetes agree with what `modelship serve` configures: the same
TorchServe properties (ports, model store, size caps, management API off), the token from a Secret
checked in front of TorchServe, probes on /ping, a Service and an HPA pointing at the right things.
No cluster here: the manifests are parsed and cross-checked."""

import re
from pathlib import Path

import pytest
import yaml

from modelship.serving.config import PORTS, ServeConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _props(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def k8s():
    docs = {}
    for f in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[(doc["kind"], doc.get("metadata", {}).get("name", f.stem))] = doc
    dep = docs["Deployment", "modelship"]
    pod = dep["spec"]["template"]["spec"]
    return {"docs": docs, "dep": dep, "pod": pod, "containers": {c["name"]: c for c in pod["containers"]},
            "cm": docs["ConfigMap", "modelship-config"]["data"]}


def test_kustomization_lists_every_manifest_but_the_secret(k8s):
    kust = k8s["docs"]["Kustomization", "kustomization"]
    files = {f.name for f in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"secret.yaml"}  # real token values never live in the repository


def test_torchserve_properties_are_the_ones_modelship_serve_writes(k8s):
    props = _props(k8s["cm"]["config.properties"])
    expected = _props(ServeConfig(token_auth=False).properties(Path(props["model_store"])))
    assert props == expected
    assert props["enable_model_api"] == "false"
    for key in ("inference_address", "management_address", "metrics_address", "grpc_inference_address",
                "grpc_management_address"):
        assert "127.0.0.1" in props[key], f"{key} must stay on the pod's loopback"


def test_container_runs_that_config_and_model_store(k8s):
    ts = k8s["containers"]["torchserve"]
    cmd = ts["command"]
    props = _props(k8s["cm"]["config.properties"])
    store = cmd[cmd.index("--model-store") + 1]
    assert store == props["model_store"]
    mounts = {m["mountPath"]: m for m in ts["volumeMounts"]}
    volumes = {v["name"]: v for v in k8s["pod"]["volumes"]}
    assert mounts[store]["readOnly"] is True
    claim = volumes[mounts[store]["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s["docs"]
    cfg = cmd[cmd.index("--ts-config") + 1]
    assert mounts[cfg]["subPath"] == "config.properties"
    assert volumes[mounts[cfg]["name"]]["configMap"]["name"] == "modelship-config"
    assert "--start" in cmd and "--foreground" in cmd  # the container lives as long as TorchServe does


def test_token_from_secret_is_checked_before_torchserve(k8s):
    proxy = k8s["containers"]["auth-proxy"]
    env = {e["name"]: e for e in proxy["env"]}
    ref = env["MODELSHIP_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = k8s["docs"]["Secret", ref["name"]]
    assert ref["key"] in secret["stringData"]
    conf = k8s["cm"]["default.conf.template"]
    props = _props(k8s["cm"]["config.properties"])
    inference_port = int(props["inference_address"].rsplit(":", 1)[1])
    clients = conf[:conf.index("listen 9090;")]  # the clients' server; the metrics one is tested below
    assert set(re.findall(r"proxy_pass http://127\.0\.0\.1:(\d+)", clients)) == {str(inference_port)}
    main = conf[conf.index("location / {"):]
    assert '$http_authorization != "Bearer ${MODELSHIP_TOKEN}"' in main and "return 401" in main
    ping = conf[conf.index("location = /ping"):conf.index("location / {")]
    assert "http_authorization" not in ping  # probes need no token
    size = re.search(r"client_max_body_size (\d+)m;", conf).group(1)
    assert int(size) << 20 == int(props["max_request_size"])
    signing = {e["name"]: e for e in k8s["containers"]["torchserve"]["env"]}["MODELSHIP_SIGNING_KEY"]
    assert signing["valueFrom"]["secretKeyRef"]["name"] == ref["name"]
    assert signing["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_only_the_proxy_listens_and_probes_hit_ping(k8s):
    proxy = k8s["containers"]["auth-proxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    port = {"name": "http", "containerPort": ports["http"]}
    conf = k8s["cm"]["default.conf.template"]
    assert sorted(int(x) for x in re.findall(r"listen (\d+);", conf)) == sorted(ports.values())
    base = ServeConfig().port
    for p in ports.values():
        assert p not in range(base, base + PORTS)  # no clash with TorchServe's loopback ports
    for c in k8s["pod"]["containers"]:
        assert c["name"] == "auth-proxy" or "ports" not in c
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = proxy[probe]["httpGet"]
        assert get["path"] == "/ping" and get["port"] == port["name"]


def test_service_and_autoscaler_point_at_the_deployment(k8s):
    svc = k8s["docs"]["Service", "modelship"]
    labels = k8s["dep"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert k8s["dep"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {p["name"] for p in k8s["containers"]["auth-proxy"]["ports"]}
    hpa = k8s["docs"]["HorizontalPodAutoscaler", "modelship"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["dep"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for c in k8s["pod"]["containers"]:  # CPU utilization is relative to requests: every container needs them
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), c["name"]


def test_model_store_can_be_filled_and_shared(k8s):
    """The loader pod mounts the same claim read-write; serving pods mount it read-only on any node (RWX)."""
    pvc = k8s["docs"]["PersistentVolumeClaim", "modelship-model-store"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    loader = yaml.safe_load((DEPLOY / "tools" / "store-loader.yaml").read_text())
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in loader["spec"]["volumes"]}
    mount = loader["spec"]["containers"][0]["volumeMounts"][0]
    assert claims[mount["name"]] == pvc["metadata"]["name"] and not mount.get("readOnly")
    served = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in k8s["pod"]["volumes"]}
    assert pvc["metadata"]["name"] in served.values()
    assert "runs/demo/model-store" in (DEPLOY / "model-store.yaml").read_text()  # where the pipeline writes


@pytest.fixture(scope="module")
def monitoring():
    folder = DEPLOY / "monitoring"
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = {}
    for name in kust["resources"]:
        if name != "..":
            doc = yaml.safe_load((folder / name).read_text())
            docs[doc["kind"]] = doc
    return kust, docs


def test_shadow_metrics_reach_prometheus(k8s):
    """The workers write their counters where the sidecar reads them, the sidecar serves modelship's exporter on
    the port nginx forwards /metrics to, and the pod says where to scrape."""
    ts, side = k8s["containers"]["torchserve"], k8s["containers"]["shadow-metrics"]
    folder = {e["name"]: e.get("value") for e in ts["env"]}["PROMETHEUS_MULTIPROC_DIR"]
    assert side["command"][:3] == ["python", "-m", "modelship.serving.metrics"] and side["command"][3] == folder
    mount = lambda c: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[folder]
    assert mount(ts) == mount(side)
    assert "emptyDir" in {v["name"]: v for v in k8s["pod"]["volumes"]}[mount(ts)]
    conf = k8s["cm"]["default.conf.template"]
    metrics_server = conf[conf.index("listen 9090;"):]
    assert f"proxy_pass http://127.0.0.1:{side['command'][4]}/metrics;" in metrics_server
    props = _props(k8s["cm"]["config.properties"])
    assert f"proxy_pass {props['metrics_address']}/metrics;" in metrics_server  # TorchServe's own, beside
    assert "proxy_pass http://127.0.0.1:8080" not in metrics_server  # no inference without the token there
    assert int(side["command"][4]) == ServeConfig().port + 5  # the port `modelship serve` uses
    notes = k8s["dep"]["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in k8s["containers"]["auth-proxy"]["ports"]}
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == ports["metrics"]


def test_service_monitor_and_alert_rules(k8s, monitoring):
    from modelship.serving.shadow import metrics

    kust, docs = monitoring
    assert ".." in kust["resources"]  # the monitoring overlay is the Deployment plus these
    sm = docs["ServiceMonitor"]
    svc = k8s["docs"]["Service", "modelship"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics"} <= ports
    conf = k8s["cm"]["default.conf.template"]
    for e in sm["spec"]["endpoints"]:
        assert f"location = {e['path']} {{" in conf
    rule = docs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    exported = {m._name + "_total" if m._type == "counter" else m._name for m in metrics().values()}
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    for r in rules:
        assert {"alert", "expr", "labels", "annotations"} <= r.keys() and r["labels"]["severity"]
        names = set(re.findall(r"\b(modelship_[a-z_]+)\b", r["expr"]))
        assert names and names <= exported, names - exported
        assert r["expr"].count("(") == r["expr"].count(")")
    mismatch = next(r for r in rules if "mismatch" in r["expr"])
    assert mismatch["expr"].rstrip().endswith("> 0") and mismatch["labels"]["severity"] == "critical"


# ---- KServe: deploy/kserve ---------------------------------------------------------------------------------

KSERVE = DEPLOY.parent / "kserve"


def _against_api_types(value, typ: str, where: str) -> list[str]:
    """Every field of ``value`` known to KServe's API type ``typ`` (the kserve package's models, generated from
    its CRDs, and the Kubernetes client's for the core types they embed), with the type it declares."""
    import kserve.models
    import kubernetes.client.models

    m = re.fullmatch(r"(?:list|List)\[(.+)\]", typ)
    if m:
        if not isinstance(value, list):
            return [f"{where}: a list expected"]
        return [p for i, v in enumerate(value) for p in _against_api_types(v, m.group(1), f"{where}[{i}]")]
    m = re.fullmatch(r"(?:dict|Dict)[(\[]str, (.+)[)\]]", typ)
    if m:
        if not isinstance(value, dict):
            return [f"{where}: a mapping expected"]
        return [p for k, v in value.items() for p in _against_api_types(v, m.group(1), f"{where}.{k}")]
    simple = {"str": str, "bool": bool, "int": int, "float": (int, float), "datetime": str, "date": str}
    if typ in simple:
        ok = isinstance(value, simple[typ]) and not (typ in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{where}: {typ} expected, got {value!r}"]
    if typ == "object":  # IntOrString, Quantity, free-form status
        return []
    cls = getattr(kserve.models, typ, None) or getattr(kubernetes.client.models, typ, None)
    assert cls is not None, f"{where}: no API type {typ}"
    if not isinstance(value, dict):
        return [f"{where}: a {typ} mapping expected"]
    fields = {key: attr for attr, key in cls.attribute_map.items()}
    problems = [f"{where}.{k}: not a field of {typ}" for k in value if k not in fields]
    return problems + [p for k, v in value.items() if k in fields
                       for p in _against_api_types(v, cls.openapi_types[fields[k]], f"{where}.{k}")]


@pytest.fixture(scope="module")
def kserve_docs():
    return {doc["kind"]: doc for f in sorted(KSERVE.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text())}


def test_kserve_manifests_match_kserves_api_types(kserve_docs):
    types = {"InferenceService": ("serving.kserve.io/v1beta1", "V1beta1InferenceService"),
             "ServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ServingRuntime")}
    assert set(kserve_docs) == set(types)
    for kind, (api, typ) in types.items():
        doc = kserve_docs[kind]
        assert doc["apiVersion"] == api
        assert _against_api_types(doc, typ, kind) == []
    # the checker finds what it checks: a misspelt field, a wrong type
    wrong = {**kserve_docs["InferenceService"], "spec": {"predictor": {"model": {"protocolVerison": "v2"}}}}
    assert _against_api_types(wrong, "V1beta1InferenceService", "isvc") == [
        "isvc.spec.predictor.model.protocolVerison: not a field of V1beta1ModelSpec"]
    wrong = {**kserve_docs["InferenceService"], "spec": {"predictor": {"minReplicas": "one"}}}
    assert _against_api_types(wrong, "V1beta1InferenceService", "isvc") == [
        "isvc.spec.predictor.minReplicas: int expected, got 'one'"]


def test_kserve_runtime_runs_modelship_serve_with_the_v2_front_on_its_port(kserve_docs, k8s):
    from typer.main import get_command

    from modelship.cli import app

    runtime, isvc = kserve_docs["ServingRuntime"]["spec"], kserve_docs["InferenceService"]["spec"]["predictor"]
    container = runtime["containers"][0]
    cmd = container["command"]
    assert cmd[:3] == ["modelship", "serve", "/mnt/models"]  # where KServe's storage initializer puts storageUri
    # the command line is one `modelship serve` accepts (parsed by its own parser, without starting anything)
    cli = get_command(app)
    serve = cli.get_command(cli.make_context("modelship", ["serve", "--help"], resilient_parsing=True), "serve")
    params = serve.make_context("serve", list(cmd[2:])).params
    assert params["v2_host"] == "0.0.0.0" and params["no_auth"] and params["oip"] and str(params["store"]) == "/mnt/models"
    # a public front without a token: accepted because the runtime says so (KServe authorizes in front of the pod)
    from dataclasses import replace

    from modelship.errors import ServeError
    from modelship.serving.config import ServeConfig

    front = ServeConfig(token_auth=not params["no_auth"], v2_host=params["v2_host"],
                        insecure_public=params["insecure_public"])
    front.check_front()
    with pytest.raises(ServeError, match="--insecure-public"):
        replace(front, insecure_public=False).check_front()
    base = int(cmd[cmd.index("--port") + 1])
    assert cmd[cmd.index("--v2-host") + 1] == "0.0.0.0"  # the front faces the pod network; TorchServe stays inside
    http = container["ports"][0]["containerPort"]
    assert http == base + 6 == 8080  # KServe sends v2 REST to 8080, gRPC to 8081
    assert set(runtime["protocolVersions"]) == {"v2", "grpc-v2"}
    model = isvc["model"]
    assert model["runtime"] == kserve_docs["ServingRuntime"]["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2"
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert model[probe]["httpGet"] == {"path": path, "port": http}
    claim = model["storageUri"].removeprefix("pvc://").split("/")[0]
    assert ("PersistentVolumeClaim", claim) in k8s["docs"]  # the same store the plain Deployment serves
    assert container["securityContext"]["runAsNonRoot"] is True


# ---- the Grafana dashboard: deploy/kubernetes/monitoring/dashboard.json -------------------------------------------

DASHBOARD = DEPLOY / "monitoring" / "dashboard.json"


def _selectors(expr) -> list[tuple[str, set]]:
    """(metric name, label names it matches, groups or joins by) of every series selector in a parsed PromQL
    expression; an expression node this does not know fails (so no metric escapes the check)."""
    import promql_parser as pp

    found = []

    def walk(e, by: set):
        if e is None or isinstance(e, (pp.NumberLiteral, pp.StringLiteral)):
            return
        if isinstance(e, pp.VectorSelector):
            found.append((e.name, {m.name for m in e.matchers.matchers}
                          | {m.name for ms in (e.matchers.or_matchers or []) for m in ms} | by))
        elif isinstance(e, pp.MatrixSelector):
            walk(e.vector_selector, by)
        elif isinstance(e, pp.AggregateExpr):
            walk(e.param, set())
            walk(e.expr, by | (set(e.modifier.labels) if e.modifier is not None else set()))
        elif isinstance(e, pp.BinaryExpr):
            joined = set()
            if e.modifier is not None:
                joined = set(e.modifier.matching.labels if e.modifier.matching is not None else []) | \
                    set(e.modifier.group_labels or [])
            walk(e.lhs, by | joined)
            walk(e.rhs, by | joined)
        elif isinstance(e, pp.Call):
            for a in e.args:
                walk(a, by)
        elif isinstance(e, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
            walk(e.expr, by)
        else:
            raise AssertionError(f"a PromQL node this check does not know: {type(e).__name__}")
    walk(expr, set())
    return found


def _panels(dash: dict) -> list[dict]:
    """Every panel, those inside rows included."""
    return [q for p in dash["panels"] for q in ([p] + p.get("panels", []))]


def _queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables replaced by what they stand for."""
    return [(p["title"], t["expr"].replace("$__rate_interval", "5m").replace("$model", ".*"))
            for p in _panels(dash) for t in p.get("targets", [])]


def _check_labels(selectors, labels: dict, title: str) -> None:
    for name, used in selectors:
        assert name in labels, f"{title}: {name} is exported by neither modelship nor TorchServe"
        assert used <= labels[name], f"{title}: {name} has no label {used - labels[name]}"


def test_dashboard_is_provisioned_by_the_monitoring_overlay():
    import json

    kust = yaml.safe_load((DEPLOY / "monitoring" / "kustomization.yaml").read_text())
    gen = next(g for g in kust["configMapGenerator"] if g["name"] == "modelship-grafana-dashboard")
    assert gen["files"] == ["modelship.json=dashboard.json"] and gen["options"]["labels"] == {"grafana_dashboard": "1"}
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "modelship" and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    titles = " ".join(p["title"] for p in _panels(dash)).lower()
    for what in ("shadow checks", "by kind", "dropped", "absolute difference", "requests per second", "latency"):
        assert what in titles, what
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids))


@pytest.mark.serve
def test_every_dashboard_query_names_metrics_and_labels_that_exist(served):
    """Each query parses as PromQL (promql-parser); each metric it names is one modelship exports (the shadow
    metrics' registry) or one a real TorchServe exported here (scraped from this suite's server after a request),
    and each label it matches or groups by is one that metric carries."""
    import json

    import promql_parser as pp
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from modelship.serving.shadow import LABELS, metrics

    r = requests.post(f"{served.inference_url}/predictions/cnn-onnx", json={"inputs": [[[0.5] * 8] * 8]},  # one 8x8 image
                      headers={"Authorization": f"Bearer {served.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    labels: dict[str, set] = {}
    for m in metrics().values():
        extra = set(m._labelnames)
        names = [m._name + "_total"] if m._type == "counter" else [m._name + s for s in ("_bucket", "_sum", "_count")]
        for n in names:
            labels[n] = extra | ({"le"} if n.endswith("_bucket") else set())
    assert set(LABELS) <= labels["modelship_shadow_checked_total"]
    text = requests.get(f"{served.metrics_url}/metrics", timeout=10).text
    # read as Prometheus stores it (prometheus_client's parser would add _total to TorchServe's counters that lack it)
    for name, body in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", text, re.M):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', body))
    assert {f.name for f in text_string_to_metric_families(text)} >= {"ts_inference_requests"}  # it parses
    queries = _queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10
    with pytest.raises(AssertionError, match="no label"):  # the check can fail: a join on a label nobody has
        _check_labels(_selectors(pp.parse("a / on(nolabel) b")), {"a": {"x"}, "b": {"x"}}, "probe")
    for title, q in queries:
        _check_labels(_selectors(pp.parse(q)), labels, title)
    assert {"ts_inference_requests_total", "ts_inference_latency_microseconds"} <= set(labels)
    dash = json.loads(DASHBOARD.read_text())
    for panel in _panels(dash):  # each legend names labels its queries keep
        for t in panel.get("targets", []):
            kept = {lab for name, used in _selectors(pp.parse(_queries({"panels": [{**panel, "targets": [t]}]})[0][1]))
                    for lab in used}
            assert set(re.findall(r"{{(\w+)}}", t.get("legendFormat", ""))) <= kept, (panel["title"], t["expr"])
    for var in dash["templating"]["list"]:  # label_values(METRIC, LABEL): a metric and label that exist
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var.get("definition", ""))
        if var["type"] == "query":
            assert m and m.group(2) in labels[m.group(1)], var
