"""Run what deploy/ declares with podman: kustomize's render, read and turned into podman commands.

Nothing here restates a command, an environment variable or a security setting of the manifests:
each pod comes from the rendered StatefulSet or Job template, and this module does what the kubelet
and the controllers would do with it (expand $(VAR), fill the downward API, mount ConfigMaps,
Secrets and claims, run init containers in order, restart a server container that dies). What
podman cannot apply is said by `not_applied` and checked another way by the tests where it can.
The NetworkPolicies become nftables rules on the pods' bridge (`policy_rules`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def render(kustomization: str) -> list[dict]:
    """`kubectl kustomize` of a folder of deploy/, as documents."""
    done = subprocess.run(["kubectl", "kustomize", str(REPO / kustomization)], capture_output=True, text=True,
                          check=True, timeout=120)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def configmaps(docs: list[dict]) -> dict[str, dict[str, str]]:
    """Every rendered ConfigMap's data, by its generated name."""
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "2", "16Gi") as a number (cores or bytes)."""
    units = {"m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    return float(match.group(1)) * units.get(match.group(2), 1)


@dataclass
class Pod:
    """One pod to run: its name, labels and spec (a template's), and what its controller adds."""
    name: str
    labels: dict[str, str]
    spec: dict
    namespace: str
    controller_env: dict[str, str] = field(default_factory=dict)  # JOB_COMPLETION_INDEX
    hosts: list[tuple[str, str]] = field(default_factory=list)  # the Services' DNS records
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> host folder

    def containers(self, kind: str = "containers") -> list[dict]:
        return self.spec.get(kind, [])

    def fieldref(self, path: str) -> str:
        if path == "metadata.name":
            return self.name
        if path == "metadata.namespace":
            return self.namespace
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if label:
            return self.labels[label.group(1)]
        raise ValueError(f"{self.name}: fieldRef {path} is not supported here")

    def env(self, container: dict, maps: dict[str, dict[str, str]]) -> dict[str, str]:
        """The container's environment as the kubelet fills it, $(VAR) expanded in order."""
        env = dict(self.controller_env)
        for item in container.get("env", []):
            if "value" in item:
                value = VAR.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
            elif "fieldRef" in item["valueFrom"]:
                value = self.fieldref(item["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                ref = item["valueFrom"]["configMapKeyRef"]
                value = maps[ref["name"]][ref["key"]]
            env[item["name"]] = value
        return env


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    return [VAR.sub(lambda m: env.get(m.group(1), m.group(0)), w) for w in words]


def podman_run(pod: Pod, container: dict, maps: dict[str, dict[str, str]], images: dict[str, str],
               restart: str, detach: bool = True) -> list[str]:
    """`podman run` for one container of `pod`, as its spec declares it."""
    env = pod.env(container, maps)
    security = {**pod.spec.get("securityContext", {}), **container.get("securityContext", {})}
    args = ["podman", "run", "--pod", pod.name, "--name", f"{pod.name}-{container['name']}", "--pull", "never",
            "--restart", restart, "--log-driver", "k8s-file", "--no-healthcheck"]  # Kubernetes ignores HEALTHCHECK
    args.append("-d" if detach else "--rm")
    assert security.get("runAsNonRoot") and security["runAsUser"] != 0
    args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs of podman's own: only the volumes
    for cap in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:  # a limit above this machine's cores is the machine's cores
        args += ["--cpus", f"{min(quantity(limits['cpu']), os.cpu_count() or 1):g}"]
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"])))]
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    for mount in container.get("volumeMounts", []):
        source = pod.volumes[mount["name"]] / mount.get("subPath", "")
        args += ["--volume", f"{source}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
    if "command" in container:
        args += ["--entrypoint", json.dumps(expand(container["command"], env))]
    repository = container["image"].split("@")[0].split(":")[0].rsplit("/", 1)[-1]
    args.append(images[repository])
    return args + expand(container.get("args", []), env)


def not_applied(spec: dict) -> list[str]:
    """What of a pod spec podman does not apply, each with how the tests stand in for it."""
    out = ["scheduling (tolerations, topologySpreadConstraints, GPUs): one machine, no GPU",
           "ephemeral-storage limits and emptyDir sizeLimit: not enforced (nginx's spool cap is tested alone)",
           "fsGroup and Secret defaultMode: volumes are made group 10001, token files 0440 root:10001",
           "cpu limits above this machine's cores: capped at its cores"]
    for c in spec.get("containers", []):
        for probe in ("startupProbe", "readinessProbe"):
            if probe in c:
                out.append(f"{c['name']}.{probe}: run by the tests until it passes, before the pod takes "
                           f"traffic (an exec probe through podman exec, a TCP probe as a connect)")
        if "livenessProbe" in c:
            out.append(f"{c['name']}.livenessProbe: not run; a container that exits is restarted by "
                       f"podman's restart policy (the pod's restartPolicy)")
        if "lifecycle" in c:
            out.append(f"{c['name']}.preStop: not run; podman stops a pod with SIGTERM, then SIGKILL")
    return out


# --- NetworkPolicy -> nftables ---------------------------------------------------------------------

def selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_matches(peer: dict, labels: dict[str, str]) -> bool:
    """A policy peer against one of this namespace's pods (peers in other namespaces match none)."""
    if "namespaceSelector" in peer:
        return False
    return selects(peer["podSelector"], labels)


def allowed(policies: list[dict], direction: str, pod: dict[str, str], other: dict[str, str] | None,
            port: int, protocol: str = "TCP") -> bool:
    """Whether `pod`'s policies let traffic in (`ingress`, from `other`) or out (`egress`, to `other`;
    None: outside the namespace, e.g. DNS) on `port`. No policy selecting the pod: allowed."""
    mine = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], pod)
            and direction.capitalize() in p["spec"].get("policyTypes", [])]
    if not mine:
        return True
    key = "from" if direction == "ingress" else "to"
    for spec in mine:
        for rule in spec.get(direction, []):
            ports = rule.get("ports")
            port_ok = ports is None or any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports)
            peers = rule.get(key)
            if other is None:
                peer_ok = peers is None or any("namespaceSelector" in p for p in peers)
            else:
                peer_ok = peers is None or any(peer_matches(p, other) for p in peers)
            if port_ok and peer_ok:
                return True
    return False


def policy_rules(table: str, policies: list[dict], pods: dict[str, tuple[dict, str]], ports: list[int],
                 dns: str) -> str:
    """An nft script: a bridge-family table on the pods' bridge. A pod may open a TCP connection to
    another only where its egress and the peer's ingress policies both allow that port, and reach
    the bridge's own address (podman's DNS, standing in for kube-dns) only where its egress allows
    DNS. This kernel has no connection tracking for bridges, so the rules are stateless: the
    answering side may send only packets that carry ACK from the allowed port (no SYN of its own)."""
    lines = [f"table bridge {table} {{", "  chain forward {", "    type filter hook forward priority 0; policy accept;"]
    for src, (src_labels, src_ip) in sorted(pods.items()):
        for dst, (dst_labels, dst_ip) in sorted(pods.items()):
            for port in ports if src != dst else []:
                if allowed(policies, "egress", src_labels, dst_labels, port) and \
                        allowed(policies, "ingress", dst_labels, src_labels, port):
                    lines += [f"    ip saddr {src_ip} ip daddr {dst_ip} tcp dport {port} accept  # {src} -> {dst}",
                              f"    ip saddr {dst_ip} ip daddr {src_ip} tcp sport {port} tcp flags & ack == ack accept"]
    all_ips = ", ".join(ip for _, ip in pods.values())
    lines += [f"    ip saddr {{ {all_ips} }} drop", f"    ip daddr {{ {all_ips} }} drop", "  }",
              # what a pod sends to the host or beyond: answers to the host's own connections (the
              # tests read the pods), DNS where allowed, nothing else
              "  chain input {", "    type filter hook input priority 0; policy accept;",
              f"    ip saddr {{ {all_ips} }} tcp flags & ack == ack accept"]
    for name, (labels, ip) in sorted(pods.items()):
        for proto in ("udp", "tcp"):
            if allowed(policies, "egress", labels, None, 53, proto.upper()):
                lines.append(f"    ip saddr {ip} ip daddr {dns} {proto} dport 53 accept  # {name} -> DNS")
    lines += [f"    ip saddr {{ {all_ips} }} drop", "  }", "}"]
    return "\n".join(lines) + "\n"
